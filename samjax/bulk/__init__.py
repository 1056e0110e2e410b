"""Bulk automatic-mask jobs: many images in, one SA-1B style JSON per image out.

The job is built around any `generate_batch(images) -> per-image annotation lists`
callable (normally `samjax.AutomaticMaskGenerator.generate_batch` with
`output_mode="coco_rle"`), so this package never touches the model itself; the
`samjax automask` command (`samjax.cli.automask`) builds the generator.

Pipeline, per process:

  list_inputs -> shard_inputs -> drop inputs whose output is already valid ->
  prefetch_batches (decode in a thread pool, bounded) -> generate_batch ->
  atomic JSON (+ optional overlay PNG) per image.

Design points:

* Resumable: outputs are written with `samjax.io.files.atomic_write`, so a JSON
  file under its final name is always complete. A rerun skips inputs whose JSON is
  valid and redoes the rest (missing, truncated, or only a leftover temporary file,
  which is deleted).
* Robust: a broken image file, or an exception from the generator for one image,
  is appended to `failures.jsonl` and the job goes on. `KeyboardInterrupt` and
  `SystemExit` are not swallowed.
* Bounded memory: at most `(prefetch + 1) * batch_size` decoded images exist at any
  time, whatever the number of inputs.
* Multi-process: each process takes a disjoint strided shard of the sorted input
  list; processes never coordinate, so `generate_batch` must only use the devices
  local to its process.

Modules: `inputs` (listing, sharding, decoding ahead), `outputs` (names, records,
validity, overlays, the failure log), `job` (`run_job`, `JobSummary`). Images are
decoded by `samjax.io.images.load_image`.
"""

from samjax.bulk.inputs import (IMAGE_EXTENSIONS, input_roots, list_inputs, prefetch_batches,
                                shard_inputs)
from samjax.bulk.job import JobSummary, run_job
from samjax.bulk.outputs import (FailureLog, is_valid_output, output_path_for, overlay_path,
                                 sa1b_record)

__all__ = ["IMAGE_EXTENSIONS", "FailureLog", "JobSummary", "input_roots", "is_valid_output",
           "list_inputs", "output_path_for", "overlay_path", "prefetch_batches", "run_job",
           "sa1b_record", "shard_inputs"]
