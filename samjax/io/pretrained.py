"""Official SAM weights: download once, verify by SHA-256, convert, cache as Orbax.

Cache directory: `$SAMJAX_CACHE`, else `$XDG_CACHE_HOME/samjax`, else `~/.cache/samjax`.
A `.pth` you downloaded yourself can be dropped into the cache directory under its
official name: it is verified and converted without any network access.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict

from samjax.io.checkpoint import METADATA_FILE, PARAMS_DIR, convert_checkpoint, sha256_file


@dataclasses.dataclass(frozen=True)
class Pretrained:
  model_type: str
  url: str
  sha256: str

  @property
  def filename(self) -> str:
    return self.url.rsplit("/", 1)[-1]


_BASE = "https://dl.fbaipublicfiles.com/segment_anything/"
MODELS: Dict[str, Pretrained] = {
    "vit_h": Pretrained("vit_h", _BASE + "sam_vit_h_4b8939.pth",
                        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
    "vit_l": Pretrained("vit_l", _BASE + "sam_vit_l_0b3195.pth",
                        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    "vit_b": Pretrained("vit_b", _BASE + "sam_vit_b_01ec64.pth",
                        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
}
DEFAULT_MODEL = "vit_h"


class DownloadError(RuntimeError):
  """The weights could not be fetched or failed verification."""


def cache_dir() -> Path:
  env = os.environ.get("SAMJAX_CACHE")
  if env:
    return Path(env).expanduser()
  xdg = os.environ.get("XDG_CACHE_HOME")
  return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "samjax"


def _download(url: str, dst: Path, sha256: str, progress: bool, timeout: float = 60.0) -> None:
  """Streams `url` to `dst` atomically, verifying the SHA-256 on the way."""
  dst.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=dst.name + ".", suffix=".part", dir=dst.parent)
  h = hashlib.sha256()
  try:
    with os.fdopen(fd, "wb") as out:
      with urllib.request.urlopen(url, timeout=timeout) as resp:
        total = int(resp.headers.get("Content-Length") or 0) or None
        bar = None
        if progress:
          from tqdm import tqdm
          bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dst.name}",
                     file=sys.stderr)
        while chunk := resp.read(1 << 20):
          out.write(chunk)
          h.update(chunk)
          if bar:
            bar.update(len(chunk))
        if bar:
          bar.close()
    if h.hexdigest() != sha256:
      raise DownloadError(f"{url} downloaded but its SHA-256 is {h.hexdigest()}, expected "
                          f"{sha256}; the file was discarded (corrupt download or wrong file)")
    os.replace(tmp, dst)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def fetch(model_type: str = DEFAULT_MODEL, progress: bool = True, keep_pth: bool = False
          ) -> Path:
  """Returns the cached Orbax checkpoint dir for an official model, creating it if needed.

  The second call is offline: it finds the converted checkpoint in the cache.
  """
  if model_type == "default":
    model_type = DEFAULT_MODEL
  if model_type not in MODELS:
    raise ValueError(f"unknown pretrained model {model_type!r}; expected one of {sorted(MODELS)}")
  spec = MODELS[model_type]
  root = cache_dir()
  orbax_dir = root / Path(spec.filename).stem
  if (orbax_dir / METADATA_FILE).exists() and (orbax_dir / PARAMS_DIR).exists():
    return orbax_dir
  pth = root / spec.filename
  if pth.exists():
    if sha256_file(pth) != spec.sha256:
      raise DownloadError(f"{pth} exists but its SHA-256 does not match the official "
                          f"{spec.filename}; delete it or replace it with the official file")
  else:
    try:
      _download(spec.url, pth, spec.sha256, progress)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
      raise DownloadError(
          f"could not download {spec.url} ({e}). Without network access, download "
          f"{spec.filename} elsewhere and either put it at {pth} (it will be verified and "
          f"converted), or load it directly: samjax.Predictor.from_checkpoint('/path/to/"
          f"{spec.filename}'), or convert it: samjax convert {spec.filename} OUT_DIR") from None
  convert_checkpoint(pth, orbax_dir, model_type=spec.model_type, overwrite=True)
  if not keep_pth:
    pth.unlink()
  return orbax_dir
