"""The Starlette app: the page, its static files, and the JSON API (see `API`).

Every route answers JSON errors `{"error": "...", "status": N}` with a 4xx status
for what the client got wrong, and a one-line 500 for anything else: tracebacks go
to the server's log, never to the client. Blocking work (decoding, the model) runs
in Starlette's thread pool; `Engine.device_lock` serializes what reaches the device.

Local-only safeguards: with `allowed_hosts` the Host header must name this server
(a DNS-rebinding page cannot read the API), and POST bodies must not have a type a
cross-site form or no-cors fetch could send without a CORS preflight
(`text/plain`, `multipart/form-data`, `application/x-www-form-urlencoded`).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Dict, Optional

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from samjax.io.images import DEFAULT_MAX_PIXELS, BadImageError, decode_image
from samjax.serve import engine as engine_lib
from samjax.serve.bulk import BrokenRecord, BulkFolder
from samjax.serve.paths import PathRefused, resolve_under, walk_files

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
DEFAULT_MAX_UPLOAD_BYTES = 50 << 20
MAX_JSON_BODY = 1 << 20
#: How long `POST /api/automask` with "wait": true blocks before answering 202.
MAX_WAIT_S = 600.0

_PAGE_HEADERS = {
    # Everything comes from this server; nothing is fetched from elsewhere.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                               "style-src 'self'; script-src 'self'; object-src 'none'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_SIMPLE_TYPES = ("text/plain", "multipart/form-data", "application/x-www-form-urlencoded")

#: The routes, as `GET /api` lists them (the README of the API).
API = [
    ("GET", "/api", "this list"),
    ("GET", "/api/info", "model, limits, and which folders the server was given"),
    ("POST", "/api/images", "upload an image (the request body is the file; ?name=); "
                            "embeds it unless cached -> {image_id, width, height, cached, "
                            "embed_ms}"),
    ("GET", "/api/images", "images kept on the server, most recent first"),
    ("GET", "/api/images/{image_id}", "one image's info"),
    ("GET", "/api/images/{image_id}/image.png", "the decoded image as PNG (what the "
                                                 "model saw)"),
    ("POST", "/api/predict", "{image_id, point_coords?: [[x, y]...], point_labels?: "
                             "[1|0...], box?: [x0, y0, x1, y1], mask_input?: "
                             "{prediction_id, index}, multimask_output?: true} -> "
                             "{prediction_id, masks: [{index, predicted_iou, area, bbox, "
                             "segmentation: COCO RLE}], best, timing_ms}"),
    ("GET", "/api/predictions/{prediction_id}/masks/{index}.png", "one candidate as PNG"),
    ("GET", "/api/predictions/{prediction_id}/masks/{index}.json", "one candidate as COCO "
                                                                   "RLE JSON"),
    ("GET", "/api/automask/options", "the generator's options with defaults and help "
                                     "(from samjax.amg.options.AmgOptions)"),
    ("POST", "/api/automask", "{image_id, options?: {...}, wait?: false} -> 202 {job_id, "
                              "status} (or, with wait, 200 with the records)"),
    ("GET", "/api/jobs", "automask jobs, most recent first"),
    ("GET", "/api/jobs/{job_id}", "{status: queued|running|done|failed, records?, error?, "
                                  "seconds}"),
    ("GET", "/api/jobs/{job_id}/masks/{index}.png", "one record's mask as PNG"),
    ("GET", "/api/jobs/{job_id}/masks/{index}.json", "one record as JSON"),
    ("GET", "/api/library", "image files under --images"),
    ("POST", "/api/library/open", "{path} relative to --images -> as POST /api/images"),
    ("GET", "/api/bulk", "?offset=&limit= output JSONs under --masks, each ok or broken"),
    ("GET", "/api/bulk/record", "?path= one output: {image, annotations, has_picture}"),
    ("GET", "/api/bulk/image", "?path= the picture of an output (from --images) as PNG"),
    ("GET", "/api/bulk/failures", "the records of failures*.jsonl"),
    ("GET", "/api/bulk/settings", "the job's manifest (samjax_job.json) or settings file "
                                  "if any, and counts"),
]


class ApiError(HTTPException):
  """A client error with a message for the client."""


def _error(status: int, message: str) -> JSONResponse:
  return JSONResponse({"error": message, "status": status}, status_code=status,
                      headers={"Cache-Control": "no-store"})


def _json(data: Any, status: int = 200) -> JSONResponse:
  return JSONResponse(data, status_code=status, headers={"Cache-Control": "no-store"})


def _png(image: np.ndarray, filename: Optional[str] = None) -> Response:
  import cv2  # pylint: disable=import-outside-toplevel
  if image.ndim == 3:
    image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
  ok, buf = cv2.imencode(".png", np.ascontiguousarray(image), [cv2.IMWRITE_PNG_COMPRESSION, 1])
  if not ok:
    raise RuntimeError("PNG encoding failed")
  headers = {"Cache-Control": "no-store"}
  if filename:
    headers["Content-Disposition"] = f'attachment; filename="{filename}"'
  return Response(buf.tobytes(), media_type="image/png", headers=headers)


async def _read_body(request: Request, limit: int, what: str) -> bytes:
  """The body, refused with 413 once it passes `limit` bytes (checked while reading)."""
  declared = request.headers.get("content-length")
  if declared is not None:
    try:
      if int(declared) > limit:
        raise ApiError(413, f"{what} is {int(declared)} bytes; the limit is {limit}")
    except ValueError:
      raise ApiError(400, "bad Content-Length") from None
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > limit:
      raise ApiError(413, f"{what} is over the limit of {limit} bytes")
    chunks.append(chunk)
  return b"".join(chunks)


async def _read_json(request: Request) -> Dict[str, Any]:
  ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
  if ctype != "application/json":
    raise ApiError(415, "send JSON with Content-Type: application/json")
  body = await _read_body(request, MAX_JSON_BODY, "the JSON body")
  try:
    data = json.loads(body)
  except (ValueError, RecursionError):
    raise ApiError(400, "the body is not valid JSON") from None
  if not isinstance(data, dict):
    raise ApiError(400, "the JSON body must be an object")
  return data


def _int_query(request: Request, name: str, default: int, lo: int, hi: int) -> int:
  text = request.query_params.get(name)
  if text is None:
    return default
  try:
    value = int(text)
  except ValueError:
    raise ApiError(400, f"{name} must be an integer, got {text!r}") from None
  return min(max(value, lo), hi)


def _path_query(request: Request) -> str:
  path = request.query_params.get("path")
  if not path:
    raise ApiError(400, "give ?path=, relative to the folder")
  return path


def create_app(model, images_dir: Optional[str] = None, masks_dir: Optional[str] = None,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, cache_size: int = 8,
               allowed_hosts=None, model_name: str = "") -> Starlette:
  """The web app for one loaded model.

  Args:
    model: a `samjax.SamModel`.
    images_dir: `--images`: a folder of images to pick from (and the pictures of
      the bulk viewer), or None.
    masks_dir: `--masks`: a `samjax automask` output folder to browse, or None.
    max_upload_bytes: larger uploads are refused (413) before they are read.
    max_pixels: images with more pixels are refused (from their header).
    cache_size: images whose embeddings are kept.
    allowed_hosts: Host header values accepted (None: any, as for tests).
    model_name: shown by `/api/info` and the page.

  Returns:
    The Starlette app; `app.state.engine` is the `Engine`.
  """
  engine = engine_lib.Engine(model, cache_size=cache_size)
  bulk = BulkFolder(masks_dir, images_dir) if masks_dir else None
  images_root = os.path.realpath(images_dir) if images_dir else None
  if images_root and not os.path.isdir(images_root):
    raise ValueError(f"--images {images_dir}: not a folder")

  def need_bulk() -> BulkFolder:
    if bulk is None:
      raise ApiError(404, "no bulk output folder: start the server with --masks DIR")
    return bulk

  # ------------------------------------------------------------------ page
  async def index(request: Request) -> Response:
    return FileResponse(os.path.join(STATIC_DIR, "index.html"), headers=_PAGE_HEADERS)

  async def api_list(request: Request) -> Response:
    return _json({"routes": [{"method": m, "path": p, "what": w} for m, p, w in API]})

  async def info(request: Request) -> Response:
    from samjax import __version__  # pylint: disable=import-outside-toplevel
    cfg = model.config
    return _json({
        "samjax": __version__, "model": model_name or cfg.name,
        "image_size": cfg.image_size, "dtype": str(model.dtype),
        "max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels,
        "cache_size": cache_size, "images": bool(images_root), "masks": bool(bulk),
        "masks_folder": os.path.basename(bulk.root) if bulk else None})

  # ------------------------------------------------------------------ images
  async def add_image(image: np.ndarray, name: str) -> Response:
    return _json(await run_in_threadpool(engine.add_image, image, name))

  def decode(data: bytes) -> np.ndarray:
    try:
      return decode_image(data, max_pixels=max_pixels)
    except BadImageError as e:
      raise ApiError(400 if "too large" not in e.reason else 413,
                     f"not a usable image: {e.reason}") from None

  async def upload(request: Request) -> Response:
    data = await _read_body(request, max_upload_bytes, "the upload")
    name = request.query_params.get("name", "")[:200]
    image = await run_in_threadpool(decode, data)
    return await add_image(image, name)

  async def images(request: Request) -> Response:
    return _json({"images": engine.images()})

  async def image_info(request: Request) -> Response:
    return _json(engine.image(request.path_params["image_id"]).info())

  async def image_png(request: Request) -> Response:
    entry = engine.image(request.path_params["image_id"])
    return await run_in_threadpool(_png, entry.image)

  async def library(request: Request) -> Response:
    if images_root is None:
      raise ApiError(404, "no image folder: start the server with --images DIR")
    from samjax.bulk.inputs import IMAGE_EXTENSIONS  # pylint: disable=import-outside-toplevel
    limit = _int_query(request, "limit", 5000, 1, 100_000)
    files = await run_in_threadpool(lambda: list(walk_files(images_root, IMAGE_EXTENSIONS,
                                                            limit)))
    return _json({"folder": os.path.basename(images_root), "files": files})

  async def library_open(request: Request) -> Response:
    if images_root is None:
      raise ApiError(404, "no image folder: start the server with --images DIR")
    body = await _read_json(request)
    rel = body.get("path")
    if not isinstance(rel, str):
      raise ApiError(400, "give {\"path\": \"...\"} relative to the image folder")
    full = resolve_under(images_root, rel)

    def load():
      from samjax.io.images import load_image  # pylint: disable=import-outside-toplevel
      try:
        return load_image(full, max_pixels=max_pixels)
      except BadImageError as e:
        raise ApiError(400, f"not a usable image: {e.reason}") from None
    image = await run_in_threadpool(load)
    return await add_image(image, rel)

  # ------------------------------------------------------------------ prompts
  async def predict(request: Request) -> Response:
    body = await _read_json(request)
    image_id = body.get("image_id")
    if not isinstance(image_id, str):
      raise ApiError(400, "give image_id (from POST /api/images)")
    unknown = set(body) - {"image_id", "point_coords", "point_labels", "box", "mask_input",
                           "multimask_output"}
    if unknown:
      raise ApiError(400, f"unknown field(s) {sorted(unknown)}")
    multimask = body.get("multimask_output", True)
    if not isinstance(multimask, bool):
      raise ApiError(400, "multimask_output must be true or false")
    out = await run_in_threadpool(
        engine.predict, image_id, body.get("point_coords"), body.get("point_labels"),
        body.get("box"), body.get("mask_input"), multimask)
    return _json(out)

  def _index(request: Request, count: int) -> int:
    try:
      k = int(request.path_params["index"])
    except ValueError:
      raise ApiError(400, "the mask index must be an integer") from None
    if not 0 <= k < count:
      raise ApiError(404, f"mask index {k} out of range (0..{count - 1})")
    return k

  async def prediction_mask(request: Request) -> Response:
    pid = request.path_params["prediction_id"]
    pred = engine.prediction(pid)
    k = _index(request, len(pred.masks))
    return await _mask_response(request, pred.masks[k], f"{pid}.{k}")

  async def _mask_response(request: Request, record: Dict[str, Any], stem: str) -> Response:
    if request.path_params["fmt"] == "json":
      return JSONResponse(record, headers={
          "Content-Disposition": f'attachment; filename="{stem}.json"',
          "Cache-Control": "no-store"})
    from samjax.masks import decode_rle  # pylint: disable=import-outside-toplevel
    mask = await run_in_threadpool(decode_rle, record["segmentation"])
    return await run_in_threadpool(_png, mask.astype(np.uint8) * 255, f"{stem}.png")

  # ------------------------------------------------------------------ automask
  async def automask_options(request: Request) -> Response:
    return _json({"options": engine_lib.amg_option_fields()})

  async def automask(request: Request) -> Response:
    body = await _read_json(request)
    image_id = body.get("image_id")
    if not isinstance(image_id, str):
      raise ApiError(400, "give image_id (from POST /api/images)")
    options = body.get("options") or {}
    if not isinstance(options, dict):
      raise ApiError(400, "options must be an object")
    job = engine.automask(image_id, options)
    if body.get("wait"):
      await run_in_threadpool(job.done.wait, MAX_WAIT_S)
      if job.status == "done":
        return _json(job.info())
    return _json(job.info(with_records=False), status=202)

  async def jobs(request: Request) -> Response:
    return _json({"jobs": engine.jobs()})

  async def job(request: Request) -> Response:
    return _json(engine.job(request.path_params["job_id"]).info())

  async def job_mask(request: Request) -> Response:
    jid = request.path_params["job_id"]
    j = engine.job(jid)
    if j.records is None:
      raise ApiError(409, f"job {jid} is {j.status}; it has no masks")
    k = _index(request, len(j.records))
    return await _mask_response(request, j.records[k], f"{jid}.{k}")

  # ------------------------------------------------------------------ bulk viewer
  async def bulk_list(request: Request) -> Response:
    b = need_bulk()
    offset = _int_query(request, "offset", 0, 0, 10**9)
    limit = _int_query(request, "limit", 100, 1, 1000)
    return _json(await run_in_threadpool(b.listing, offset, limit))

  async def bulk_record(request: Request) -> Response:
    b = need_bulk()
    rel = _path_query(request)
    try:
      return _json(await run_in_threadpool(b.record, rel))
    except BrokenRecord as e:
      return _json({"error": f"broken output: {e}", "status": 422, "path": rel,
                    "broken": True, "reason": str(e)}, status=422)

  async def bulk_image(request: Request) -> Response:
    b = need_bulk()
    rel = _path_query(request)

    def load():
      from samjax.io.images import load_image  # pylint: disable=import-outside-toplevel
      try:
        rec = b.record(rel)
      except BrokenRecord as e:
        raise ApiError(422, f"broken output: {e}") from None
      path = b.image_path(rel, rec["image"])
      if path is None:
        raise ApiError(404, "no picture for this output under --images" if images_root
                       else "no picture: start the server with --images DIR")
      try:
        image = load_image(path, max_pixels=max_pixels)
      except BadImageError as e:
        raise ApiError(422, f"the picture is not usable: {e.reason}") from None
      if image.shape[:2] != (rec["image"]["height"], rec["image"]["width"]):
        raise ApiError(409, f"the picture found is {image.shape[1]}x{image.shape[0]}, the "
                            f"output is for {rec['image']['width']}x"
                            f"{rec['image']['height']}")
      return _png(image)
    return await run_in_threadpool(load)

  async def bulk_failures(request: Request) -> Response:
    return _json({"failures": await run_in_threadpool(need_bulk().failures)})

  async def bulk_settings(request: Request) -> Response:
    return _json(await run_in_threadpool(need_bulk().settings))

  # ------------------------------------------------------------------ errors
  async def http_error(request: Request, exc: HTTPException) -> Response:
    return _error(exc.status_code, exc.detail if isinstance(exc.detail, str)
                  else "request failed")

  async def client_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, PathRefused):
      return _error(404 if exc.missing else 400, str(exc))
    if isinstance(exc, engine_lib.Gone):
      return _error(410, str(exc))
    if isinstance(exc, engine_lib.NotFound):
      return _error(404, str(exc.args[0]) if exc.args else "not found")
    return _error(400, " ".join(str(exc).split()) or type(exc).__name__)

  async def server_error(request: Request, exc: Exception) -> Response:
    # Starlette re-raises after this answer, so the server's log gets the traceback.
    return _error(500, f"internal error ({type(exc).__name__}); the server log has the "
                       "details")

  @contextlib.asynccontextmanager
  async def lifespan(app):
    yield
    engine.close()

  fmt = "{fmt:str}"
  routes = [
      Route("/", index),
      Route("/api", api_list),
      Route("/api/info", info),
      Route("/api/images", upload, methods=["POST"]),
      Route("/api/images", images),
      Route("/api/images/{image_id}", image_info),
      Route("/api/images/{image_id}/image.png", image_png),
      Route("/api/predict", predict, methods=["POST"]),
      Route("/api/predictions/{prediction_id}/masks/{index}." + fmt, prediction_mask),
      Route("/api/automask/options", automask_options),
      Route("/api/automask", automask, methods=["POST"]),
      Route("/api/jobs", jobs),
      Route("/api/jobs/{job_id}", job),
      Route("/api/jobs/{job_id}/masks/{index}." + fmt, job_mask),
      Route("/api/library", library),
      Route("/api/library/open", library_open, methods=["POST"]),
      Route("/api/bulk", bulk_list),
      Route("/api/bulk/record", bulk_record),
      Route("/api/bulk/image", bulk_image),
      Route("/api/bulk/failures", bulk_failures),
      Route("/api/bulk/settings", bulk_settings),
      Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
  ]
  middleware = [Middleware(_GuardMiddleware)]
  if allowed_hosts is not None:
    middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)))
  app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                  exception_handlers={HTTPException: http_error, ValueError: client_error,
                                      engine_lib.NotFound: client_error,
                                      engine_lib.Gone: client_error,
                                      Exception: server_error})
  app.state.engine = engine
  app.state.bulk = bulk
  return app


class _GuardMiddleware:
  """Refuses POSTs a cross-site page could send without a preflight; adds headers.

  Also turns a mask-format suffix other than .png/.json into a 404 early (the
  routes take `{fmt}`).
  """

  def __init__(self, app):
    self.app = app

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      await self.app(scope, receive, send)
      return
    if scope["method"] == "POST":
      ctype = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
      if ctype.split(";")[0].strip().lower() in _SIMPLE_TYPES:
        await _error(415, f"Content-Type {ctype.split(';')[0]} is refused: send the image "
                          "as application/octet-stream (or image/*) and requests as "
                          "application/json")(scope, receive, send)
        return
    path = scope["path"]
    if "/masks/" in path and not path.endswith((".png", ".json")):
      await _error(404, "masks are served as .png or .json")(scope, receive, send)
      return

    async def send_with_headers(message):
      if message["type"] == "http.response.start":
        headers = list(message.get("headers", []))
        names = {k.lower() for k, _ in headers}
        if b"x-content-type-options" not in names:
          headers.append((b"x-content-type-options", b"nosniff"))
        message = {**message, "headers": headers}
      await send(message)
    await self.app(scope, receive, send_with_headers)
