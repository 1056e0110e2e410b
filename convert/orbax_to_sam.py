"""Export a samjax Orbax checkpoint back to an official-format SAM .pth (needs torch).

  python -m convert.orbax_to_sam checkpoints/sam_vit_b out/sam_vit_b.pth [--overwrite]

Same as `samjax export-torch` (its options apply): the inverse of
`convert.sam_to_orbax`, using the conversion table of `samjax/io/checkpoint.py` run
backwards.
"""

import sys

from samjax.cli import main as samjax_main


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  return samjax_main(["export-torch", *argv])


if __name__ == "__main__":
  sys.exit(main())
