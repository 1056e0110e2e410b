"""Datasets for training and testing samjax models.

The public names are resolved lazily (PEP 562) so that running
`python -m samjax.data.synthetic` does not import the module twice (runpy warns when
a package's __init__ has already imported the submodule being executed).
"""

from typing import Any

__all__ = ["CATEGORIES", "load_coco_instances", "make_synthetic_image",
           "mask_to_polygons", "write_coco_dataset"]


def __getattr__(name: str) -> Any:
  if name in __all__:
    from samjax.data import synthetic
    return getattr(synthetic, name)
  raise AttributeError(f"module 'samjax.data' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
