"""Automatic mask generation: the official `SamAutomaticMaskGenerator`, compiled.

`AutomaticMaskGenerator` prompts SAM with a grid of points (optionally again on
overlapping image crops), filters the masks by predicted IoU, stability and crop
edges, removes duplicates with box NMS and returns SA-1B style records. Options,
outputs and their order follow `segment_anything.SamAutomaticMaskGenerator`; the
formulas (thresholds, tie-breaking, integer/float quirks) are those of
`segment_anything/automatic_mask_generator.py` and `utils/amg.py`.

The device work (`samjax.amg.kernels`) runs per group of crops that share shapes:
the crops' images are embedded by the runtime (`samjax.runtime.Runtime.encode`,
data-parallel over its mesh, parameters placed once per generator), then one
data-parallel call per group decodes every point batch, filters, scores and runs the
box NMS on the device, and a second one upsamples the survivors. Per dispatched group
there are two host round trips (scalars, then masks), independent of the number of
point batches. Groups are pipelined: while the device runs one group, the host unpacks
the masks of the group before it. Records (RLE encoding, the small-region
postprocessing, the crop NMS) are built per image after all groups have run.

Measured parity (tests/test_automatic.py, tiny models): the same masks in the same
order as the official generator, with predicted IoUs within ~1e-6; with the trained
tiny checkpoint and with a synthetic decoder the masks are pixel-identical; with the
randomized decoder ~2% of masks differ by single pixels whose logits lie within
float32 noise of 0 (stability scores within ~4e-5).

Known divergence: above 1000 boxes torchvision's `batched_nms` (CPU) switches to
an algorithm that re-sorts kept boxes with an unstable sort, so the official order
of exactly tied scores is then arbitrary. Within a crop scores are continuous, but
the cross-crop and small-region NMS scores tie massively: with more than 1000 masks
entering those, the official order within ties may differ from ours (always index
order, as torchvision's exact path); the kept masks are the same.
"""


from __future__ import annotations

import collections
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from samjax.amg import utils as amg_utils
from samjax.amg.kernels import (_banded_operator, _bucket_step, _pow2_ceil, band_width,
                                compiled_functions, crop_masks, crop_stats,
                                model_frame_points, sam_decode, size_bucket)
from samjax.amg.options import OUTPUT_MODES, AmgOptions
from samjax.config import SamConfig
from samjax.interop import is_torch
from samjax.io.images import check_rgb_image
from samjax.masks import encode_rle, mask_to_box
from samjax.modeling import MASK_THRESHOLD
from samjax.runtime import Runtime
from samjax.runtime.mesh import device_memory_bytes
from samjax.transforms import ResizeLongestSide

__all__ = ["AutomaticMaskGenerator", "SamAutomaticMaskGenerator", "SAMAutomaticMaskGenerator",
           "AmgOptions", "OUTPUT_MODES", "compiled_functions", "nms_host", "sam_decode",
           "size_bucket", "band_width", "model_frame_points"]

#: Survivors upsampled per `_crop_masks` call (one compilation serves any count).
SURVIVOR_CHUNK = 32
#: Full-resolution logits materialised at once, in float32 elements. On CPU, small
#: chunks that stay in cache measured ~2-4x faster than large ones.
_STATS_BUDGET = {"cpu": 1 << 19}
_STATS_BUDGET_DEFAULT = 1 << 26
DEFAULTS = AmgOptions()


# ----------------------------------------------------------------------------------
# The call shapes (also what `samjax.plan` compiles ahead of time).
# ----------------------------------------------------------------------------------
def layer_point_grids(options: AmgOptions) -> List[np.ndarray]:
  """The point grid of each crop layer (0: the whole image), (N, 2) in [0, 1] of the crop."""
  if options.points_per_side is not None:
    return amg_utils.build_all_layer_point_grids(
        options.points_per_side, options.crop_n_layers, options.crop_n_points_downscale_factor)
  return list(options.point_grids)


