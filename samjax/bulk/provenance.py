"""What made a bulk job's outputs: the job manifest, per-output provenance, safe resume.

A `samjax automask` output folder holds a job manifest, `samjax_job.json`, written once
when the job starts (atomically, write-if-absent, so the processes of a multi-process
job write it once and the others check it), and every SA-1B record the job writes
carries the same fields under `"provenance"`, so a single file can be audited:

  samjax_version       the samjax that wrote it
  model_type           vit_b / vit_l / vit_h / tiny (the loaded config's name)
  checkpoint           {"path", "format", "sha256", "sha256_of", "params_sha256"}:
                       `sha256` is the SHA-256 of an official-format .pth and
                       `sha256_of` says which one: "file" (a .pth loaded as it is),
                       "source" (a converted Orbax checkpoint: the .pth it was
                       converted from, `source_sha256` of its samjax.json) or
                       "official" (--model without --checkpoint and nothing cached
                       yet: the published SHA-256 the download is verified against)
                       or "files" (an Orbax checkpoint whose samjax.json records no
                       digest: the SHA-256 of its params/ files, names and bytes).
                       `params_sha256` is the digest of every parameter array that
                       an Orbax checkpoint's samjax.json records (`params_digest.all`,
                       checked when it loads); None for a .pth.
  generator            every `AmgOptions` field
  dtype                the compute dtype, resolved ("auto" never appears)
  attention            the encoder's attention kernels, resolved ("WINDOWED/GLOBAL")
  attention_requested  --attention as given ($SAMJAX_ATTENTION_IMPL, else "auto")
  output_format        the layout of the outputs (`sa1b` for the SA-1B JSONs)

plus `settings_sha256` (the SHA-256 of the settings that block a resume, below, which
the manifest also holds) and `manifest` (its file name).

Resume rules (`check_manifest`, `ensure_manifest`): a rerun into the same folder whose
model type, checkpoint (`checkpoint.sha256`, `checkpoint.params_sha256`, each compared
where both runs know it), any generator setting, dtype or output format differs stops
before the model is loaded (`ManifestMismatch`, exit status 2), naming each field
(old -> new). Settings that do not change outputs (batch size, decoding threads,
prefetch, progress, claim timeout, process count, overlays, --max-pixels) are not in
the manifest's settings and never block.

Two recorded fields do not block, on purpose:

* `attention`: the kernels compute the same function; they differ only in rounding
  (the last bits of fp32 logits), as do a different batch size or device type, which
  cannot block either: a job resumed on another GPU model, or moved from GPU to TPU
  with `--dtype bfloat16` kept, would otherwise have to start over. Each output
  records the kernels that made it, so a mixed folder stays auditable.
* `samjax_version`: an upgrade mid-job is noted, not refused; each output records the
  version that wrote it.

The dtype does block: bfloat16 and float32 give visibly different masks.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import socket
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from samjax.io import files

MANIFEST_NAME = "samjax_job.json"
MANIFEST_FORMAT = "samjax-job-v1"
PROVENANCE_KEY = "provenance"
# The layout of `samjax.bulk.outputs.sa1b_record` files.
DEFAULT_OUTPUT_FORMAT = "sa1b"
# Checkpoint fields that identify the weights; compared where both runs know them.
_CHECKPOINT_IDS = ("sha256", "params_sha256")


class ManifestMismatch(ValueError):
  """The output folder was made by a job with other settings (or by an unknown one)."""


def _jsonable(value: Any) -> Any:
  """Tuples, NumPy arrays and scalars -> plain JSON types (lists, floats, ints)."""
  if hasattr(value, "tolist"):
    return value.tolist()
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  return value


def _canonical(value: Any) -> str:
  return json.dumps(_jsonable(value), sort_keys=True, separators=(",", ":"))


# ------------------------------------------------------------------------- checkpoint


def checkpoint_identity(checkpoint: Optional[str], model: Optional[str]) -> Dict[str, Any]:
  """Identifies the weights a job will load, without loading them.

  Args:
    checkpoint: --checkpoint (an official-format .pth or a samjax Orbax folder), or None.
    model: --model, used when `checkpoint` is None (the official weights, cached).

  Returns:
    {"path", "format" ("pth" | "orbax" | "official"), "sha256", "sha256_of" ("file" |
    "source" | "official" | "files" | None), "params_sha256", "model_type"};
    `model_type` is None for a .pth (its config is detected from the tensors when it
    loads).

  Raises:
    samjax.io.checkpoint.CheckpointError: an Orbax folder without a readable samjax.json.
    OSError: the .pth cannot be read.
  """
  # pylint: disable=import-outside-toplevel
  from samjax.io import checkpoint as ckpt_lib
  if checkpoint is None:
    from samjax.io import pretrained
    name = model or pretrained.DEFAULT_MODEL
    spec = pretrained.MODELS[name]
    cached = pretrained.cache_dir() / os.path.splitext(spec.filename)[0]
    if (cached / ckpt_lib.METADATA_FILE).is_file():
      out = _orbax_identity(str(cached))
      out["format"] = "official"
      return out
    return {"path": spec.url, "format": "official", "sha256": spec.sha256,
            "sha256_of": "official", "params_sha256": None, "model_type": name}
  path = os.path.abspath(checkpoint)
  if os.path.isdir(path):
    return _orbax_identity(path)
  return {"path": path, "format": "pth", "sha256": ckpt_lib.sha256_file(path),
          "sha256_of": "file", "params_sha256": None, "model_type": None}


def _orbax_identity(path: str) -> Dict[str, Any]:
  from samjax.io import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  meta = ckpt_lib.read_metadata(path)
  source = meta.get("source_sha256")
  digest = meta.get(ckpt_lib.DIGEST_KEY)
  params = digest.get("all") if isinstance(digest, dict) else None
  model_type = meta.get("model_type")
  sha, sha_of = (source, "source") if isinstance(source, str) else (None, None)
  params = params if isinstance(params, str) else None
  if sha is None and params is None:
    # A checkpoint that records neither digest (written by an older samjax, or saved
    # by hand): its parameter files' bytes are what identifies it.
    sha, sha_of = _files_sha256(os.path.join(path, "params")), "files"
  return {"path": path, "format": "orbax", "sha256": sha, "sha256_of": sha_of,
          "params_sha256": params,
          "model_type": model_type if isinstance(model_type, str) else None}


def _files_sha256(folder: str) -> Optional[str]:
  """SHA-256 over every file below `folder` (relative names and bytes, sorted)."""
  h = hashlib.sha256()
  found = False
  for root, dirs, names in os.walk(folder):
    dirs.sort()
    for name in sorted(names):
      full = os.path.join(root, name)
      h.update(os.path.relpath(full, folder).encode() + b"\0")
      with open(full, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          h.update(block)
      h.update(b"\0")
      found = True
  return h.hexdigest() if found else None


# ------------------------------------------------------------------------- provenance


@dataclasses.dataclass(frozen=True)
class Provenance:
  """What makes a job's outputs (see the module docstring for each field).

  Attributes:
    samjax_version: samjax's version.
    model_type: the config's name; None while unknown (a .pth before it loads).
    checkpoint: `checkpoint_identity` without its `model_type`.
    generator: every `AmgOptions` field, as JSON types.
    dtype: "float32" or "bfloat16".
    attention: resolved kernels ("WINDOWED/GLOBAL"); None before the model is built.
    attention_requested: --attention as given, else $SAMJAX_ATTENTION_IMPL or "auto".
    output_format: layout of the outputs.
  """
  samjax_version: str
  model_type: Optional[str]
  checkpoint: Mapping[str, Any]
  generator: Mapping[str, Any]
  dtype: str
  attention: Optional[str]
  attention_requested: str
  output_format: str = DEFAULT_OUTPUT_FORMAT

  @classmethod
  def create(cls, *, checkpoint: Mapping[str, Any], options, dtype: str,
             attention_requested: Optional[str], output_format: str = DEFAULT_OUTPUT_FORMAT,
             model_type: Optional[str] = None, attention: Optional[str] = None
             ) -> "Provenance":
    """From a `checkpoint_identity` and the job's `AmgOptions`."""
    from samjax import __version__  # pylint: disable=import-outside-toplevel
    ckpt = {k: v for k, v in checkpoint.items() if k != "model_type"}
    if attention_requested is None:
      attention_requested = os.environ.get("SAMJAX_ATTENTION_IMPL", "").strip() or "auto"
    return cls(samjax_version=__version__,
               model_type=model_type or checkpoint.get("model_type"), checkpoint=ckpt,
               generator=_jsonable(options.to_kwargs()), dtype=str(dtype),
               attention=attention, attention_requested=attention_requested,
               output_format=output_format)

  def replace(self, **changes) -> "Provenance":
    return dataclasses.replace(self, **changes)

  def settings(self) -> Dict[str, Any]:
    """The fields that change outputs (a resume with other values is refused)."""
    return _jsonable({"model_type": self.model_type,
                      "checkpoint": {k: self.checkpoint.get(k) for k in _CHECKPOINT_IDS},
                      "generator": dict(self.generator), "dtype": self.dtype,
                      "output_format": self.output_format})

  def settings_sha256(self) -> str:
    return hashlib.sha256(_canonical(self.settings()).encode()).hexdigest()

  def to_dict(self) -> Dict[str, Any]:
    return _jsonable(dataclasses.asdict(self))

  def record(self) -> Dict[str, Any]:
    """The `"provenance"` entry of each output: every field, the settings' hash and
    the manifest's name."""
    return {**self.to_dict(), "settings_sha256": self.settings_sha256(),
            "manifest": MANIFEST_NAME}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Provenance":
    """Inverse of `to_dict` (extra keys such as `settings_sha256` are ignored).

    Raises:
      ValueError: a field is missing.
    """
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in d]
    if missing:
      raise ValueError(f"provenance lacks {', '.join(missing)}")
    return cls(**{n: d[n] for n in names})


