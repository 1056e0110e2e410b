"""samjax.io.images: decoding equals cv2.imread, header sizes, refusals, input checks."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from samjax.io import images
from samjax.io.images import BadImageError, decode_image, load_image, read_image_size


def smooth(seed: int, h: int = 40, w: int = 56, channels: int = 3) -> np.ndarray:
  """Smooth random uint8 image (JPEG-friendly), distinct per seed; not square, so a
  rotation shows in the shape."""
  rng = np.random.default_rng(seed)
  img = cv2.GaussianBlur((rng.random((h, w, channels)) * 255).astype(np.float32), (0, 0), 2.0)
  img = img.reshape(h, w, channels)
  img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6) * 255
  return img.round().astype(np.uint8).squeeze()


def imread_rgb(path) -> np.ndarray | None:
  """What the official scripts/amg.py feeds the model (None where imread fails)."""
  try:
    bgr = cv2.imread(str(path))
  except cv2.error:
    bgr = None
  return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def pillow_upright(path) -> np.ndarray:
  with Image.open(path) as im:
    return np.array(ImageOps.exif_transpose(im).convert("RGB"))


def exif_bytes(orientation: int) -> bytes:
  exif = Image.Exif()
  exif[0x0112] = orientation
  return exif.tobytes()


def crafted_images(tmp_path) -> dict[str, str]:
  """The cases where our old re-implementation could differ from cv2.imread."""
  rgb = smooth(0)
  paths = {}

  def cv2_write(name, arr):
    path = str(tmp_path / name)
    assert cv2.imwrite(path, arr), name
    paths[name] = path

  cv2_write("rgb.png", rgb)
  cv2_write("rgb.jpg", rgb)
  cv2_write("gray.png", smooth(1, channels=1))
  cv2_write("rgba.png", np.dstack([rgb, smooth(2, channels=1)]))
  cv2_write("deep.png", smooth(3).astype(np.uint16) * 257 + 100)
  cv2_write("deep_gray.tif", smooth(4, channels=1).astype(np.uint16) * 250)
  cv2_write("pic.bmp", rgb)
  cv2_write("pic.webp", rgb)
  la = np.dstack([smooth(5, channels=1), smooth(6, channels=1)])
  Image.fromarray(la, mode="LA").save(tmp_path / "la.png")  # OpenCV cannot write LA.
  paths["la.png"] = str(tmp_path / "la.png")
  Image.fromarray(rgb).save(tmp_path / "pic.gif")
  paths["pic.gif"] = str(tmp_path / "pic.gif")
  for o in range(1, 9):
    for ext in ("jpg", "png", "webp"):
      name = f"exif{o}.{ext}"
      Image.fromarray(rgb).save(tmp_path / name, exif=exif_bytes(o))
      paths[name] = str(tmp_path / name)
    name = f"orient{o}.tif"  # TIFF orientation is a baseline tag, not EXIF.
    Image.fromarray(rgb).save(tmp_path / name, tiffinfo={0x0112: o})
    paths[name] = str(tmp_path / name)
  return paths


def test_decoding_equals_cv2_imread(tmp_path):
  """load_image is cv2.imread + BGR->RGB; where imread itself fails, Pillow's upright."""
  imread_failed = []
  for name, path in crafted_images(tmp_path).items():
    img = load_image(path)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name
    assert img.flags.c_contiguous, name
    ref = imread_rgb(path)
    if ref is None:
      # OpenCV 5.0.0's imread fails ("original_ptr == real_mat.data") on TIFFs with
      # orientation 5..8, while imdecode decodes them upright; compare with Pillow.
      imread_failed.append(name)
      ref = pillow_upright(path)
    np.testing.assert_array_equal(img, ref, err_msg=name)
    if name.startswith(("exif", "orient")):
      upright = (56, 40, 3) if int(name[len("exif" if name[0] == "e" else "orient")]) >= 5 \
          else (40, 56, 3)
      assert img.shape == upright, name
      if name.endswith((".png", ".webp", ".tif")):  # Lossless: exactly Pillow's upright.
        np.testing.assert_array_equal(img, pillow_upright(path), err_msg=name)
  assert set(imread_failed) <= {f"orient{o}.tif" for o in range(5, 9)}, imread_failed


