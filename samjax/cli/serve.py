"""`samjax serve`: the local web app (`samjax.serve`) from the command line.

The port is bound before the model loads, so a port in use fails at once. Needs the
`serve` extra (Starlette, uvicorn); without it the command says how to install it.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys

from samjax.cli._common import add_compute_arguments, add_max_pixels_argument, \
    check_checkpoint_arg, load_model_from_args, positive_int
from samjax.io.images import DEFAULT_MAX_PIXELS

HELP = "local web app: click-to-segment, everything mode, bulk output viewer"
DESCRIPTION = (
    "Serve a web page for interactive segmentation: click points and draw boxes and "
    "see SAM's masks at once (the image is embedded once, each click runs only the "
    "prompt encoder and mask decoder), run the automatic mask generator on the image, "
    "and browse the outputs of a `samjax automask` job (--masks). The page and a JSON "
    "API (GET /api lists the routes) come from this process; nothing is fetched from "
    "the internet. Binds 127.0.0.1 unless --host says otherwise; there is no "
    "authentication, so anyone who can reach the address can use the model and read "
    "--images and --masks.")

DEFAULT_MAX_UPLOAD_MB = 50


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  model = parser.add_argument_group("model")
  which = model.add_mutually_exclusive_group()
  which.add_argument("--checkpoint", metavar="CKPT", help="samjax Orbax dir or official .pth")
  which.add_argument("--model", choices=["vit_b", "vit_l", "vit_h"], default=None,
                     help="official weights, downloaded once and cached (default vit_h)")
  add_compute_arguments(model, auto_dtype=True)
  folders = parser.add_argument_group("folders (read only)")
  folders.add_argument("--images", metavar="DIR",
                       help="images to pick from in the page (searched recursively), also "
                            "where the bulk viewer looks for the pictures of --masks")
  folders.add_argument("--masks", metavar="OUT_DIR",
                       help="a `samjax automask` output folder to browse: its JSONs with "
                            "masks overlaid, failures.jsonl and settings")
  server = parser.add_argument_group("server")
  server.add_argument("--host", default="127.0.0.1",
                      help="address to bind (default: %(default)s, this machine only; "
                           "0.0.0.0 exposes the app to the network, unauthenticated)")
  server.add_argument("--port", type=int, default=8000,
                      help="port (default: %(default)s; 0 picks a free one, printed)")
  server.add_argument("--max-upload-mb", type=positive_int, default=DEFAULT_MAX_UPLOAD_MB,
                      metavar="MB", help="larger uploads are refused (default: %(default)s)")
  add_max_pixels_argument(server, DEFAULT_MAX_PIXELS)
  server.add_argument("--cache-size", type=positive_int, default=8, metavar="N",
                      help="images whose embeddings are kept, least recently used "
                           "dropped first (default: %(default)s)")
  return parser


def _allowed_hosts(host: str):
  """Host header values to accept: loopback names, and the bound address itself.

  Binding every address (0.0.0.0, ::) accepts any Host (the server is meant to be
  reached under names we cannot know).
  """
  try:
    if ipaddress.ip_address(host).is_unspecified:
      return None
  except ValueError:
    pass
  return sorted({"127.0.0.1", "localhost", "::1", "[::1]", host})


def bind(host: str, port: int) -> socket.socket:
  """A listening socket on host:port, or ValueError naming what is wrong."""
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
  except socket.gaierror as e:
    raise ValueError(f"--host {host}: {e.strerror or e}") from None
  family, _, _, _, addr = infos[0]
  sock = socket.socket(family, socket.SOCK_STREAM)
  try:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(128)
  except OSError as e:
    sock.close()
    raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
  return sock


def check_folders(args: argparse.Namespace) -> None:
  for flag, path in (("--images", args.images), ("--masks", args.masks)):
    if path is not None and not os.path.isdir(path):
      raise ValueError(f"{flag} {path}: not a folder")


def run(args: argparse.Namespace) -> int:
  # pylint: disable=import-outside-toplevel
  try:
    import starlette  # noqa: F401
    import uvicorn
  except ImportError as e:
    raise RuntimeError(f"samjax serve needs the serve extra ({e.name} is missing): "
                       "pip install 'samjax[serve]'") from None
  check_checkpoint_arg(args)
  check_folders(args)
  sock = bind(args.host, args.port)
  try:
    model = load_model_from_args(args, "serve")
    from samjax.serve.app import create_app
    name = (os.path.basename(os.path.normpath(args.checkpoint)) if args.checkpoint
            else args.model or "vit_h")
    app = create_app(model, images_dir=args.images, masks_dir=args.masks,
                     max_upload_bytes=args.max_upload_mb << 20,
                     max_pixels=args.max_pixels or None, cache_size=args.cache_size,
                     allowed_hosts=_allowed_hosts(args.host), model_name=name)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"samjax serve: http://{shown}:{port}/ ({name}, {model.config.image_size} px "
          f"input; Ctrl-C stops)", file=sys.stderr, flush=True)
    if _allowed_hosts(args.host) is None:
      print("samjax serve: warning: listening on every address, without authentication",
            file=sys.stderr)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
  finally:
    sock.close()
  return 0