def _flat(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _text(v: Any) -> str:
  if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
    return v[:12] + "..."  # a SHA-256
  return json.dumps(v)


def differences(old: Provenance, new: Provenance) -> Tuple[List[str], List[str]]:
  """(blocking, notes): "field: old -> new" for settings that differ, and for the
  recorded fields that do not block (version, attention kernels).

  A field that one of the two runs does not know (None: the model type of a .pth
  before it loads, `params_sha256` of a .pth) is not compared; when neither
  checkpoint field can be compared, the checkpoints count as different.
  """
  a, b = _flat(old.settings()), _flat(new.settings())
  blocking = []
  for key in sorted(set(a) | set(b)):
    x, y = a.get(key), b.get(key)
    if x is None or y is None:
      continue
    if x != y:
      blocking.append(f"{key}: {_text(x)} -> {_text(y)}")
  ids = [k for k in _CHECKPOINT_IDS
         if old.checkpoint.get(k) is not None and new.checkpoint.get(k) is not None]
  if not ids:
    blocking.append(f"checkpoint: cannot tell that {new.checkpoint.get('path')} holds the "
                    f"weights of {old.checkpoint.get('path')} (no digest both runs know)")
  notes = []
  for key in ("samjax_version", "attention"):
    x, y = getattr(old, key), getattr(new, key)
    if x is not None and y is not None and x != y:
      notes.append(f"{key}: {_text(x)} -> {_text(y)}")
  return blocking, notes


# --------------------------------------------------------------------------- manifest


@dataclasses.dataclass(frozen=True)
class Manifest:
  """A job manifest as read from or written to an output folder.

  Attributes:
    path: the manifest file.
    provenance: the provenance of the run that wrote it.
    settings_sha256: `provenance.settings_sha256()`, as recorded.
    job: where and how it ran (host, time, backend, devices, batch size...);
      informative only.
  """
  path: str
  provenance: Provenance
  settings_sha256: str
  job: Mapping[str, Any]


def _store(location: str):
  """`samjax.bulk.store`'s store of `location` (a local path or an fsspec URL)."""
  from samjax.bulk import store  # pylint: disable=import-outside-toplevel
  return store.store_for(location)


def manifest_path(out_dir: str) -> str:
  out_dir = os.fspath(out_dir)
  return _store(out_dir).join(out_dir, MANIFEST_NAME)


def manifest_bytes(provenance: Provenance, job: Optional[Mapping[str, Any]] = None) -> bytes:
  """The manifest file's contents (indented JSON)."""
  info = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds"), "host": socket.gethostname(), "pid": os.getpid()}
  info.update(job or {})
  doc = {"format": MANIFEST_FORMAT, "settings_sha256": provenance.settings_sha256(),
         "settings": provenance.settings(), PROVENANCE_KEY: provenance.to_dict(),
         "job": _jsonable(info)}
  return (json.dumps(doc, indent=1) + "\n").encode()


def read_manifest(out_dir: str) -> Optional[Manifest]:
  """The folder's manifest, or None when there is none.

  Raises:
    ManifestMismatch: a manifest that does not parse or is not one samjax wrote.
  """
  path = manifest_path(out_dir)
  try:
    doc = json.loads(_store(path).read_bytes(path))
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise ManifestMismatch(f"cannot read the job manifest {path}: {e}; pass --overwrite to "
                           "recompute the folder with this run's settings") from None
  try:
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
      raise ValueError(f"format {doc.get('format') if isinstance(doc, dict) else None!r}, "
                       f"expected {MANIFEST_FORMAT!r}")
    prov = Provenance.from_dict(doc[PROVENANCE_KEY])
    return Manifest(path, prov, str(doc["settings_sha256"]), dict(doc.get("job") or {}))
  except (KeyError, TypeError, ValueError) as e:
    raise ManifestMismatch(f"{path} is not a samjax job manifest samjax can read ({e}); "
                           "pass --overwrite to recompute the folder") from None


def write_if_absent(path: str, data: bytes) -> bool:
  """Creates `path` holding `data` unless it exists; True if this call created it.

  The data goes to a temporary file first, which is then hard-linked to `path`
  (`link` fails when the name exists, atomically, also on NFS), so a reader never sees
  a partial manifest and of several writers exactly one wins (on a filesystem without
  hard links, an O_EXCL create: still one winner, but a reader at that instant may see
  a partial file and stop with a clear error; a rerun then works). Object stores have no
  such operation: there it is check-then-upload (a whole-object write, never partial),
  and two processes starting at the same instant may both write; they write the same
  settings, and each then compares what it reads back.
  """
  where = _store(path)
  if not where.local:
    if where.exists(path):
      return False
    where.write_bytes(path, data)
    return True
  tmp = files.temp_path_for(path)
  try:
    with open(tmp, "xb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    try:
      os.link(tmp, path)
    except FileExistsError:
      return False
    except OSError:  # A filesystem without hard links (some FUSE/SMB mounts).
      try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
      except FileExistsError:
        return False
      with os.fdopen(fd, "wb") as f:  # Not atomic for readers, still exclusive.
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    files.fsync_dir(os.path.dirname(path))
    return True
  finally:
    try:
      os.unlink(tmp)
    except OSError:
      pass


def _mismatch_message(out_dir: str, blocking: Sequence[str]) -> str:
  return (f"{out_dir} holds a job made with other settings ({MANIFEST_NAME}): "
          f"{'; '.join(blocking)}. Rerun with the same settings to resume, pass --overwrite "
          "to recompute everything with the new ones, or choose another --out")


def _first_existing(out_dir: str, outputs: Sequence[str]) -> Optional[str]:
  """The first of `outputs` that exists: one listing of `out_dir` at a URL (an object
  store answers one request per `exists`), a `stat` per output on a local disk."""
  from samjax.bulk import store  # pylint: disable=import-outside-toplevel
  if not store.is_url(out_dir):
    return next((p for p in outputs if _store(p).exists(p)), None)
  where = store.store_for(out_dir)
  try:
    listed = set(where.find(os.fspath(out_dir)))
  except OSError:
    listed = set()  # nothing there yet (or unlistable: the job's own writes will say)
  return next((p for p in outputs if where.norm(p) in listed), None)


def check_manifest(out_dir: str, provenance: Provenance, outputs: Sequence[str] = (),
                   overwrite: bool = False) -> Tuple[Optional[Manifest], List[str]]:
  """The check before the model loads: may a job with `provenance` resume in `out_dir`?

  Args:
    out_dir: the output folder.
    provenance: this run's (`model_type` and `attention` may still be None).
    outputs: this process's output files; if some exist while the manifest does
      not, the folder was made by a job that recorded no settings.
    overwrite: everything will be recomputed: nothing is checked.

  Returns:
    (the manifest found or None, notes on recorded fields that differ but do not block).

  Raises:
    ManifestMismatch: the message names each differing field (old -> new).
  """
  if overwrite:
    return None, []
  found = read_manifest(out_dir)
  if found is None:
    existing = _first_existing(out_dir, outputs)
    if existing is not None:
      raise ManifestMismatch(
          f"{out_dir} has outputs (e.g. {existing}) but no "
          f"{MANIFEST_NAME}: they were made by an older samjax or the manifest was "
          "removed, so their settings are unknown; pass --overwrite to recompute them, or "
          "choose another --out")
    return None, []
  blocking, notes = differences(found.provenance, provenance)
  if blocking:
    raise ManifestMismatch(_mismatch_message(out_dir, blocking))
  return found, notes


def ensure_manifest(out_dir: str, provenance: Provenance,
                    job: Optional[Mapping[str, Any]] = None, *, overwrite: bool = False,
                    process_index: int = 0) -> Tuple[Manifest, bool]:
  """Writes the manifest once per folder, or checks this run against the one there.

  Call it once the model is built (`provenance` complete), before any image is
  computed. Without `overwrite`, every process tries to create the manifest and the
  ones that lose compare; with `overwrite`, process 0 replaces it and the others
  create it only if it is absent (process 0 may be replacing an old one).

  Returns:
    (the folder's manifest, whether this call wrote it).

  Raises:
    ManifestMismatch: another run's manifest with other settings.
  """
  path = manifest_path(out_dir)
  data = manifest_bytes(provenance, job)
  if overwrite and process_index == 0:
    _store(path).write_bytes(path, data)  # atomic: a complete file or the old one
    wrote = True
  else:
    wrote = write_if_absent(path, data)
  if wrote or overwrite:
    doc = json.loads(data)
    return Manifest(path, provenance, doc["settings_sha256"], doc["job"]), wrote
  found = read_manifest(out_dir)
  if found is None:  # Removed between the two calls: try once more.
    return ensure_manifest(out_dir, provenance, job, overwrite=False,
                           process_index=process_index)
  blocking, _ = differences(found.provenance, provenance)
  if blocking:
    raise ManifestMismatch(_mismatch_message(out_dir, blocking))
  return found, False


# ----------------------------------------------------------------- where the job runs


def accelerator_hint(platform: str, root: str = "/", which=None,
                     environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
  """A warning when JAX runs on CPU on a machine that seems to have a GPU or TPU.

  Looks for an NVIDIA driver (`/proc/driver/nvidia`, `nvidia-smi` on PATH) and TPU
  devices (`/dev/accel*`, numbered `/dev/vfio/*` groups). Nothing is said when CPU
  was asked for (JAX_PLATFORMS=cpu).

  Args:
    platform: the JAX backend in use ("cpu", "gpu", "tpu").
    root: file system root to look under (tests pass a fake one).
    which: `shutil.which`-like lookup (tests pass a fake one).
    environ: the environment (default `os.environ`).

  Returns:
    The warning text naming the install line, or None.
  """
  environ = os.environ if environ is None else environ
  if platform.lower() != "cpu" or environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
    return None
  if which is None:
    import shutil  # pylint: disable=import-outside-toplevel
    which = shutil.which

  def under(*parts: str) -> str:
    return os.path.join(root, *parts)

  nvidia = [p for p in (under("proc", "driver", "nvidia"),) if os.path.exists(p)]
  smi = which("nvidia-smi")
  if smi:
    nvidia.append(smi)
  try:
    accel = sorted(n for n in os.listdir(under("dev")) if n.startswith("accel"))
  except OSError:
    accel = []
  try:
    vfio = sorted(n for n in os.listdir(under("dev", "vfio")) if n.isdigit())
  except OSError:
    vfio = []
  tpu = [under("dev", n) for n in accel] + [under("dev", "vfio", n) for n in vfio]
  if nvidia:
    return (f"JAX runs on CPU but this machine seems to have an NVIDIA GPU ({nvidia[0]}); "
            "install the CUDA build of JAX: pip install \"samjax[cuda]\" (JAX_PLATFORMS=cpu "
            "silences this)")
  if tpu:
    return (f"JAX runs on CPU but this machine seems to have a TPU ({tpu[0]}); install "
            "the TPU build of JAX: pip install \"samjax[tpu]\" (JAX_PLATFORMS=cpu silences "
            "this)")
  return None