def device_batch(points_per_batch: int, n_batches: int, most_points: int) -> int:
  """Prompt slots per decoder call on the device for a group of crops.

  Upstream's batches of `points_per_batch` points; a single batch is only as wide as
  the most points a crop of the group holds (rounded up to a power of two, at least 64,
  so that a huge `points_per_batch` does not make the device decode padding).
  """
  if n_batches > 1:
    return points_per_batch
  return min(points_per_batch, max(64, _pow2_ceil(most_points)))


def stats_mask_chunk(platform: str, bucket: Tuple[int, int]) -> int:
  """Full-resolution masks `crop_stats` materialises at once for a crop-size bucket."""
  budget = _STATS_BUDGET.get(platform, _STATS_BUDGET_DEFAULT)
  chunk = max(1, min(256, budget // (bucket[0] * bucket[1])))
  return 1 << (chunk.bit_length() - 1)


# ----------------------------------------------------------------------------------
# Host-side helpers.
# ----------------------------------------------------------------------------------


def nms_host(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
  """`torchvision.ops.batched_nms` with one category, in NumPy (small inputs).

  Visits boxes by descending score with ties in index order (torchvision's stable
  sort), keeps each unsuppressed box and suppresses later boxes whose float32 IoU
  is > iou_threshold (compared in float64, as the C++ kernel does).

  Args:
    boxes: (n, 4) XYXY boxes (cast to float32).
    scores: (n,) scores (cast to float32).
    iou_threshold: Python float.

  Returns:
    int64 kept indices in output order (descending score).
  """
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  scores = np.asarray(scores, np.float32).reshape(-1)
  n = boxes.shape[0]
  if n == 0:
    return np.zeros((0,), np.int64)
  # -0.0 and 0.0 are equal to torch's sort; make them equal to NumPy's too.
  order = np.argsort(np.where(scores == 0, np.float32(0), -scores), kind="stable")
  x0, y0, x1, y1 = boxes.T
  areas = (x1 - x0) * (y1 - y0)
  suppressed = np.zeros(n, bool)
  keep = []
  zero = np.float32(0)
  with np.errstate(divide="ignore", invalid="ignore"):
    for pos, i in enumerate(order):
      if suppressed[i]:
        continue
      keep.append(i)
      rest = order[pos + 1:]
      rest = rest[~suppressed[rest]]
      if rest.size == 0:
        break
      w = np.maximum(zero, np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]))
      h = np.maximum(zero, np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]))
      inter = w * h
      iou = inter / ((areas[i] + areas[rest]) - inter)
      suppressed[rest[iou.astype(np.float64) > iou_threshold]] = True
  return np.asarray(keep, np.int64)


class _CropMask:
  """A kept mask of one crop, pasted into the image frame on demand."""

  __slots__ = ("masks_t", "index", "box", "image_hw")

  def __init__(self, masks_t: np.ndarray, index: int, box, image_hw):
    self.masks_t, self.index, self.box, self.image_hw = masks_t, index, box, image_hw

  def full(self) -> np.ndarray:
    """(H, W) bool, a transposed view of a (W, H) C-contiguous buffer."""
    m = self.masks_t[self.index]
    img_h, img_w = self.image_hw
    if m.shape == (img_w, img_h):
      return m.T
    x0, y0, x1, y1 = self.box
    out = np.zeros((img_w, img_h), bool)
    out[x0:x1, y0:y1] = m
    return out.T


class _Crop:
  """One crop of one image: host inputs for the device and its results."""

  def __init__(self, image_index: int, crop_index: int, box: List[int], layer: int,
               image: np.ndarray, grid: np.ndarray, transform: ResizeLongestSide):
    self.image_index = image_index
    self.crop_index = crop_index
    self.box = box
    self.layer = layer
    x0, y0, x1, y1 = box
    self.image_hw = image.shape[:2]
    self.hw = (y1 - y0, x1 - x0)
    self.resized = transform.apply_image(image[y0:y1, x0:x1, :])
    self.resized_hw = self.resized.shape[:2]
    # Upstream: grid * [[crop_w, crop_h]] in float64, then ResizeLongestSide coords.
    self.points = grid * np.array(self.hw)[None, ::-1]
    self.input_points = transform.apply_coords(self.points, self.hw)
    self.bucket = (size_bucket(self.hw[0]), size_bucket(self.hw[1]))
    self.result: Optional[Dict[str, Any]] = None


