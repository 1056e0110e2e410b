"""`AmgOptions`: the automatic mask generator's settings, validated once.

This frozen dataclass is the single source of the generator's defaults (those of the
official `SamAutomaticMaskGenerator`): the `AutomaticMaskGenerator` constructor, the
`samjax automask` command line and the bulk job all read them from here. Each field's
`metadata["help"]` is the one-line description the CLI shows. Importing this module
imports neither jax nor numpy-heavy code, so the CLI can build its parser from it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Dict, Optional, Sequence, Tuple

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


def _field(default, help_text: str, cli: bool = True):
  return dataclasses.field(default=default, metadata={"help": help_text, "cli": cli})


@dataclasses.dataclass(frozen=True)
class AmgOptions:
  """Options of `SamAutomaticMaskGenerator`, with its defaults and meanings.

  `point_grids` is a tuple of (n, 2) grids in [0, 1] (x, y), one per crop layer; it is
  exclusive with `points_per_side` (pass `points_per_side=None` with it).
  """

  points_per_side: Optional[int] = _field(32, "point grid side length (points_per_side**2 "
                                          "prompts on the full image)")
  points_per_batch: int = _field(64, "prompt points decoded together")
  pred_iou_thresh: float = _field(0.88, "keep masks whose predicted IoU is > this (if > 0)")
  stability_score_thresh: float = _field(0.95, "keep masks whose stability score is >= "
                                         "this (if > 0)")
  stability_score_offset: float = _field(1.0, "logit offset of the stability score")
  box_nms_thresh: float = _field(0.7, "box IoU for NMS within a crop")
  crop_n_layers: int = _field(0, "extra layers of image crops; layer i has (2**i)**2 crops")
  crop_nms_thresh: float = _field(0.7, "box IoU for NMS between crops")
  crop_overlap_ratio: float = _field(512 / 1500, "overlap of layer-1 crops as a fraction "
                                     "of the image's short side")
  crop_n_points_downscale_factor: int = _field(1, "layer i uses points_per_side / "
                                               "factor**i points per side")
  point_grids: Optional[Tuple[Any, ...]] = _field(None, "explicit per-layer point grids",
                                                  cli=False)
  min_mask_region_area: float = _field(0, "fill holes and remove islands smaller than this "
                                       "many pixels (OpenCV), then NMS again")
  output_mode: str = _field("binary_mask", "binary_mask, uncompressed_rle or coco_rle",
                            cli=False)  # the bulk job always writes coco_rle

  def __post_init__(self):
    def integer(name, minimum):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
      if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
      object.__setattr__(self, name, int(value))

    def real(name, lo=-math.inf, hi=math.inf):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
          not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
      if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
      object.__setattr__(self, name, float(value))

    if (self.points_per_side is None) == (self.point_grids is None):
      raise ValueError("exactly one of points_per_side or point_grids must be given "
                       f"(got points_per_side={self.points_per_side!r} and "
                       f"{'a' if self.point_grids is not None else 'no'} point_grids)")
    integer("crop_n_layers", 0)
    integer("crop_n_points_downscale_factor", 1)
    if self.points_per_side is not None:
      integer("points_per_side", 1)
      for i in range(self.crop_n_layers + 1):
        if int(self.points_per_side / self.crop_n_points_downscale_factor**i) < 1:
          raise ValueError(
              f"crop layer {i} would get no points: points_per_side={self.points_per_side} "
              f"/ crop_n_points_downscale_factor**{i} < 1")
    else:
      import numpy as np  # pylint: disable=import-outside-toplevel
      grids = self.point_grids
      if isinstance(grids, np.ndarray) and grids.ndim == 2:
        raise ValueError("point_grids must be a list of (n, 2) arrays, one per crop layer "
                         "(wrap a single grid in a list)")
      checked = []
      for i, g in enumerate(grids):
        g = np.asarray(g, np.float64)
        if g.ndim != 2 or g.shape[1] != 2 or g.shape[0] == 0:
          raise ValueError(f"point_grids[{i}] must be a non-empty (n, 2) array of (x, y) "
                           f"in [0, 1], got shape {g.shape}")
        if not np.all(np.isfinite(g)) or g.min() < 0 or g.max() > 1:
          raise ValueError(f"point_grids[{i}] must lie in [0, 1] (normalised x, y)")
        checked.append(g)
      if len(checked) < self.crop_n_layers + 1:
        raise ValueError(f"point_grids has {len(checked)} grids but crop_n_layers="
                         f"{self.crop_n_layers} needs {self.crop_n_layers + 1} (one per "
                         "layer)")
      object.__setattr__(self, "point_grids", tuple(checked))
    if self.output_mode not in OUTPUT_MODES:
      raise ValueError(f"Unknown output_mode {self.output_mode!r}; expected one of "
                       f"{list(OUTPUT_MODES)}")
    integer("points_per_batch", 1)
    for name in ("pred_iou_thresh", "stability_score_thresh", "stability_score_offset"):
      real(name)
    for name in ("box_nms_thresh", "crop_nms_thresh", "crop_overlap_ratio"):
      real(name, 0.0, 1.0)
    if self.crop_overlap_ratio >= 1.0:
      raise ValueError(f"crop_overlap_ratio must be < 1, got {self.crop_overlap_ratio}")
    real("min_mask_region_area", 0)

  # Grids are arrays: compare and hash by identity-free content.
  def __hash__(self):
    grids = None if self.point_grids is None else tuple(g.tobytes() for g in self.point_grids)
    return hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)
                      if f.name != "point_grids") + (grids,))

  def __eq__(self, other):
    return isinstance(other, AmgOptions) and hash(self) == hash(other)

  def replace(self, **changes) -> "AmgOptions":
    return dataclasses.replace(self, **changes)

  def to_kwargs(self) -> Dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  @classmethod
  def cli_fields(cls) -> Sequence[dataclasses.Field]:
    """Fields the command line exposes (`--points-per-side` ...), in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]

  @classmethod
  def from_namespace(cls, args, **overrides) -> "AmgOptions":
    """Options from parsed CLI arguments named like the fields (plus overrides)."""
    kw = {f.name: getattr(args, f.name) for f in cls.cli_fields() if hasattr(args, f.name)}
    kw.update(overrides)
    return cls(**kw)


DEFAULTS = AmgOptions()
