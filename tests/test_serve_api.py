"""`samjax serve`'s JSON API, through Starlette's test client (no real port).

The model is the committed trained tiny checkpoint (tests/fixtures/tiny_trained), on a
synthetic scene like its training data, so a click on an object gives that object.

* A click's masks are `Predictor.predict`'s for the same prompts, pixel for pixel,
  including the next click with the chosen candidate fed back as `mask_input`, and
  boxes; the exports (PNG, RLE JSON) are the same masks.
* The automask endpoint returns the generator's records (after JSON: NaN -> null).
* Bad, oversize and too-many-pixel uploads, bad requests and path traversal attempts
  (`..`, absolute, symlinks, URL-encoded, backslashes, hidden files) get a 4xx JSON
  error; no answer carries a traceback.
* The bulk viewer lists a `samjax.bulk.run_job` output folder, marks broken JSONs as
  broken, serves records, pictures, failures and settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
with warnings.catch_warnings():  # Starlette >= 1.x prefers httpx2 (Python >= 3.11 only).
  warnings.simplefilter("ignore")
  from starlette.testclient import TestClient

from samjax.amg.options import AmgOptions
from samjax.masks import decode_rle, encode_rle
from samjax.serve.app import create_app
from samjax.serve.engine import json_safe

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_trained"
# The trained tiny model keeps a handful of masks with these (the defaults keep none).
AMG = {"points_per_side": 8, "pred_iou_thresh": 0.3, "stability_score_thresh": 0.6}
MAX_UPLOAD = 1 << 20
SECRET = b"top secret, outside the served folders"


def _png(image: np.ndarray) -> bytes:
  ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
  assert ok
  return buf.tobytes()


def _no_traceback(r) -> None:
  assert "Traceback" not in r.text and 'File "' not in r.text, r.text


def _error(r, status: int) -> str:
  assert r.status_code == status, (r.status_code, r.text)
  _no_traceback(r)
  body = r.json()
  assert body["status"] == status and isinstance(body["error"], str) and body["error"]
  return body["error"]


@pytest.fixture(scope="module")
def model():
  if not FIXTURE.exists():
    pytest.skip("no trained tiny checkpoint at tests/fixtures/tiny_trained")
  from samjax.predictor import load_model
  return load_model(checkpoint=str(FIXTURE))


@pytest.fixture(scope="module")
def scene():
  from samjax.data.synthetic import make_synthetic_image
  image, masks, _ = make_synthetic_image(777, (240, 360))
  return image, masks


@pytest.fixture(scope="module")
def predictor(model, scene):
  from samjax.predictor import Predictor
  p = Predictor(model)
  p.set_image(scene[0])
  return p


@pytest.fixture(scope="module")
def folders(tmp_path_factory, model, scene):
  """(images dir, masks dir, outside dir): a real bulk job's output plus planted files."""
  from samjax.bulk import run_job
  from samjax.data.synthetic import make_synthetic_image
  root = tmp_path_factory.mktemp("serve")
  images, masks, outside = root / "images", root / "masks", root / "outside"
  for d in (images, masks, outside):
    d.mkdir()
  (images / "sub").mkdir()
  (images / "scene.png").write_bytes(_png(scene[0]))
  (images / "sub" / "other.png").write_bytes(_png(make_synthetic_image(5, (120, 160))[0]))
  (images / "notes.png").write_bytes(b"this is not a picture")  # -> failures.jsonl

  def fake_generate(batch):  # Records in the generator's format, from the GT-like scene.
    out = []
    for im in batch:
      h, w = im.shape[:2]
      anns = []
      for k in range(4):
        m = np.zeros((h, w), bool)
        m[10 + 10 * k:h // 2 + 10 * k, 15 * k:w // 2 + 20 * k] = True
        anns.append({"segmentation": encode_rle(m), "area": int(m.sum()),
                     "bbox": [15 * k, 10 + 10 * k, w // 2 + 5 * k, h // 2 - 10],
                     "predicted_iou": 0.6 + 0.1 * k, "stability_score": 0.99 - 0.1 * k,
                     "point_coords": [[20.0, 20.0]], "crop_box": [0, 0, w, h]})
      out.append(anns)
    return out

  summary = run_job([str(images)], str(masks), fake_generate, progress=False,
                    num_workers=1)
  assert summary.done == 2 and summary.failed == 1
  (masks / "truncated.png.json").write_text('{"image": {"file_name": "x", "height": 2')
  (masks / "wrong.png.json").write_text(json.dumps({"image": {"height": 4, "width": 4},
                                                    "annotations": [{"segmentation": 3}]}))
  (masks / "empty.png.json").write_bytes(b"")
  with open(masks / "failures.jsonl", "a") as f:
    f.write("{torn line\n")
  (masks / "job.json").write_text(json.dumps({"options": AMG, "model": "tiny"}))
  (outside / "secret.json").write_bytes(SECRET)
  (outside / "secret.png").write_bytes(_png(scene[0]))
  os.symlink(outside / "secret.json", masks / "link.png.json")
  os.symlink(outside, masks / "linkdir")
  os.symlink(outside / "secret.png", images / "link.png")
  (masks / ".samjax-claims").mkdir(exist_ok=True)
  (masks / ".samjax-claims" / "x.json").write_bytes(SECRET)
  return images, masks, outside


@pytest.fixture(scope="module")
def client(model, folders):
  images, masks, _ = folders
  app = create_app(model, images_dir=str(images), masks_dir=str(masks),
                   max_upload_bytes=MAX_UPLOAD, max_pixels=4_000_000, cache_size=3)
  with TestClient(app, raise_server_exceptions=False) as c:
    yield c


@pytest.fixture(scope="module")
def opened(client, scene):
  r = client.post("/api/images?name=scene.png", content=_png(scene[0]),
                  headers={"Content-Type": "application/octet-stream"})
  assert r.status_code == 200, r.text
  return r.json()


def _predict(client, **body):
  r = client.post("/api/predict", json=body)
  assert r.status_code == 200, r.text
  return r.json()


def _same_as_predictor(out, masks, scores):
  assert len(out["masks"]) == len(masks)
  for entry, mask, score in zip(out["masks"], masks, scores):
    got = decode_rle(entry["segmentation"])
    assert got.shape == mask.shape and np.array_equal(got, mask), \
        f"candidate {entry['index']}: {np.count_nonzero(got != mask)} pixels differ"
    assert entry["predicted_iou"] == float(score)
    assert entry["area"] == int(mask.sum())
  assert out["best"] == int(np.argmax(scores))


# ------------------------------------------------------------------------------ prompts


def test_click_masks_equal_predictor(client, opened, predictor, scene):
  image, gt = scene
  assert (opened["width"], opened["height"]) == (image.shape[1], image.shape[0])
  # A point at the interior-most pixel of the largest object.
  obj = max(gt, key=lambda m: m.sum())
  dist = cv2.distanceTransform(obj.astype(np.uint8), cv2.DIST_L2, 5)
  y, x = (int(v) for v in np.unravel_index(np.argmax(dist), dist.shape))

  first = _predict(client, image_id=opened["image_id"], point_coords=[[x, y]],
                   point_labels=[1])
  masks, scores, logits = predictor.predict(np.array([[x, y]]), np.array([1]))
  _same_as_predictor(first, masks, scores)
  best = decode_rle(first["masks"][first["best"]]["segmentation"])
  iou = (best & obj).sum() / (best | obj).sum()
  assert iou > 0.5, f"the trained model's best mask has IoU {iou:.3f} with the object"

  # The next click, with the chosen (here: not the best) candidate fed back.
  k = (first["best"] + 1) % 3
  second = _predict(client, image_id=opened["image_id"], point_coords=[[x, y], [5, 5]],
                    point_labels=[1, 0],
                    mask_input={"prediction_id": first["prediction_id"], "index": k})
  masks2, scores2, _ = predictor.predict(np.array([[x, y], [5, 5]]), np.array([1, 0]),
                                         mask_input=logits[k][None])
  _same_as_predictor(second, masks2, scores2)

  # A box alone, and a box with a point, single mask.
  box = [int(v) for v in (np.argwhere(obj.any(0))[[0, -1]].ravel().tolist()
                          + np.argwhere(obj.any(1))[[0, -1]].ravel().tolist())]
  box = [box[0], box[2], box[1], box[3]]
  third = _predict(client, image_id=opened["image_id"], box=box)
  _same_as_predictor(third, *predictor.predict(box=np.array(box))[:2])
  fourth = _predict(client, image_id=opened["image_id"], box=box, point_coords=[[x, y]],
                    point_labels=[1], multimask_output=False)
  _same_as_predictor(fourth, *predictor.predict(np.array([[x, y]]), np.array([1]),
                                                np.array(box), multimask_output=False)[:2])

  # Exports: PNG and COCO RLE JSON of a candidate.
  pid = first["prediction_id"]
  r = client.get(f"/api/predictions/{pid}/masks/{k}.png")
  assert r.status_code == 200 and r.headers["content-type"] == "image/png"
  png = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_UNCHANGED)
  assert np.array_equal(png > 0, masks[k])
  r = client.get(f"/api/predictions/{pid}/masks/{k}.json")
  assert "attachment" in r.headers["content-disposition"]
  assert np.array_equal(decode_rle(r.json()["segmentation"]), masks[k])
  _error(client.get(f"/api/predictions/{pid}/masks/3.png"), 404)
  _error(client.get(f"/api/predictions/{pid}/masks/0.exe"), 404)


def test_image_is_embedded_once(client, opened, scene):
  r = client.post("/api/images", content=_png(scene[0]), headers={"Content-Type": "image/png"})
  assert r.json()["cached"] is True and r.json()["image_id"] == opened["image_id"]
  r = client.get(f"/api/images/{opened['image_id']}/image.png")
  decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR),
                         cv2.COLOR_BGR2RGB)
  assert np.array_equal(decoded, scene[0])
  assert any(im["image_id"] == opened["image_id"] for im in client.get("/api/images")
             .json()["images"])


