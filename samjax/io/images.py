"""Reading image files as uint8 RGB, safely, the way the official SAM scripts do.

`load_image(path)` (or `decode_image(data)` for bytes in memory) returns what
`cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)` returns, the loading of the
official `scripts/amg.py`: OpenCV's `IMREAD_COLOR` decoding does the colour work
(16-bit -> high byte, grey -> RGB, alpha dropped without compositing) and turns the
image upright per its EXIF orientation tag. We only add what `imread` lacks:

* Size limit before decoding: `read_image_size` parses the headers of the formats
  OpenCV decodes (`HEADER_FORMATS`: all those of the opencv-python 5.0 build, and
  OpenEXR for builds that have it) without decoding pixels, so a decompression bomb
  (a tiny file claiming 100000 x 100000 pixels) is refused before any memory is
  allocated for it. With a limit set, a file whose size cannot be read from its
  header is refused rather than decoded blindly.
* Truncated JPEGs: older OpenCV builds decode them into a half-grey image with only
  a warning (5.0 returns nothing); a JPEG without its end-of-image marker is refused
  with that reason.
* Errors with a reason (`BadImageError.reason`) instead of `None`.
* Files are read by Python and decoded from memory (`cv2.imdecode`), so non-ASCII
  paths work on every platform.

`check_rgb_image` is the one validation of an image handed to the model: a numpy
(or torch) uint8 (H, W, 3) array.
"""

from __future__ import annotations

import os
import re
import struct
from typing import Any, BinaryIO, Callable, Iterator, NamedTuple, Optional, Tuple, Union

import numpy as np

from samjax.interop import is_torch, to_numpy

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_MAX_PIXELS = 100_000_000  # 100 MP; SA-1B images are ~3.4 MP.

# Formats whose pixel size `read_image_size` reads from the header.
HEADER_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WebP", "TIFF", "Radiance HDR", "PFM",
                  "PNM", "PAM", "Sun raster", "JPEG 2000", "OpenEXR", "AVIF")
# Formats that OpenCV builds may lack (then decoding fails although the header is fine).
_OPTIONAL_DECODERS = ("WebP", "TIFF", "JPEG 2000", "OpenEXR", "AVIF", "GIF")


class BadImageError(Exception):
  """An input that cannot be turned into an RGB image.

  Attributes:
    reason: short human-readable explanation (written to a bulk job's failures file).
  """

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


class ImageSize(NamedTuple):
  """What an image header says: the format, and the size in pixels (None if unreadable)."""
  format: str
  width: Optional[int]
  height: Optional[int]


# ------------------------------------------------------------------------ header parsing


def _jpeg_header(data: bytes) -> Tuple[list, str]:
  """Walks a JPEG's header segments up to the first start-of-scan.

  Returns:
    ([(marker, offset of its FF), ...], why the walk stopped): "sos" (start of
    scan reached, included), "eoi" (end of image, included), "malformed" (no marker
    where one must be) or "end" (the data ends inside the header).
  """
  segments, n, pos = [], len(data), 2
  while pos + 4 <= n:
    if data[pos] != 0xFF:
      return segments, "malformed"
    marker = data[pos + 1]
    if marker == 0xFF:  # Fill byte.
      pos += 1
      continue
    segments.append((marker, pos))
    if marker == 0xDA:
      return segments, "sos"
    if marker == 0xD9:
      return segments, "eoi"
    if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # Markers without a length.
      pos += 2
    else:
      pos += 2 + ((data[pos + 2] << 8) | data[pos + 3])
  return segments, "end"


_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
                       0xCE, 0xCF})


def jpeg_is_truncated(data: bytes) -> bool:
  """Whether a JPEG stream ends before its end-of-image (EOI, FF D9) marker.

  Some OpenCV builds decode a truncated JPEG into a half-grey image with only a
  warning, so completeness is checked here. The header segments are walked to the
  first start-of-scan (so an EXIF thumbnail's own EOI does not count); after it,
  entropy-coded data byte-stuffs every FF, so FF D9 can only be the real EOI (or lie
  in data appended after it, which is fine). A malformed header is left to the
  decoder.
  """
  segments, stop = _jpeg_header(data)
  if stop == "sos":
    return data.find(b"\xff\xd9", segments[-1][1]) < 0
  return stop == "end"


def _jpeg_size(data: bytes) -> Tuple[Optional[int], Optional[int]]:
  for marker, pos in _jpeg_header(data)[0]:
    if marker in _JPEG_SOF and pos + 9 <= len(data):
      height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
      # Height 0 means "given later by a DNL marker", which libjpeg does not support.
      return (width, height) if height else (None, None)
  return None, None