# ----------------------------------------------------------------------------------
# The generator.
# ----------------------------------------------------------------------------------


class AutomaticMaskGenerator:
  """SAM automatic mask generation with the official options and outputs.

  Args:
    model: a `Predictor`, a `SamModel`, or a checkpoint path (Orbax dir or official
      .pth). None with `checkpoint` or a `use_default_sam_*` flag, else ViT-H.
    points_per_side: points along each side of the grid (points_per_side**2 prompts
      for the full image); exclusive with `point_grids`.
    points_per_batch: prompts decoded together. As upstream this also defines the
      batches whose emptiness decides the type quirk of `bbox` (see `generate`).
    pred_iou_thresh: keep masks whose predicted IoU is > this (only if > 0).
    stability_score_thresh: keep masks whose stability score is >= this (only if > 0).
    stability_score_offset: logit offset of the stability score's two thresholds.
    box_nms_thresh: box IoU above which NMS drops a mask within a crop.
    crop_n_layers: extra crop layers; layer i has (2**i)**2 crops.
    crop_nms_thresh: box IoU for NMS between crops (smaller crops preferred).
    crop_overlap_ratio: overlap of layer-1 crops as a fraction of the short side.
    crop_n_points_downscale_factor: layer i uses points_per_side / factor**i points.
    point_grids: explicit per-layer (n, 2) grids in [0, 1] (x, y).
    min_mask_region_area: if > 0, fill holes and remove islands smaller than this
      many pixels (OpenCV), then NMS again.
    output_mode: "binary_mask" (bool HxW), "uncompressed_rle" or "coco_rle".
    checkpoint: checkpoint path (alternative to `model`).
    dtype: compute dtype (jnp.float32 or jnp.bfloat16).
    use_default_sam_h/l/b: official weights (downloaded once) when no model is given.
    device: one JAX device (or platform name such as "cpu", "gpu") to run on.
    devices: JAX devices to split work over (default: all local devices).
    options: an `AmgOptions` holding all the options above at once (then the
      individual option arguments are ignored).
    attention: encoder attention kernels (default: the model's setting).
  """

  def __init__(self, model=None, points_per_side: Optional[int] = DEFAULTS.points_per_side,
               points_per_batch: int = DEFAULTS.points_per_batch,
               pred_iou_thresh: float = DEFAULTS.pred_iou_thresh,
               stability_score_thresh: float = DEFAULTS.stability_score_thresh,
               stability_score_offset: float = DEFAULTS.stability_score_offset,
               box_nms_thresh: float = DEFAULTS.box_nms_thresh,
               crop_n_layers: int = DEFAULTS.crop_n_layers,
               crop_nms_thresh: float = DEFAULTS.crop_nms_thresh,
               crop_overlap_ratio: float = DEFAULTS.crop_overlap_ratio,
               crop_n_points_downscale_factor: int = DEFAULTS.crop_n_points_downscale_factor,
               point_grids: Optional[List[np.ndarray]] = None,
               min_mask_region_area: int = DEFAULTS.min_mask_region_area,
               output_mode: str = DEFAULTS.output_mode, *, options: Optional[AmgOptions] = None,
               checkpoint=None, dtype=jnp.float32, use_default_sam_h: bool = False,
               use_default_sam_l: bool = False, use_default_sam_b: bool = False,
               device=None, devices=None, attention=None):
    from samjax.predictor import Predictor, load_model  # pylint: disable=import-outside-toplevel

    if options is None:
      options = AmgOptions(
          points_per_side=points_per_side, points_per_batch=points_per_batch,
          pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
          stability_score_offset=stability_score_offset, box_nms_thresh=box_nms_thresh,
          crop_n_layers=crop_n_layers, crop_nms_thresh=crop_nms_thresh,
          crop_overlap_ratio=crop_overlap_ratio,
          crop_n_points_downscale_factor=crop_n_points_downscale_factor,
          point_grids=None if point_grids is None else tuple(point_grids),
          min_mask_region_area=min_mask_region_area, output_mode=output_mode)
    elif not isinstance(options, AmgOptions):
      raise ValueError(f"options must be an AmgOptions, got {type(options).__name__}")
    self.options = options
    if options.output_mode == "coco_rle":
      from pycocotools import mask as _  # noqa: F401  pylint: disable=import-outside-toplevel
    if options.min_mask_region_area > 0:
      import cv2 as _  # noqa: F401  pylint: disable=import-outside-toplevel
    self.point_grids = layer_point_grids(options)
    self.points_per_side = options.points_per_side
    self.points_per_batch = options.points_per_batch
    self.pred_iou_thresh = options.pred_iou_thresh
    self.stability_score_thresh = options.stability_score_thresh
    self.stability_score_offset = options.stability_score_offset
    self.box_nms_thresh = options.box_nms_thresh
    self.crop_n_layers = options.crop_n_layers
    self.crop_nms_thresh = options.crop_nms_thresh
    self.crop_overlap_ratio = options.crop_overlap_ratio
    self.crop_n_points_downscale_factor = options.crop_n_points_downscale_factor
    self.min_mask_region_area = options.min_mask_region_area
    self.output_mode = options.output_mode

    if isinstance(model, Predictor):
      self.predictor = model
    else:
      sam = load_model(model, checkpoint, None, dtype, use_default_sam_h, use_default_sam_l,
                       use_default_sam_b, attention=attention)
      self.predictor = Predictor(sam)
    self.model = self.predictor.model
    self.config: SamConfig = self.model.config
    self.transform = ResizeLongestSide(self.config.image_size)

    if devices is None and device is not None:
      resolved = _resolve_device(device)
      devices = None if resolved is None else [resolved]
    #: Where the crops run: the model's config, dtype and attention setting (unless
    #: `attention` is given) over a data mesh of `devices` (default: all local ones).
    self.runtime = Runtime(
        self.config, dtype=self.model.dtype, devices=list(devices) if devices else None,
        attention=attention if attention is not None else self.model.attention_request)
    self.mesh = self.runtime.mesh
    self.num_devices = self.runtime.num_devices
    self._params = None  # placed lazily, once
    platform = self.runtime.platform
    #: Crops per device per device call (bounds device memory; CPU gains nothing).
    self.crops_per_device = 1 if platform == "cpu" else 4
    # Host and device share memory on CPU: packing bits would only add work.
    self._pack_masks = platform != "cpu"
    #: The decoder, (params, emb, points, labels, config, dtype) -> (logits, iou).
    #: Tests substitute synthetic decoders here; it must be a hashable function.
    self.decode_fn: Callable = sam_decode

  # ------------------------------------------------------------------ public API
  def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
    """Masks for one image.

    Args:
      image: (H, W, 3) uint8 RGB image.

    Returns:
      A list of records (official keys and order): `segmentation` (bool HxW array,
      or an RLE dict per `output_mode`), `area` (int pixels), `bbox` (XYWH list, the
      width/height measured to the inclusive max pixel, as upstream), `predicted_iou`
      (float), `point_coords` ([[x, y]] floats), `stability_score` (float) and
      `crop_box` (XYWH list). As upstream, `bbox` holds floats instead of ints when
      some point batch of some crop had no mask left after the score filters, and
      `crop_box` does when several crops were run and one of them kept no mask.
    """
    return self.generate_batch([check_rgb_image(image, "generate")])[0]

  def generate_batch(self, images: Sequence[np.ndarray]) -> List[List[Dict[str, Any]]]:
    """`generate` for several images (sizes may differ), sharing device calls.

    The crops of all images are embedded in batched encoder calls split over the
    generator's devices, and each group of same-shaped crops runs the per-crop
    pipeline in one data-parallel call.

    Args:
      images: sequence of (H, W, 3) uint8 RGB images.

    Returns:
      One record list per image, each equal to `generate(image)`.
    """
    if isinstance(images, np.ndarray) and images.ndim == 3:
      raise ValueError("generate_batch expects a list of images; use generate() for one")
    images = [check_rgb_image(im, f"generate_batch: image {i}") for i, im in enumerate(images)]
    if not images:
      return []
    crops_by_image = []
    for i, image in enumerate(images):
      boxes, layers = amg_utils.generate_crop_boxes(image.shape[:2], self.crop_n_layers,
                                                    self.crop_overlap_ratio)
      crops_by_image.append([
          _Crop(i, k, box, layer, image, self.point_grids[layer], self.transform)
          for k, (box, layer) in enumerate(zip(boxes, layers))])
    self._run_crops([c for crops in crops_by_image for c in crops])
    return [self._finish_image(crops) for crops in crops_by_image]

  __call__ = generate

  # ------------------------------------------------------------------ device work
  def _replicated_params(self):
    if self._params is None:
      self._params = self.runtime.place(self.model.params)
    return self._params

  def _thresholds(self) -> Tuple[np.ndarray, np.ndarray]:
    # Python-float sums first (upstream adds mask_threshold and the offset as
    # floats), then float32 as torch rounds scalars compared with float32 tensors.
    thr = np.array([
        self.pred_iou_thresh, self.stability_score_thresh,
        MASK_THRESHOLD + self.stability_score_offset,
        MASK_THRESHOLD - self.stability_score_offset,
        0.0, 0.0], np.float32)
    # torchvision compares its float32 IoU with the double threshold.
    strict_f32 = amg_utils._strict_threshold_f32  # pylint: disable=protected-access
    thr[4] = strict_f32(self.box_nms_thresh)
    flags = np.array([self.pred_iou_thresh > 0.0, self.stability_score_thresh > 0.0])
    return thr, flags

  def _run_crops(self, crops: List[_Crop]) -> None:
    """Runs all crops through the device pipeline; fills each `crop.result`."""
    groups: Dict[Tuple, List[_Crop]] = collections.OrderedDict()
    for c in crops:
      n_batches = -(-len(c.points) // self.points_per_batch)
      groups.setdefault((n_batches,) + c.bucket, []).append(c)
    calls = []
    for (n_batches, *_), g in groups.items():
      per_call = self.num_devices * self._crops_per_device_that_fit(n_batches, g)
      calls += [g[i:i + per_call] for i in range(0, len(g), per_call)]
    # Three-stage pipeline: while the host post-processes call k-2, the device runs
    # call k; call k-1's scalars decide its survivor upsampling.
    dispatched, upsampling = collections.deque(), collections.deque()
    for call in calls:
      dispatched.append(self._dispatch_stats(call))
      if len(dispatched) > 1:
        upsampling.append(self._dispatch_masks(dispatched.popleft()))
      if len(upsampling) > 1:
        self._collect(upsampling.popleft())
    while dispatched:
      upsampling.append(self._dispatch_masks(dispatched.popleft()))
    while upsampling:
      self._collect(upsampling.popleft())

  def _device_batch(self, n_batches: int, crops: List[_Crop]) -> int:
    """Prompt slots per decoder call on the device (`device_batch`)."""
    return device_batch(self.points_per_batch, n_batches, max(len(c.points) for c in crops))

  def _crops_per_device_that_fit(self, n_batches: int, crops: List[_Crop]) -> int:
    """Crops per device per call whose low-res logits fit the device; else a clear error.

    The crop pipeline keeps every mask's (L, L) float32 low-res logits of a call on the
    device (the survivors are upsampled from them), 3 masks per prompt slot.
    """
    lr = self.config.low_res_mask_size
    per_crop = n_batches * self._device_batch(n_batches, crops) * 3 * lr * lr * 4
    budget = int(0.6 * device_memory_bytes(self.runtime.mesh.devices.flat[0]))
    for k in range(self.crops_per_device, 0, -1):
      if k * per_crop <= budget:
        return k
    raise ValueError(
        f"these generator settings need {per_crop / 2**30:.1f} GiB of low-res logits per "
        f"crop on the device ({n_batches * self._device_batch(n_batches, crops)} prompt "
        f"slots x 3 masks x {lr}x{lr} float32), more than 60% of the "
        f"{device_memory_bytes(self.runtime.mesh.devices.flat[0]) / 2**30:.1f} GiB "
        f"available; lower points_per_side (now {self.points_per_side}) or pass fewer "
        "point_grids points")

  def _dispatch_stats(self, crops: List[_Crop]) -> Dict[str, Any]:
    cfg = self.config
    s, lr = cfg.image_size, cfg.low_res_mask_size
    per_device = _pow2_ceil(-(-len(crops) // self.num_devices))
    b = self.num_devices * per_device
    # Padding slots repeat the last crop; their results are dropped.
    padded = crops + [crops[-1]] * (b - len(crops))
    n_batches = -(-len(crops[0].points) // self.points_per_batch)
    hb, wb = crops[0].bucket
    ppb = self._device_batch(n_batches, crops)
    images = np.zeros((b, s, s, 3), np.uint8)
    valid_hw = np.zeros((b, 2), np.int32)
    points = np.zeros((b, n_batches * ppb, 2), np.float32)
    point_valid = np.zeros((b, n_batches * ppb), bool)
    block_h, block_w = _bucket_step(hb), _bucket_step(wb)
    band_h = band_width(hb, wb, block_h, lr)
    band_w = band_width(hb, wb, block_w, lr)
    rows = (np.zeros((b, hb // block_h), np.int32),
            np.zeros((b, hb // block_h, block_h, band_h), np.float32))
    cols = (np.zeros((b, wb // block_w), np.int32),
            np.zeros((b, wb // block_w, block_w, band_w), np.float32))
    crop_box = np.zeros((b, 4), np.int32)
    orig_box = np.zeros((b, 4), np.int32)
    n_pad = np.zeros((b,), np.int32)
    for i, c in enumerate(padded):
      rh, rw = c.resized_hw
      images[i, :rh, :rw] = c.resized
      valid_hw[i] = (rh, rw)
      n = len(c.input_points)
      points[i, :n] = model_frame_points(c.input_points, s)
      point_valid[i, :n] = True
      rows[0][i], rows[1][i] = _banded_operator(c.hw[0], rh, hb, s, lr, block_h, band_h)
      cols[0][i], cols[1][i] = _banded_operator(c.hw[1], rw, wb, s, lr, block_w, band_w)
      crop_box[i] = c.box
      orig_box[i] = (0, 0, c.image_hw[1], c.image_hw[0])
      n_pad[i] = hb * wb - c.hw[0] * c.hw[1]
    rt = self.runtime
    params = self._replicated_params()
    emb = rt.encode(params, images, valid_hw)
    rows, cols = rt.shard(rows), rt.shard(cols)
    mask_chunk = stats_mask_chunk(rt.platform, (hb, wb))
    thr, flags = self._thresholds()
    out = crop_stats(
        params, emb, *rt.shard((points.reshape(b, n_batches, ppb, 2),
                                point_valid.reshape(b, n_batches, ppb))), rows, cols,
        *rt.shard((crop_box, orig_box, n_pad)), thr, flags, rt=rt,
        decode_fn=self.decode_fn, mask_chunk=mask_chunk)
    return {"crops": crops, "b": b, "out": out, "rows": rows, "cols": cols,
            "mask_chunk": mask_chunk}

  def _dispatch_masks(self, st: Dict[str, Any]) -> Dict[str, Any]:
    out = st.pop("out")
    low_res = out.pop("low_res")
    st["scalars"] = scalars = jax.device_get(out)  # round trip 1: scalars, NMS order
    n = scalars["iou"].shape[1]
    chunk = min(SURVIVOR_CHUNK, n)
    n_keep = scalars["n_keep"][:len(st["crops"])]
    n_chunks = -(-int(n_keep.max()) // chunk)
    order = scalars["order"]
    if n_chunks * chunk > n:
      order = np.concatenate([order, np.zeros((order.shape[0], n_chunks * chunk - n),
                                              order.dtype)], axis=1)
    st["packed"] = [
        crop_masks(low_res, self.runtime.shard(order[:, k * chunk:(k + 1) * chunk]),
                   st["rows"], st["cols"], rt=self.runtime, pack=self._pack_masks,
                   mask_chunk=st["mask_chunk"])
        for k in range(n_chunks)]
    del st["rows"], st["cols"]
    return st

  def _collect(self, st: Dict[str, Any]) -> None:
    packed = jax.device_get(st["packed"])  # round trip 2: survivor masks
    sc = st["scalars"]
    for i, c in enumerate(st["crops"]):
      k = int(sc["n_keep"][i])
      kept = sc["order"][i, :k].astype(np.int64)
      h, w = c.hw
      x0, y0, x1, y1 = c.box
      img_h, img_w = c.image_hw
      # Masks in the crop frame, stored transposed, (k, w, h) C-contiguous: each
      # mask's column-major flattening (the RLE order) is then contiguous. They are
      # pasted into the image frame only for the masks that survive to the records
      # (`_CropMasks.full`), so memory follows the crop sizes, not crops x image.
      crop_t = np.empty((k, w, h), bool)
      for j, chunk in enumerate(packed):
        start = j * chunk.shape[1]
        if start >= k:
          break
        part = chunk[i, :k - start, :w]
        if self._pack_masks:
          part = np.unpackbits(part, axis=-1, count=h).view(bool)
        crop_t[start:start + len(part)] = part[:, :, :h]
      n_batches = -(-len(c.points) // self.points_per_batch)
      c.result = {
          "masks_t": crop_t,
          "boxes": sc["boxes"][i][kept].astype(np.int64) + np.array([x0, y0, x0, y0]),
          "iou_preds": sc["iou"][i][kept],
          "stability_score": sc["stability"][i][kept],
          "points": c.points[kept // 3] + np.array([x0, y0], np.float64),
          # Upstream quirk: a point batch with no mask after the score filters gets
          # float32 zero boxes, and concatenation then makes all boxes float32.
          "float_boxes": bool(np.any(sc["batch_pass"][i][:n_batches] == 0)),
      }

  # ------------------------------------------------------------------ host work
  def _finish_image(self, crops: List[_Crop]) -> List[Dict[str, Any]]:
    """Concatenates crops, crop NMS, small-region postprocessing, records.

    Upstream run-length encodes every mask as soon as it is produced; the encoding
    of a mask is a function of its pixels, so encoding only the final masks (from
    the arrays we keep) gives the same records.
    """
    crops = sorted(crops, key=lambda c: c.crop_index)
    res = [c.result for c in crops]
    counts = [len(r["masks_t"]) for r in res]
    # Lazy (H, W) masks in the image frame, column-major like upstream's `rle_to_mask`.
    masks = [_CropMask(r["masks_t"], j, c.box, c.image_hw)
             for c, r in zip(crops, res) for j in range(len(r["masks_t"]))]
    float_boxes = any(r["float_boxes"] for r in res)
    boxes = np.concatenate([r["boxes"] for r in res]).astype(
        np.float32 if float_boxes else np.int64)
    iou_preds = np.concatenate([r["iou_preds"] for r in res])
    stability = np.concatenate([r["stability_score"] for r in res])
    points = np.concatenate([r["points"] for r in res])
    # Upstream builds an empty crop's `crop_boxes` with torch.tensor([]) (float32),
    # which turns the concatenation float32.
    float_crops = len(crops) > 1 and min(counts) == 0
    crop_boxes = np.array([c.box for c, n in zip(crops, counts) for _ in range(n)],
                          np.float32 if float_crops else np.int64).reshape(-1, 4)

    if len(crops) > 1 and masks:
      # Prefer masks from smaller crops: score 1 / area in float32, ties (whole crops)
      # broken by concatenation order.
      cb = crop_boxes.astype(np.float32)
      scores = np.float32(1) / ((cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1]))
      keep = nms_host(boxes, scores, self.crop_nms_thresh)
      masks = [masks[i] for i in keep]
      boxes, iou_preds, stability = boxes[keep], iou_preds[keep], stability[keep]
      points, crop_boxes = points[keep], crop_boxes[keep]

    if self.min_mask_region_area > 0 and masks:
      keep, masks, boxes = self._postprocess_small_regions([m.full() for m in masks], boxes)
      iou_preds, stability = iou_preds[keep], stability[keep]
      points, crop_boxes = points[keep], crop_boxes[keep]

    records = []
    for i, mask in enumerate(masks):
      if isinstance(mask, _CropMask):
        mask = mask.full()  # one at a time: RLE outputs never hold all full masks
      if self.output_mode == "coco_rle":
        seg = encode_rle(mask)
      elif self.output_mode == "binary_mask":
        seg = mask
      else:
        seg = amg_utils.mask_to_rle(mask)
      records.append({
          "segmentation": seg,
          "area": int(np.count_nonzero(mask)),  # == upstream's sum of the odd RLE runs
          "bbox": amg_utils.box_xyxy_to_xywh(boxes[i]).tolist(),
          "predicted_iou": float(iou_preds[i]),
          "point_coords": [points[i].tolist()],
          "stability_score": float(stability[i]),
          "crop_box": amg_utils.box_xyxy_to_xywh(crop_boxes[i]).tolist(),
      })
    return records

  def _postprocess_small_regions(self, masks, boxes):
    """Upstream `postprocess_small_regions`: holes, islands, then NMS on 0/1 scores.

    Returns the kept indices (NMS order), their masks, and their boxes (recomputed
    only for changed masks, as upstream).
    """
    new_masks, scores, new_boxes = [], [], []
    for mask in masks:
      mask, changed = amg_utils.remove_small_regions(mask, self.min_mask_region_area, "holes")
      unchanged = not changed
      mask, changed = amg_utils.remove_small_regions(mask, self.min_mask_region_area,
                                                     "islands")
      unchanged = unchanged and not changed
      new_masks.append(mask)
      # Unchanged masks win NMS ties over post-processed ones.
      scores.append(float(unchanged))
      new_boxes.append(mask_to_box(mask))
    keep = nms_host(np.stack(new_boxes), np.asarray(scores, np.float32),
                    max(self.box_nms_thresh, self.crop_nms_thresh))
    boxes = boxes.copy()
    for i in keep:
      if scores[i] == 0.0:
        boxes[i] = new_boxes[i]
    return keep, [new_masks[i] if scores[i] == 0.0 else masks[i] for i in keep], boxes[keep]


def _resolve_device(device):
  """A jax.Device from a device or a platform string ("cpu", "gpu", "cuda:1", "tpu").

  Returns None (= all default devices, with a warning) for a platform JAX lacks here.
  """
  if isinstance(device, jax.Device):
    return device
  if isinstance(device, str):
    name, _, index = device.partition(":")
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(name, name)
    try:
      devs = jax.local_devices(backend=platform)
    except RuntimeError:
      # Code written for the official package says device="cuda"; on a machine without
      # that backend we run where JAX runs rather than refuse (and say so).
      import warnings
      warnings.warn(f"device {device!r} is not available to JAX; using the default "
                    f"devices ({jax.default_backend()}) instead", stacklevel=3)
      return None
    i = int(index) if index else 0
    if i >= len(devs):
      raise ValueError(f"device {device!r} does not exist ({len(devs)} {platform} devices)")
    return devs[i]
  if is_torch(device):  # torch.device("cpu"), ...
    return _resolve_device(str(device))
  raise ValueError(f"cannot use {device!r} as a JAX device")


# Names used by the official package and the sssegmentation document.
SamAutomaticMaskGenerator = AutomaticMaskGenerator
SAMAutomaticMaskGenerator = AutomaticMaskGenerator