def test_lru_evicts_and_says_so(client, opened):
  # cache_size=3: three new images push the scene out.
  for seed in range(3):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (32 + seed, 48, 3), dtype=np.uint8)
    assert client.post("/api/images", content=_png(img),
                       headers={"Content-Type": "image/png"}).status_code == 200
  msg = _error(client.post("/api/predict", json={"image_id": opened["image_id"],
                                                 "point_coords": [[1, 1]],
                                                 "point_labels": [1]}), 404)
  assert "open it again" in msg
  # Opening it again (from the library this time) brings it back under the same id.
  r = client.post("/api/library/open", json={"path": "scene.png"})
  assert r.status_code == 200 and r.json()["image_id"] == opened["image_id"]


def test_concurrent_clicks_are_serialized(client, opened, predictor):
  client.post("/api/library/open", json={"path": "scene.png"})
  engine = client.app.state.engine
  results, errors = {}, []

  def click(i):
    try:
      results[i] = engine.predict(opened["image_id"], [[40 + 10 * i, 60]], [1])
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
  threads = [threading.Thread(target=click, args=(i,)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  for i, out in results.items():
    _same_as_predictor(out, *predictor.predict(np.array([[40 + 10 * i, 60]]),
                                               np.array([1]))[:2])


def test_bad_prompts_are_4xx(client, opened):
  client.post("/api/library/open", json={"path": "scene.png"})
  iid = opened["image_id"]
  cases = [
      ({"image_id": iid}, "at least one point"),
      ({"image_id": iid, "point_coords": [[1, 2]], "point_labels": [3]}, "foreground"),
      ({"image_id": iid, "point_coords": [[1, 2]], "point_labels": [1, 0]}, "point"),
      ({"image_id": iid, "point_coords": [[1, "a"]], "point_labels": [1]}, "numbers"),
      ({"image_id": iid, "point_coords": [[1, 2, 3]], "point_labels": [1]}, "shape"),
      ({"image_id": iid, "box": [1, 2, 3]}, "box"),
      ({"image_id": iid, "box": [0, 0, 5, 5], "mask_input": {"index": 0}}, "prediction_id"),
      ({"image_id": iid, "box": [0, 0, 5, 5], "bogus": 1}, "unknown field"),
      ({"image_id": 3, "box": [0, 0, 5, 5]}, "image_id"),
      ({"image_id": iid, "box": [0, 0, 5, 5], "multimask_output": "yes"}, "true or false"),
  ]
  for body, words in cases:
    msg = _error(client.post("/api/predict", json=body), 400)
    assert words in msg, (body, msg)
  for raw in ("1e400", "NaN", "-Infinity"):  # Python's JSON parser takes these
    msg = _error(client.post("/api/predict", content=(
        f'{{"image_id": "{iid}", "point_coords": [[{raw}, 2]], "point_labels": [1]}}'),
        headers={"Content-Type": "application/json"}), 400)
    assert "NaN or infinite" in msg, msg
  msg = _error(client.post("/api/predict", json={
      "image_id": iid, "box": [0, 0, 5, 5],
      "mask_input": {"prediction_id": f"{iid}.999999", "index": 0}}), 410)
  assert "no longer kept" in msg
  _error(client.post("/api/predict", content=b"{not json",
                     headers={"Content-Type": "application/json"}), 400)
  _error(client.post("/api/predict", content=b"[1, 2]",
                     headers={"Content-Type": "application/json"}), 400)
  _error(client.post("/api/predict", content=json.dumps({"image_id": iid}),
                     headers={"Content-Type": "text/plain"}), 415)
  _error(client.get("/api/jobs/nope"), 404)
  _error(client.get("/api/nothing-here"), 404)


# ------------------------------------------------------------------------------ uploads


def test_bad_uploads_are_4xx(client, scene):
  def upload(data, ctype="application/octet-stream", **kw):
    return client.post("/api/images", content=data, headers={"Content-Type": ctype}, **kw)

  assert "zero-size" in _error(upload(b""), 400)
  assert "not a usable image" in _error(upload(b"GIF? no, just text" * 10), 400)
  png = _png(scene[0])
  _error(upload(png[:len(png) // 2]), 400)  # truncated
  jpeg = cv2.imencode(".jpg", scene[0])[1].tobytes()
  assert "truncated" in _error(upload(jpeg[:-200]), 400)
  # Oversize: refused from Content-Length, and while streaming when there is none.
  big = b"\x89PNG" + bytes(MAX_UPLOAD + 10)
  assert "limit" in _error(upload(big), 413)

  def chunks():
    for _ in range(MAX_UPLOAD // 65536 + 2):
      yield bytes(65536)
  assert "limit" in _error(upload(chunks()), 413)
  # A small file whose header claims 100000 x 100000 pixels: refused before decoding.
  ihdr = b"IHDR" + (100000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
  bomb = (b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + ihdr
          + zlib.crc32(ihdr).to_bytes(4, "big"))
  assert "too large" in _error(upload(bomb), 413)
  # Types a cross-site form could send without a preflight are refused.
  assert "refused" in _error(upload(png, "text/plain"), 415)
  _error(upload(png, "multipart/form-data; boundary=x"), 415)


# ------------------------------------------------------------------------------ automask


def test_automask_equals_generator(client, opened, model, scene):
  from samjax.amg.generator import AutomaticMaskGenerator
  client.post("/api/library/open", json={"path": "scene.png"})
  r = client.post("/api/automask", json={"image_id": opened["image_id"], "options": AMG,
                                         "wait": True})
  assert r.status_code == 200, r.text
  job = r.json()
  assert job["status"] == "done"
  want = AutomaticMaskGenerator(model, options=AmgOptions(**AMG, output_mode="coco_rle")
                                ).generate(scene[0])
  assert len(want) >= 3
  assert job["records"] == json.loads(json.dumps(json_safe(want)))
  assert job["options"]["points_per_side"] == 8 and job["options"]["box_nms_thresh"] == 0.7

  # The same job without waiting: 202, then polled; masks exported from it.
  r = client.post("/api/automask", json={"image_id": opened["image_id"], "options": AMG})
  assert r.status_code == 202 and r.json()["status"] in ("queued", "running", "done")
  jid = r.json()["job_id"]
  client.app.state.engine.job(jid).done.wait(120)
  polled = client.get(f"/api/jobs/{jid}").json()
  assert polled["status"] == "done" and polled["records"] == job["records"]
  r = client.get(f"/api/jobs/{jid}/masks/0.png")
  png = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_UNCHANGED)
  assert np.array_equal(png > 0, decode_rle(want[0]["segmentation"]))
  assert any(j["job_id"] == jid for j in client.get("/api/jobs").json()["jobs"])


def test_automask_options_come_from_amg_options(client, opened):
  fields = {f["name"]: f for f in client.get("/api/automask/options").json()["options"]}
  defaults = AmgOptions()
  assert set(fields) == {f.name for f in AmgOptions.cli_fields()} - {"output_mode"}
  for name, f in fields.items():
    assert f["default"] == getattr(defaults, name) and f["help"]
  iid = opened["image_id"]
  msg = _error(client.post("/api/automask", json={"image_id": iid,
                                                  "options": {"points_per_side": 0}}), 400)
  assert "points_per_side must be >= 1" in msg
  assert "unknown" in _error(client.post("/api/automask", json={
      "image_id": iid, "options": {"output_mode": "binary_mask"}}), 400)
  _error(client.post("/api/automask", json={"image_id": iid, "options": [1]}), 400)
  _error(client.post("/api/automask", json={"image_id": "missing", "options": {}}), 404)


# ------------------------------------------------------------------------------ bulk viewer


def test_bulk_listing_marks_broken_outputs(client):
  data = client.get("/api/bulk").json()
  items = {it["path"]: it for it in data["items"]}
  assert items["scene.png.json"]["status"] == "ok" and items["scene.png.json"]["masks"] == 4
  assert items["sub/other.png.json"]["status"] == "ok"
  for name, words in (("truncated.png.json", "not valid JSON"), ("empty.png.json", "empty"),
                      ("wrong.png.json", "COCO RLE")):
    assert items[name]["status"] == "broken" and words in items[name]["reason"], items[name]
  assert "link.png.json" not in items  # a symlink out of the folder is not listed
  assert not any(p.startswith((".", "linkdir")) for p in items)
  assert "job.json" not in items and data["broken"] == 3

  r = client.get("/api/bulk/record", params={"path": "truncated.png.json"})
  assert r.status_code == 422 and r.json()["broken"] is True
  _no_traceback(r)
  page = client.get("/api/bulk", params={"offset": 1, "limit": 2}).json()
  assert page["total"] == data["total"] and len(page["items"]) == 2


def test_bulk_record_picture_failures_settings(client, folders, scene):
  images, masks, _ = folders
  rec = client.get("/api/bulk/record", params={"path": "scene.png.json"}).json()
  on_disk = json.loads((masks / "scene.png.json").read_text())
  assert rec["has_picture"] is True
  assert [a["segmentation"] for a in rec["annotations"]] == \
      [a["segmentation"] for a in on_disk["annotations"]]
  assert [a["predicted_iou"] for a in rec["annotations"]] == \
      [a["predicted_iou"] for a in on_disk["annotations"]]
  r = client.get("/api/bulk/image", params={"path": "scene.png.json"})
  assert r.status_code == 200
  pic = cv2.cvtColor(cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR),
                     cv2.COLOR_BGR2RGB)
  assert np.array_equal(pic, scene[0])
  assert client.get("/api/bulk/image", params={"path": "sub/other.png.json"}).status_code == 200

  failures = client.get("/api/bulk/failures").json()["failures"]
  assert any(f.get("stage") == "load" and f["path"].endswith("notes.png") for f in failures)
  assert any(f.get("broken") for f in failures)
  settings = client.get("/api/bulk/settings").json()
  assert settings["settings_file"] == "job.json" and settings["settings"]["options"] == AMG
  assert settings["outputs"] == 5


@pytest.mark.parametrize("path, status", [
    ("../outside/secret.json", 400),
    ("sub/../../outside/secret.json", 400),
    ("/etc/passwd", 400),
    ("..", 400),
    ("..\\outside\\secret.json", 400),
    ("link.png.json", 400),             # symlink to a file outside
    ("linkdir/secret.json", 400),       # symlinked folder leading outside
    (".samjax-claims/x.json", 400),     # hidden: claims and temporaries
    ("C:/Windows/win.ini", 400),
    ("no/such.json", 404),
])
def test_bulk_traversal_refused(client, path, status):
  for route in ("/api/bulk/record", "/api/bulk/image"):
    r = client.get(route, params={"path": path})
    _error(r, status)
    assert SECRET not in r.content


def test_url_encoded_traversal_refused(client):
  for raw in ("%2e%2e%2foutside%2fsecret.json", "..%2Foutside%2Fsecret.json",
              "%2E%2E/%2E%2E/etc/passwd", "%2Fetc%2Fpasswd", "sub%2F..%2F..%2Foutside%2Fsecret.json"):
    for route in ("/api/bulk/record", "/api/bulk/image"):
      r = client.get(f"{route}?path={raw}")
      assert 400 <= r.status_code < 500 and SECRET not in r.content, (raw, r.status_code)
      _no_traceback(r)
  # Encoded twice: decoded once, it is a literal file name "%2e%2e/...", which is missing.
  for route in ("/api/bulk/record", "/api/bulk/image"):
    r = client.get(f"{route}?path=%252e%252e%252foutside%252fsecret.json")
    assert r.status_code == 404 and SECRET not in r.content
  for raw in ("/static/..%2f..%2fapp.py", "/static/%2e%2e/app.py", "/static/../serve/app.py"):
    r = client.get(raw)
    assert r.status_code == 404 and b"create_app" not in r.content, raw


def test_library_is_contained(client):
  files = client.get("/api/library").json()["files"]
  assert "scene.png" in files and "sub/other.png" in files and "link.png" not in files
  for path in ("../outside/secret.png", "/etc/passwd", "link.png", "%2e%2e/x.png"):
    r = client.post("/api/library/open", json={"path": path})
    assert r.status_code in (400, 404), (path, r.status_code)
    _no_traceback(r)
  assert "not a usable image" in _error(client.post("/api/library/open",
                                                    json={"path": "notes.png"}), 400)


def test_internal_errors_are_one_line(client, monkeypatch):
  def broken():
    raise ZeroDivisionError("deep inside")
  monkeypatch.setattr(client.app.state.engine, "images", broken)
  msg = _error(client.get("/api/images"), 500)
  assert "ZeroDivisionError" in msg and "deep inside" not in msg


def test_host_header_is_checked(model):
  app = create_app(model, allowed_hosts=["127.0.0.1", "localhost"])
  with TestClient(app, base_url="http://127.0.0.1:8000") as c:
    assert c.get("/api/info").status_code == 200
  with TestClient(app, base_url="http://rebound.example:8000") as c:
    assert c.get("/api/info").status_code == 400


def test_page_is_self_contained(client):
  r = client.get("/")
  assert r.status_code == 200 and "default-src 'self'" in r.headers["content-security-policy"]
  static = Path(__file__).parent.parent / "samjax" / "serve" / "static"
  for name in ("index.html", "app.js", "rle.js", "style.css"):
    text = (static / name).read_text()
    assert "http://" not in text and "https://" not in text, name
    assert client.get(f"/static/{name}").status_code == 200
  routes = client.get("/api").json()["routes"]
  assert {"POST /api/predict", "POST /api/automask", "GET /api/jobs/{job_id}"} <= \
      {f"{r['method']} {r['path']}" for r in routes}


def test_cli_parses_without_jax_and_checks_folders(tmp_path):
  code = ("import sys; from samjax.cli import build_parser; "
          "a = build_parser().parse_args(['serve', '--port', '0', '--images', '.']); "
          "assert a.host == '127.0.0.1', a.host; "
          "bad = [m for m in ('jax', 'starlette', 'uvicorn') if m in sys.modules]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
  from samjax.cli import main
  missing = str(tmp_path / "missing")
  assert main(["serve", "--masks", missing, "--checkpoint", str(FIXTURE), "--port", "0"]) == 2