def test_conversions(tmp_path):
  paths = crafted_images(tmp_path)
  rgb = smooth(0)
  np.testing.assert_array_equal(load_image(paths["rgba.png"]), rgb[:, :, ::-1])  # Alpha dropped.
  np.testing.assert_array_equal(load_image(paths["la.png"]),
                                np.repeat(np.array(Image.open(paths["la.png"]))[:, :, :1], 3, 2))
  deep = cv2.imread(paths["deep.png"], cv2.IMREAD_UNCHANGED)
  np.testing.assert_array_equal(load_image(paths["deep.png"]), (deep >> 8).astype(np.uint8)[..., ::-1])
  # The stored layout, when asked for (JPEG honours IMREAD_IGNORE_ORIENTATION).
  assert load_image(paths["exif6.jpg"], exif_orientation=False).shape == (40, 56, 3)
  # Bytes and files decode the same; a non-ASCII path works.
  data = open(paths["exif6.jpg"], "rb").read()
  (tmp_path / "ünïcødé.jpg").write_bytes(data)
  np.testing.assert_array_equal(decode_image(data), load_image(tmp_path / "ünïcødé.jpg"))


def _png_header(width: int, height: int, color_type: int = 2) -> bytes:
  def chunk(kind, payload):
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
          + chunk(b"IEND", b""))


def _exr_header(x0, y0, x1, y1) -> bytes:
  def attr(name, kind, value):
    return name + b"\0" + kind + b"\0" + struct.pack("<i", len(value)) + value
  return (b"\x76\x2f\x31\x01" + struct.pack("<I", 2)
          + attr(b"channels", b"chlist", b"R\0" + struct.pack("<iBBBBii", 1, 0, 0, 0, 0, 1, 1) + b"\0")
          + attr(b"compression", b"compression", b"\0")
          + attr(b"dataWindow", b"box2i", struct.pack("<iiii", x0, y0, x1, y1))
          + b"\0")


def _encoded(ext: str, arr: np.ndarray) -> bytes:
  ok, buf = cv2.imencode(ext, arr)
  assert ok, ext
  return buf.tobytes()


def _pillow(fmt: str, arr: np.ndarray, **kw) -> bytes:
  f = io.BytesIO()
  Image.fromarray(arr).save(f, fmt, **kw)
  return f.getvalue()


def test_header_sizes_of_every_format():
  rgb = np.zeros((30, 50, 3), np.uint8)
  rgb[5:10] = 200
  gray = rgb[:, :, 0].copy()
  hdr = rgb.astype(np.float32) / 255
  cases = {  # name: (format, encoded 50x30 image)
      "PNG": ("PNG", _encoded(".png", rgb)),
      "JPEG": ("JPEG", _encoded(".jpg", rgb)),
      "BMP": ("BMP", _encoded(".bmp", rgb)),
      "GIF": ("GIF", _encoded(".gif", rgb)),
      "WebP lossless": ("WebP", _encoded(".webp", rgb)),  # VP8L chunk
      "WebP lossy": ("WebP", _pillow("WEBP", rgb)),  # VP8
      "WebP extended": ("WebP", _pillow("WEBP", rgb, exif=exif_bytes(1))),  # VP8X
      "TIFF": ("TIFF", _encoded(".tif", rgb)),
      "BigTIFF": ("TIFF", _pillow("TIFF", rgb, big_tiff=True)),
      "HDR": ("Radiance HDR", _encoded(".hdr", hdr)),
      "PFM": ("PFM", _encoded(".pfm", hdr)),
      "PPM": ("PNM", _encoded(".ppm", rgb)),
      "PGM": ("PNM", _encoded(".pgm", gray)),
      "PBM": ("PNM", _encoded(".pbm", gray)),
      "PAM": ("PAM", _encoded(".pam", rgb)),
      "Sun raster": ("Sun raster", _encoded(".ras", rgb)),
      "AVIF": ("AVIF", _encoded(".avif", rgb)),
      "JP2": ("JPEG 2000", _pillow("JPEG2000", rgb)),
      "J2K codestream": ("JPEG 2000", _pillow("JPEG2000", rgb, no_jp2=True)),
  }
  for name, (fmt, data) in cases.items():
    assert read_image_size(data) == (fmt, 50, 30), name
    # OpenCV decodes every one of them: the header table covers what it reads.
    assert decode_image(data).shape == (30, 50, 3), name
  assert {fmt for fmt, _ in cases.values()} == set(images.HEADER_FORMATS) - {"OpenEXR"}
  # OpenEXR: this OpenCV build has no EXR decoder, so only the header is checked.
  assert read_image_size(_exr_header(-2, 3, 47, 32)) == ("OpenEXR", 50, 30)
  assert read_image_size(b"not an image at all") is None
  # Cut inside the header: the format is known, its size is not.
  assert read_image_size(cases["PNG"][1][:20]) == ("PNG", None, None)
  assert read_image_size(cases["JPEG"][1][:20]) == ("JPEG", None, None)
  assert read_image_size(cases["TIFF"][1][:12]) == ("TIFF", None, None)


def test_file_size_probe_reads_the_start_only(tmp_path):
  path = tmp_path / "big.png"
  path.write_bytes(_png_header(70_000, 50_000) + b"\0" * (3 << 20))
  assert images.read_file_image_size(path) == ("PNG", 70_000, 50_000)
  assert images.read_file_image_size(path, max_bytes=10) == ("PNG", None, None)