def _tiff_size(data: bytes) -> Tuple[Optional[int], Optional[int]]:
  """Width and height from the first IFD (the image OpenCV decodes), classic or BigTIFF."""
  e = "<" if data[:2] == b"II" else ">"
  big = struct.unpack(e + "H", data[2:4])[0] == 43
  if big:
    ifd = struct.unpack(e + "Q", data[8:16])[0]
    count_fmt, entry_size, count_size = "Q", 20, 8
  else:
    ifd = struct.unpack(e + "I", data[4:8])[0]
    count_fmt, entry_size, count_size = "H", 12, 2
  (count,) = struct.unpack(e + count_fmt, data[ifd:ifd + count_size])
  found = {}
  for i in range(min(count, 4096)):
    at = ifd + count_size + i * entry_size
    tag, typ = struct.unpack(e + "HH", data[at:at + 4])
    if tag not in (256, 257):
      continue
    value_at = at + (12 if big else 8)
    fmt = {3: "H", 4: "I", 16: "Q"}.get(typ)
    if fmt is None:
      continue
    found[tag] = struct.unpack(e + fmt, data[value_at:value_at + struct.calcsize(fmt)])[0]
  return found.get(256), found.get(257)


def _webp_size(data: bytes) -> Tuple[Optional[int], Optional[int]]:
  chunk = data[12:16]
  if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
    w, h = struct.unpack("<HH", data[26:30])
    return w & 0x3FFF, h & 0x3FFF
  if chunk == b"VP8L" and data[20] == 0x2F:
    bits = struct.unpack("<I", data[21:25])[0]
    return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
  if chunk == b"VP8X":
    w = int.from_bytes(data[24:27], "little") + 1
    h = int.from_bytes(data[27:30], "little") + 1
    return w, h
  return None, None


_HDR_RES = re.compile(rb"([-+])([XY]) +(\d+) +([-+])([XY]) +(\d+)")


def _hdr_size(data: bytes) -> Tuple[Optional[int], Optional[int]]:
  """Radiance RGBE: text header lines, a blank line, then e.g. "-Y 480 +X 640"."""
  end = data.find(b"\n\n", 0, 1 << 16)
  if end < 0:
    return None, None
  m = _HDR_RES.match(data, end + 2)
  if not m:
    return None, None
  first, second = int(m.group(3)), int(m.group(6))
  return (second, first) if m.group(2) == b"Y" else (first, second)


def _pnm_tokens(data: bytes, count: int) -> list:
  """The first `count` whitespace-separated header tokens after the 2-byte magic."""
  tokens, pos, n = [], 2, min(len(data), 4096)
  while len(tokens) < count and pos < n:
    c = data[pos:pos + 1]
    if c == b"#":
      nl = data.find(b"\n", pos)
      pos = n if nl < 0 else nl + 1
    elif c.isspace():
      pos += 1
    else:
      start = pos
      while pos < n and not data[pos:pos + 1].isspace() and data[pos:pos + 1] != b"#":
        pos += 1
      tokens.append(data[start:pos])
  return tokens


def _pnm_size(data: bytes) -> Tuple[Optional[int], Optional[int]]:
  w, h = _pnm_tokens(data, 2)
  return int(w), int(h)


def _pam_size(data: bytes) -> Tuple[Optional[int], Optional[int]]:
  head = data[:4096]
  end = head.find(b"ENDHDR")
  fields = {}
  for line in head[:end if end >= 0 else len(head)].splitlines()[1:]:
    parts = line.split()
    if len(parts) >= 2 and not line.startswith(b"#"):
      fields[parts[0]] = parts[1]
  return int(fields[b"WIDTH"]), int(fields[b"HEIGHT"])


def _isobmff_boxes(data: bytes, start: int, end: int) -> Iterator[Tuple[bytes, int, int]]:
  """(type, payload start, payload end) of the boxes in data[start:end]."""
  pos = start
  while pos + 8 <= end:
    size, kind = struct.unpack(">I4s", data[pos:pos + 8])
    header = 8
    if size == 1:
      size, header = struct.unpack(">Q", data[pos + 8:pos + 16])[0], 16
    elif size == 0:
      size = end - pos
    if size < header:
      return
    yield kind, pos + header, min(pos + size, end)
    pos += size


