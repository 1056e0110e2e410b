"""The `samjax` command line: convert, predict, automask, finetune, export-torch.

One module per command, each with `HELP`, `add_arguments(parser)` and `run(args) ->
int`; every argument parser of samjax lives here. Building the parsers imports only
the command modules and the light, jax-free modules they read defaults from
(`samjax.config`, `samjax.amg.options`, `samjax.train.config`, ...), so `samjax --help`
and `samjax COMMAND --help` answer without importing jax (tests/test_cli.py checks);
a command imports the model code when it runs.

Of the commands only `export-torch` needs torch (to write a .pth); `convert` reads
.pth files without it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

EXIT_USAGE = 2

# command -> its module: `HELP` (one line), optional `DESCRIPTION`, `add_arguments`, `run`.
COMMANDS = {
    "convert": "samjax.cli.convert",
    "predict": "samjax.cli.predict",
    "automask": "samjax.cli.automask",
    "finetune": "samjax.cli.finetune",
    "export-torch": "samjax.cli.export_torch",
}


def build_parser() -> argparse.ArgumentParser:
  """The `samjax` parser with every command."""
  from samjax import __version__  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(prog="samjax", description="Segment Anything in JAX.")
  parser.add_argument("--version", action="version", version=f"samjax {__version__}")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name, module_name in COMMANDS.items():
    module = importlib.import_module(module_name)
    p = sub.add_parser(name, help=module.HELP,
                       description=getattr(module, "DESCRIPTION", None) or module.HELP)
    module.add_arguments(p)
    p.set_defaults(func=module.run)
  return parser


def main(argv: Optional[List[str]] = None) -> int:
  """Runs `samjax ARGV` (default: sys.argv[1:]); returns the exit status (2 for usage
  and input errors)."""
  args = build_parser().parse_args(argv)
  try:
    return int(args.func(args) or 0)
  except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
    # ValueError includes samjax.io.checkpoint.CheckpointError; RuntimeError the
    # pretrained weights' DownloadError.
    print(f"samjax {args.command}: error: {e}", file=sys.stderr)
    return EXIT_USAGE
