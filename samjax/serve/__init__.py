"""`samjax serve`: a local web app for click-to-segment and for viewing bulk outputs.

* Prompt mode: left click adds a foreground point, right click (or shift-click) a
  background point, a drag draws a box. Each change runs `Predictor.predict` on the
  image's kept embedding and shows the three candidates with their predicted IoU; the
  chosen candidate's low-res logits are fed back as `mask_input` on the next click.
  Undo, clear, and export of the chosen mask as PNG or COCO RLE JSON.
* Everything mode: `samjax.AutomaticMaskGenerator` with the options of
  `samjax.amg.options.AmgOptions`, run as a job; all masks in distinct colours.
* Bulk viewer (`--masks DIR`): the SA-1B JSONs of a `samjax automask` folder with
  their masks, filters on predicted IoU, stability and area, the failures and the
  job's settings.

Modules: `engine` (the model, the embedding LRU, jobs, the device lock), `bulk` (the
output folder, read-only), `paths` (the one check of client-named paths), `app` (the
Starlette routes; `GET /api` lists them), `static/` (the page: plain HTML, JS and
canvas, nothing fetched from elsewhere). The command is `samjax.cli.serve`.

Needs the `serve` extra (`pip install samjax[serve]`: Starlette and uvicorn).
"""

from __future__ import annotations

import importlib

_EXPORTS = {"create_app": "samjax.serve.app", "API": "samjax.serve.app",
            "Engine": "samjax.serve.engine", "BulkFolder": "samjax.serve.bulk",
            "resolve_under": "samjax.serve.paths", "PathRefused": "samjax.serve.paths"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  module = _EXPORTS.get(name)
  if module is None:
    raise AttributeError(f"module 'samjax.serve' has no attribute {name!r}")
  value = getattr(importlib.import_module(module), name)
  globals()[name] = value
  return value


def __dir__():
  return __all__