def test_huge_dimensions_are_refused_before_decoding(monkeypatch):
  bombs = {
      "PNG": _png_header(100_000, 100_000),
      "OpenEXR": _exr_header(0, 0, 99_999, 99_999),
      "GIF": b"GIF89a" + struct.pack("<HH", 60_000, 60_000) + b"\0" * 40,
      "BMP": b"BM" + b"\0" * 12 + struct.pack("<Iii", 40, 50_000, -50_000) + b"\0" * 40,
  }

  def no_decode(*args, **kwargs):
    raise AssertionError("decoded although the header is over the limit")

  monkeypatch.setattr(cv2, "imdecode", no_decode)
  for name, data in bombs.items():
    with pytest.raises(BadImageError, match="too large") as info:
      decode_image(data, max_pixels=100_000_000)
    assert "max_pixels=100000000" in info.value.reason, name


def test_refusals_have_reasons(tmp_path):
  rgb = smooth(0)
  good = tmp_path / "good.jpg"
  assert cv2.imwrite(str(good), rgb)
  data = good.read_bytes()
  (tmp_path / "empty.png").write_bytes(b"")
  (tmp_path / "garbage.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
  (tmp_path / "half.jpg").write_bytes(data[:len(data) // 2])
  (tmp_path / "no_eoi.jpg").write_bytes(data[:-2])
  (tmp_path / "header_only.jpg").write_bytes(data[:30])
  (tmp_path / "text.jpg").write_text("this is a text file\n" * 20)
  (tmp_path / "trailing.jpg").write_bytes(data + b"appended data" * 10)
  png = _encoded(".png", rgb)
  (tmp_path / "cut.png").write_bytes(png[:len(png) // 2])
  (tmp_path / "folder.png").mkdir()
  cases = {
      "empty.png": "zero-size",
      "garbage.jpg": "unreadable",
      "half.jpg": "truncated",
      "no_eoi.jpg": "truncated",
      "header_only.jpg": "header",
      "text.jpg": "unreadable",
      "cut.png": "corrupt or truncated PNG",
      "missing.png": "does not exist",
      "folder.png": "folder",
  }
  for name, reason in cases.items():
    with pytest.raises(BadImageError, match=reason) as info:
      load_image(tmp_path / name)
    assert reason in info.value.reason, name
  with pytest.raises(BadImageError, match="too large"):
    load_image(good, max_pixels=40 * 56 - 1)
  assert load_image(good, max_pixels=40 * 56).shape == (40, 56, 3)
  assert load_image(tmp_path / "trailing.jpg").shape == (40, 56, 3)  # Data after EOI is fine.
  # Without a limit, an unknown format goes to OpenCV, which refuses garbage too.
  with pytest.raises(BadImageError, match="not a supported image format"):
    load_image(tmp_path / "text.jpg", max_pixels=None)
  # With a limit, a format whose size cannot be read first is refused, clearly.
  with pytest.raises(BadImageError, match="size can be checked before decoding"):
    load_image(tmp_path / "text.jpg")


def test_jpeg_truncation_detection():
  data = _encoded(".jpg", smooth(0))
  assert not images.jpeg_is_truncated(data)
  assert images.jpeg_is_truncated(data[:-2])
  assert images.jpeg_is_truncated(data[:len(data) // 2])
  assert images.jpeg_is_truncated(data[:40])  # Inside the header.
  # An EXIF thumbnail carries its own EOI before the main image's scan.
  thumb = _encoded(".jpg", smooth(1, 8, 8))
  app1 = b"Exif\0\0" + thumb
  with_thumb = data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]
  assert not images.jpeg_is_truncated(with_thumb)
  assert images.jpeg_is_truncated(with_thumb[:-2])
  assert decode_image(with_thumb).shape == (40, 56, 3)


def test_check_rgb_image():
  img = np.zeros((4, 5, 3), np.uint8)
  assert images.check_rgb_image(img) is img
  gray = np.arange(20, dtype=np.uint8).reshape(4, 5)
  out = images.check_rgb_image(gray, allow_gray=True)
  assert out.shape == (4, 5, 3) and (out == gray[..., None]).all()
  cases = [
      (gray, "shape"),
      (np.zeros((4, 5, 3), np.float32), "uint8"),
      (np.zeros((0, 5, 3), np.uint8), "empty"),
      ("a string", "numpy image"),
  ]
  for bad, match in cases:
    with pytest.raises(ValueError, match=match) as info:
      images.check_rgb_image(bad, "set_image")
    assert str(info.value).startswith("set_image: ")
  torch = pytest.importorskip("torch")
  t = torch.zeros((4, 5, 3), dtype=torch.uint8, requires_grad=False)
  assert isinstance(images.check_rgb_image(t), np.ndarray)
