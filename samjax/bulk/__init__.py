"""Bulk automatic-mask jobs: many images in, one SA-1B style JSON (or the files of the
official scripts/amg.py, `layouts`) per image out.

The job is built around any `generate_batch(images) -> per-image annotation lists`
callable (normally `samjax.AutomaticMaskGenerator.generate_batch` with
`output_mode="coco_rle"`), so this package never touches the model itself; the
`samjax automask` command (`samjax.cli.automask`) builds the generator.

Pipeline, per process:

  plan_job (output folder usable? list_inputs, shard_inputs) -> drop inputs whose
  output is already valid -> claim each image -> prefetch_batches (decode in a thread
  pool, bounded) -> generate_batch -> atomic JSON (+ optional overlay PNG) per image.

Design points:

* Checked before the model: `plan_job` creates the output folder and writes a probe
  file there (a file in the path, no permission, a full disk fail here), refuses an
  input folder that is or lies in the output folder, and fails when no input gives
  any image, naming the inputs and why.
* Resumable: outputs are written with `samjax.io.files.atomic_write`, so a JSON
  file under its final name is always complete. A rerun skips inputs whose JSON is
  valid and redoes the rest (missing, truncated, or only a leftover temporary file,
  which is deleted, also in the `*.tmp` form of older versions).
* Robust: a broken image file, an unlistable folder, or an exception from the
  generator for one image, is appended to `failures.jsonl` and the job goes on; the
  records of images that later succeed are dropped at the end of the run. A write
  error that every image would meet (full disk, read-only) stops the job with a
  `JobError`, keeping every finished output.
* Signals: the first SIGINT/SIGTERM lets the images in flight finish, then the job
  stops and says so (`JobSummary.interrupted`, exit status 130/143); a second one
  stops it at once. Partial files are never left under a final name.
* Bounded memory: at most `(prefetch + 1) * batch_size` decoded images exist at any
  time, whatever the number of inputs.
* Shared output folders: each image is claimed (`samjax.bulk.claims`, an O_EXCL file)
  before it is decoded, so several jobs started on the same folder split the work;
  the claims of a dead job are taken over. Local folders only (see below).
* Object storage: inputs and the output folder may be URLs of any fsspec protocol
  (`samjax.bulk.store`): the same listing, sharding and resume; each output is one
  whole-object upload (never visible half-written, no temporaries); the failure log
  is rewritten whole; no claims.
* Multi-process: each process takes a disjoint strided shard of the sorted input
  list; processes never coordinate, so `generate_batch` must only use the devices
  local to its process.

Modules: `inputs` (listing, sharding, decoding ahead), `outputs` (names, records,
validity, overlays, the failure log), `layouts` (the output formats: `sa1b`, and
amg.py's `amg-json` and `amg-png`), `claims`, `store` (local paths and URLs behind
one interface), `job` (`plan_job`, `run_job`,
`JobSummary`, `JobError`), `provenance` (the job manifest `samjax_job.json`, what each
output records, the resume check). Images are decoded by `samjax.io.images.load_image`.
"""

from samjax.bulk.claims import Claims
from samjax.bulk.inputs import (IMAGE_EXTENSIONS, InputError, InputScan, input_roots,
                                list_inputs, prefetch_batches, scan_inputs, shard_inputs)
from samjax.bulk.job import JobError, JobPlan, JobSummary, check_output_dir, plan_job, run_job
from samjax.bulk.outputs import (FailureLog, is_valid_output, output_path_for, overlay_path,
                                 sa1b_record)

__all__ = ["IMAGE_EXTENSIONS", "Claims", "FailureLog", "InputError", "InputScan", "JobError",
           "JobPlan", "JobSummary", "check_output_dir", "input_roots", "is_valid_output",
           "list_inputs", "output_path_for", "overlay_path", "plan_job", "prefetch_batches",
           "run_job", "sa1b_record", "scan_inputs", "shard_inputs"]
