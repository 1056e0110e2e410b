"""Export a samjax Orbax checkpoint back to an official-format SAM .pth.

  python -m convert.orbax_to_sam checkpoints/sam_vit_b out/sam_vit_b.pth

The inverse of `convert.sam_to_orbax`, using the same table run backwards.
"""

import sys


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if len(argv) != 2:
    print("usage: python -m convert.orbax_to_sam CKPT_DIR OUT.pth", file=sys.stderr)
    return 2
  from samjax.checkpoint import CheckpointError, load_params, save_torch_state_dict
  try:
    config, params = load_params(argv[0])
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  save_torch_state_dict(params, config, argv[1])
  print(f"exported {argv[0]} ({config.name}) -> {argv[1]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