def _jp2_size(data: bytes) -> Tuple[Optional[int], Optional[int]]:
  if data[:4] == b"\xff\x4f\xff\x51":  # Raw codestream: the SIZ segment follows SOC.
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", data[8:24])
    return xsiz - xosiz, ysiz - yosiz
  for kind, start, end in _isobmff_boxes(data, 0, len(data)):
    if kind == b"jp2h":
      for sub, s, _ in _isobmff_boxes(data, start, end):
        if sub == b"ihdr":
          h, w = struct.unpack(">II", data[s:s + 8])
          return w, h
  return None, None


def _avif_size(data: bytes) -> Tuple[Optional[int], Optional[int]]:
  """The largest `ispe` (image spatial extents) property: an upper bound on the output.

  Every image item (the primary one, a grid's tiles, alpha planes, thumbnails) has an
  `ispe`; the primary image is the largest of them.
  """
  best = None
  for kind, start, end in _isobmff_boxes(data, 0, len(data)):
    if kind != b"meta":
      continue
    for sub, s, e in _isobmff_boxes(data, start + 4, end):  # meta is a full box.
      if sub != b"iprp":
        continue
      for sub2, s2, e2 in _isobmff_boxes(data, s, e):
        if sub2 != b"ipco":
          continue
        for prop, s3, _ in _isobmff_boxes(data, s2, e2):
          if prop == b"ispe":
            w, h = struct.unpack(">II", data[s3 + 4:s3 + 12])
            if best is None or w * h > best[0] * best[1]:
              best = (w, h)
  return best if best is not None else (None, None)


def _exr_size(data: bytes) -> Tuple[Optional[int], Optional[int]]:
  """OpenEXR: attributes (name\\0 type\\0 int32 size, value) after the 8-byte magic+version."""
  pos, n = 8, len(data)
  while pos < n and data[pos] != 0:
    name_end = data.index(b"\0", pos)
    type_end = data.index(b"\0", name_end + 1)
    (size,) = struct.unpack("<i", data[type_end + 1:type_end + 5])
    value = type_end + 5
    if data[pos:name_end] == b"dataWindow" and data[name_end + 1:type_end] == b"box2i":
      x0, y0, x1, y1 = struct.unpack("<iiii", data[value:value + 16])
      return x1 - x0 + 1, y1 - y0 + 1
    pos = value + size
  return None, None


