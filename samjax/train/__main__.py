"""`python -m samjax.train {finetune,export-torch} ...`: the same as `samjax finetune` etc."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs `python -m samjax.train ARGV`; returns the exit status."""
  # pylint: disable=import-outside-toplevel
  from samjax.cli import export_torch, finetune
  parser = argparse.ArgumentParser(prog="python -m samjax.train",
                                   description="Fine-tune SAM / export params to PyTorch.")
  sub = parser.add_subparsers(dest="command", required=True)
  for name, module in (("finetune", finetune), ("export-torch", export_torch)):
    p = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION)
    module.add_arguments(p)
    p.set_defaults(func=module.run)
  args = parser.parse_args(argv)
  return args.func(args)


if __name__ == "__main__":
  sys.exit(main())
