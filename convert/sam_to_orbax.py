"""Convert official SAM .pth checkpoints to samjax Orbax checkpoints.

  python -m convert.sam_to_orbax sam_vit_h_4b8939.pth checkpoints/sam_vit_h [--model-type vit_h]

Same as `samjax convert`. The mapping table lives in `samjax/io/checkpoint.py`
(`conversion_table`); print it with `--print-table`.
"""

import sys

from samjax.cli import main as samjax_main


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--print-table" in argv:
    import samjax
    from samjax.io.checkpoint import conversion_table
    i = argv.index("--print-table")
    name = argv[i + 1] if len(argv) > i + 1 else "vit_h"
    for e in conversion_table(samjax.get_config(name)):
      print(f"{e.flax_path:70s} <- {e.torch_key:70s} [{e.transform}]")
    return 0
  return samjax_main(["convert", *argv])


if __name__ == "__main__":
  sys.exit(main())
