"""The `samjax` command line: convert, predict, automask, finetune, export-torch, serve, plan.

One module per command, each with `HELP`, `add_arguments(parser)` and `run(args) ->
int`; every argument parser of samjax lives here. Building the parsers imports only
the command modules and the light, jax-free modules they read defaults from
(`samjax.config`, `samjax.amg.options`, `samjax.train.config`, ...), so `samjax --help`
and `samjax COMMAND --help` answer without importing jax (tests/test_cli.py checks);
a command imports the model code when it runs.

Of the commands only `export-torch` needs torch (to write a .pth); `convert` reads
.pth files without it.

Every command ends with one of the `EXIT_STATUSES` and, on an error or a signal, one
line `samjax COMMAND: error: ...` (or `...: interrupted by SIGINT`) instead of a
traceback (`SAMJAX_TRACEBACK=1` prints it too). SIGTERM is turned into the same
orderly stop as Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import textwrap
import threading
import traceback
from typing import List, Optional

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SIGINT = 128 + signal.SIGINT    # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143

EXIT_STATUSES = (
    (EXIT_OK, "done"),
    (EXIT_FAILED, "some inputs failed (listed in failures.jsonl); the others are done"),
    (EXIT_USAGE, "usage or job-level error: bad arguments or inputs, unusable output "
                 "or cache folder, no model, full disk (one line on stderr says which)"),
    (EXIT_SIGINT, "interrupted by SIGINT (Ctrl-C)"),
    (EXIT_SIGTERM, "stopped by SIGTERM"),
)
# `samjax --help`: what every command shares (a command may give 1 a meaning of its own).
TOP_EPILOG = ("Exit status: 0 on success, 2 on usage and other errors (one line on stderr "
              "says which), 130 or 143 when stopped by SIGINT or SIGTERM; see a command's "
              "--help for more (samjax automask exits 1 when some inputs failed).")
# `samjax automask --help`: the whole table.
EXIT_EPILOG = "exit status:\n" + "\n".join(
    textwrap.fill(text, width=78, initial_indent=f"  {code:<4d} ", subsequent_indent=" " * 7)
    for code, text in EXIT_STATUSES)

# command -> its module: `HELP` (one line), optional `DESCRIPTION`, `add_arguments`, `run`.
COMMANDS = {
    "convert": "samjax.cli.convert",
    "predict": "samjax.cli.predict",
    "automask": "samjax.cli.automask",
    "finetune": "samjax.cli.finetune",
    "export-torch": "samjax.cli.export_torch",
    "serve": "samjax.cli.serve",
    "plan": "samjax.cli.plan",
}


class _Formatter(argparse.HelpFormatter):
  """Wraps paragraphs as usual but keeps the lines of a text that has several (the
  exit status table)."""

  def _fill_text(self, text, width, indent):
    if "\n" in text:
      return "".join(indent + line for line in text.splitlines(keepends=True))
    return super()._fill_text(text, width, indent)


def build_parser() -> argparse.ArgumentParser:
  """The `samjax` parser with every command.

  A command module may set `EPILOG` (text after its options; several lines are kept
  as they are), e.g. `EXIT_EPILOG`, the exit status table.
  """
  from samjax import __version__  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(prog="samjax", description="Segment Anything in JAX.",
                                   epilog=TOP_EPILOG, formatter_class=_Formatter)
  parser.add_argument("--version", action="version", version=f"samjax {__version__}")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name, module_name in COMMANDS.items():
    module = importlib.import_module(module_name)
    p = sub.add_parser(name, help=module.HELP,
                       description=getattr(module, "DESCRIPTION", None) or module.HELP,
                       epilog=getattr(module, "EPILOG", None),
                       formatter_class=_Formatter)
    module.add_arguments(p)
    p.set_defaults(func=module.run)
  return parser


class Interrupted(KeyboardInterrupt):
  """Raised in the main thread by SIGTERM while a command runs (SIGINT raises the
  plain KeyboardInterrupt), so both unwind the same way: `finally` blocks run,
  atomic writes remove their temporaries.

  Attributes:
    signum: the signal.
  """

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


def _raise_interrupted(signum, frame):  # pylint: disable=unused-argument
  raise Interrupted(signum)


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  # ValueError includes samjax.io.checkpoint.CheckpointError and samjax.bulk.JobError
  # is a RuntimeError, like the pretrained weights' DownloadError: their messages
  # are written for users. Anything else is named by its type.
  if isinstance(e, (ValueError, RuntimeError, OSError)) and text:
    return text
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def main(argv: Optional[List[str]] = None) -> int:
  """Runs `samjax ARGV` (default: sys.argv[1:]); returns the exit status.

  See `EXIT_STATUSES`: 0 done, 1 some inputs failed, 2 usage or job-level errors
  (argparse exits with 2 itself), 130 SIGINT, 143 SIGTERM.
  """
  args = build_parser().parse_args(argv)
  in_main_thread = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGTERM, _raise_interrupted) if in_main_thread else None
  try:
    return int(args.func(args) or 0)
  except KeyboardInterrupt as e:
    signum = getattr(e, "signum", signal.SIGINT)
    print(f"samjax {args.command}: interrupted by {signal.Signals(signum).name}",
          file=sys.stderr)
    return 128 + signum
  except Exception as e:  # pylint: disable=broad-except
    if os.environ.get("SAMJAX_TRACEBACK"):
      traceback.print_exc()
    print(f"samjax {args.command}: error: {_one_line(e)}", file=sys.stderr)
    return EXIT_USAGE
  finally:
    if in_main_thread:
      signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