def _sniff(data: bytes) -> Optional[str]:
  """The format named by the file's magic bytes (what OpenCV also goes by), or None."""
  if data[:8] == b"\x89PNG\r\n\x1a\n":
    return "PNG"
  if data[:3] == b"\xff\xd8\xff":
    return "JPEG"
  if data[:2] == b"BM":
    return "BMP"
  if data[:6] in (b"GIF87a", b"GIF89a"):
    return "GIF"
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return "WebP"
  if data[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
    return "TIFF"
  if data[:10] == b"#?RADIANCE" or data[:6] == b"#?RGBE":
    return "Radiance HDR"
  if data[:2] in (b"PF", b"Pf") and data[2:3].isspace():
    return "PFM"
  if data[:1] == b"P" and data[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6") and \
      data[2:3].isspace():
    return "PNM"
  if data[:3] == b"P7\n":
    return "PAM"
  if data[:4] == b"\x59\xa6\x6a\x95":
    return "Sun raster"
  if data[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or data[:4] == b"\xff\x4f\xff\x51":
    return "JPEG 2000"
  if data[:4] == b"\x76\x2f\x31\x01":
    return "OpenEXR"
  if data[4:8] == b"ftyp" and (b"avif" in data[8:64] or b"avis" in data[8:64]):
    return "AVIF"
  return None


_PARSERS = {
    "PNG": lambda d: struct.unpack(">II", d[16:24]) if d[12:16] == b"IHDR" else (None, None),
    "JPEG": _jpeg_size,
    "BMP": lambda d: (struct.unpack("<HH", d[18:22]) if struct.unpack("<I", d[14:18])[0] == 12
                      else tuple(abs(v) for v in struct.unpack("<ii", d[18:26]))),
    "GIF": lambda d: struct.unpack("<HH", d[6:10]),
    "WebP": _webp_size,
    "TIFF": _tiff_size,
    "Radiance HDR": _hdr_size,
    "PFM": _pnm_size,
    "PNM": _pnm_size,
    "PAM": _pam_size,
    "Sun raster": lambda d: struct.unpack(">II", d[4:12]),
    "JPEG 2000": _jp2_size,
    "OpenEXR": _exr_size,
    "AVIF": _avif_size,
}
assert set(_PARSERS) == set(HEADER_FORMATS)


def read_image_size(data: bytes) -> Optional[ImageSize]:
  """The format and pixel size an encoded image declares, without decoding it.

  Args:
    data: the file's bytes (the start of the file is enough for every format but
      JPEG and TIFF, whose size may sit after metadata).

  Returns:
    None if the format is not one of `HEADER_FORMATS`; else `ImageSize` whose width
    and height are None when the header is cut short or malformed. The size is the
    stored one: an EXIF rotation swaps width and height, never their product.
  """
  fmt = _sniff(data)
  if fmt is None:
    return None
  try:
    w, h = _PARSERS[fmt](data)
  except (struct.error, IndexError, ValueError, KeyError):
    w = h = None
  if w is None or h is None or w <= 0 or h <= 0:
    return ImageSize(fmt, None, None)
  return ImageSize(fmt, int(w), int(h))


# ---------------------------------------------------------------------------- decoding


def _check_pixels(width: int, height: int, max_pixels: Optional[int]) -> None:
  if max_pixels is not None and width * height > max_pixels:
    raise BadImageError(f"image too large: {width}x{height} = {width * height} pixels > "
                        f"max_pixels={max_pixels}")


def decode_image(data: bytes, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 exif_orientation: bool = True) -> np.ndarray:
  """Encoded image bytes -> uint8 RGB, or `BadImageError` with a reason.

  Args:
    data: the encoded file.
    max_pixels: refuse images with more than this many pixels (height * width),
      checked from the header before decoding; formats whose header cannot be read
      are then refused. None: no limit beyond OpenCV's own (`OPENCV_IO_MAX_IMAGE_PIXELS`).
    exif_orientation: turn the image upright per its EXIF orientation tag, as
      `cv2.imread` does. False passes `IMREAD_IGNORE_ORIENTATION`, which OpenCV's TIFF
      decoder does not honour: TIFFs always come out upright.

  Returns:
    (H, W, 3) uint8 RGB array, C-contiguous; equal to
    `cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)` for the same file
    (tests/test_io_images.py). One exception: OpenCV 5.0.0's `imread` fails on TIFFs
    with orientation 5..8, which `imdecode` returns upright, as Pillow's
    `ImageOps.exif_transpose` does.

  Raises:
    BadImageError: empty, unreadable, truncated, unsupported or too large.
  """
  import cv2  # pylint: disable=import-outside-toplevel

  if not data:
    raise BadImageError("zero-size file")
  header = read_image_size(data)
  if header is not None and header.width is None:
    raise BadImageError(f"corrupt or truncated {header.format} header (no image size)")
  if header is not None:
    _check_pixels(header.width, header.height, max_pixels)
  elif max_pixels is not None:
    raise BadImageError("unreadable: not an image format whose size can be checked before "
                        f"decoding ({', '.join(HEADER_FORMATS)}), or corrupt; without a pixel "
                        "limit (max_pixels=None) OpenCV would still try it")
  if header is not None and header.format == "JPEG" and jpeg_is_truncated(data):
    raise BadImageError("truncated JPEG (no end-of-image marker)")

  flags = cv2.IMREAD_COLOR
  if not exif_orientation:
    flags |= cv2.IMREAD_IGNORE_ORIENTATION
  try:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
  except cv2.error as e:  # E.g. over OpenCV's own pixel limit.
    raise BadImageError(f"decoder error: {str(e).strip().splitlines()[-1]}") from e
  if img is None:
    if header is None:
      raise BadImageError("unreadable: not a supported image format, or corrupt")
    hint = (f", or this OpenCV build cannot decode {header.format}"
            if header.format in _OPTIONAL_DECODERS else "")
    raise BadImageError(f"corrupt or truncated {header.format} data (decoder failed{hint})")
  if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8 or 0 in img.shape:
    raise BadImageError(f"decoder returned an unusable array {img.dtype} {img.shape}")
  # A header can understate what the decoder produced (e.g. a lying IFD); check again.
  _check_pixels(img.shape[1], img.shape[0], max_pixels)
  return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


# Bytes read first: every header parser needs at most this much except JPEG and TIFF,
# whose size can sit after large metadata (then the whole file is read).
_HEADER_BYTES = 1 << 16

# Extensions -> the format their content should have (for messages only: the content
# decides how a file is decoded, as for `cv2.imread`).
_EXTENSION_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP",
                      ".gif": "GIF", ".webp": "WebP", ".tif": "TIFF", ".tiff": "TIFF",
                      ".hdr": "Radiance HDR", ".pic": "Radiance HDR", ".pfm": "PFM",
                      ".jp2": "JPEG 2000", ".exr": "OpenEXR", ".avif": "AVIF",
                      ".ras": "Sun raster", ".sr": "Sun raster", ".pam": "PAM",
                      ".pbm": "PNM", ".pgm": "PNM", ".ppm": "PNM", ".pnm": "PNM"}


def _misnamed(path: str, header: Optional[ImageSize]) -> str:
  """" (a Radiance HDR file named .png)" when the content is not what the name says."""
  ext = os.path.splitext(path)[1].lower()
  expected = _EXTENSION_FORMATS.get(ext)
  if header is None or expected is None or expected == header.format:
    return ""
  return f" (a {header.format} file named {ext})"


def load_image(path: PathLike, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
               exif_orientation: bool = True,
               opener: Optional[Callable[[str], BinaryIO]] = None) -> np.ndarray:
  """Reads an image file as uint8 RGB, or raises `BadImageError` with a reason.

  See `decode_image` for the arguments and the conversions (those of `cv2.imread`).
  The format is sniffed from the content, never taken from the extension (a PNG
  named .jpg decodes as PNG). With a pixel limit, the header is read first and an
  image declaring too many pixels is refused without reading the rest of the file.
  `opener(path)` opens something else than a local file for binary reading (e.g.
  an fsspec URL, `samjax.bulk.store.open_read`); its OSErrors become the reason.

  Returns:
    (H, W, 3) uint8 RGB array, C-contiguous.

  Raises:
    BadImageError: missing, a folder, empty, unreadable, truncated, unsupported or
      too large.
  """
  path = os.fspath(path)
  header = None
  try:
    if opener is None and os.path.isdir(path):
      raise BadImageError("is a folder, not an image file")
    with (open(path, "rb") if opener is None else opener(path)) as f:
      data = f.read(_HEADER_BYTES)
      header = read_image_size(data)
      if header is not None and header.width is not None:
        try:
          _check_pixels(header.width, header.height, max_pixels)
        except BadImageError as e:
          raise BadImageError(e.reason + _misnamed(path, header)) from None
      # An unknown format is refused under a limit whatever follows: no need to read it.
      if len(data) == _HEADER_BYTES and (header is not None or max_pixels is None):
        data += f.read()
  except FileNotFoundError:
    raise BadImageError("file does not exist") from None
  except IsADirectoryError:
    raise BadImageError("is a folder, not an image file") from None
  except OSError as e:
    raise BadImageError(f"cannot read file: {e.strerror or e}") from e
  try:
    return decode_image(data, max_pixels=max_pixels, exif_orientation=exif_orientation)
  except BadImageError as e:
    hint = _misnamed(path, read_image_size(data) if header is None else header)
    if not hint:
      raise
    raise BadImageError(e.reason + hint) from None


def read_file_image_size(path: PathLike, max_bytes: int = 1 << 20) -> Optional[ImageSize]:
  """`read_image_size` of a file, reading at most its first `max_bytes` bytes."""
  with open(os.fspath(path), "rb") as f:
    return read_image_size(f.read(max_bytes))


# ------------------------------------------------------------------------- validation


def check_rgb_image(image: Any, where: str = "image", allow_gray: bool = False
                    ) -> np.ndarray:
  """The model's input contract: a non-empty uint8 (H, W, 3) array.

  Args:
    image: a numpy array, a torch tensor or anything with `__array__`.
    where: the caller's name, to start error messages with.
    allow_gray: also accept (H, W) and return it replicated to 3 channels.

  Returns:
    The image as a numpy array (not copied when it already is one).

  Raises:
    ValueError: a message that says what was expected and what came.
  """
  if not isinstance(image, np.ndarray):
    if not (is_torch(image) or hasattr(image, "__array__")):
      raise ValueError(f"{where}: expected an HxWx3 uint8 numpy image, got "
                       f"{type(image).__name__}")
    image = to_numpy(image)
  shape_ok = (image.ndim == 3 and image.shape[-1] == 3) or (allow_gray and image.ndim == 2)
  if not shape_ok:
    wanted = "HxWx3 (or HxW grey)" if allow_gray else "HxWx3"
    raise ValueError(f"{where}: expected an {wanted} uint8 RGB image, got shape {image.shape}")
  if image.dtype != np.uint8:
    raise ValueError(f"{where}: expected a uint8 image (0..255), got dtype {image.dtype}; "
                     "convert with (img * 255).astype(np.uint8) if it is 0..1 floats")
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise ValueError(f"{where}: empty image of shape {image.shape}")
  if image.ndim == 2:
    image = np.repeat(image[:, :, None], 3, axis=2)
  return image
