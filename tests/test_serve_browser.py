"""`samjax serve` in a real browser: headless Chromium driven by Playwright.

The server runs in a thread of this process (uvicorn on a free loopback port) with the
committed trained tiny model. Each test drives the page as a user would and checks
what the canvas shows against `Predictor.predict`, the generator and the files:

* prompt mode: upload, a click, a right click (fed back with `mask_input`), choosing
  another candidate, undo; the mask canvas is, pixel for pixel, `Predictor.predict`'s
  mask for the points the page sent; a dragged box likewise;
* everything mode: the drawn masks are the generator's; hover and click name a mask;
* bulk viewer: a `samjax.bulk.run_job` folder with a broken JSON; the picture, masks,
  filters, failures.

Chromium: $SAMJAX_CHROMIUM, /usr/bin/chromium (Debian's package; `.ci/install_browser.sh`
installs it) or chromium-browser on PATH; Playwright drives it through
`executable_path`, so no `playwright install` download is needed. Without either the
tests skip, saying why. Screenshots go to $SAMJAX_SCREENSHOTS (e.g. docs/screenshots)
when set, else to the test's tmp folder.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the playwright package is not installed")

from samjax.amg.options import AmgOptions
from samjax.masks import decode_rle, encode_rle

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_trained"
AMG = {"points_per_side": 8, "pred_iou_thresh": 0.3, "stability_score_thresh": 0.6}
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]
TIMEOUT_MS = 120_000  # first calls compile the model's functions on a busy CPU


def _chromium():
  for exe in (os.environ.get("SAMJAX_CHROMIUM"), "/usr/bin/chromium",
              shutil.which("chromium"), shutil.which("chromium-browser")):
    if exe and os.access(exe, os.X_OK):
      return exe
  return None


def _png(image: np.ndarray) -> bytes:
  return cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()


@pytest.fixture(scope="module")
def scene():
  from samjax.data.synthetic import make_synthetic_image
  return make_synthetic_image(777, (240, 360))


@pytest.fixture(scope="module")
def model():
  if not FIXTURE.exists():
    pytest.skip("no trained tiny checkpoint at tests/fixtures/tiny_trained")
  from samjax.predictor import load_model
  return load_model(checkpoint=str(FIXTURE))


@pytest.fixture(scope="module")
def predictor(model, scene):
  from samjax.predictor import Predictor
  p = Predictor(model)
  p.set_image(scene[0])
  return p


@pytest.fixture(scope="module")
def folders(tmp_path_factory, scene):
  """(images, masks): a bulk job's output over two images, plus a broken JSON."""
  from samjax.bulk import run_job
  from samjax.data.synthetic import make_synthetic_image
  root = tmp_path_factory.mktemp("serve_browser")
  images, masks = root / "images", root / "masks"
  images.mkdir()
  (images / "scene.png").write_bytes(_png(scene[0]))
  (images / "shapes.png").write_bytes(_png(make_synthetic_image(5, (240, 320))[0]))
  (images / "notes.jpg").write_bytes(b"not a picture")

  def generate(batch):  # The scene's own objects as records, with made-up scores.
    out = []
    for im in batch:
      gt = scene[1] if im.shape == scene[0].shape else make_synthetic_image(5, (240, 320))[1]
      out.append([{"segmentation": encode_rle(m), "area": int(m.sum()),
                   "predicted_iou": 0.95 - 0.1 * k, "stability_score": 0.97,
                   "point_coords": [[0.0, 0.0]], "crop_box": [0, 0, m.shape[1], m.shape[0]]}
                  for k, m in enumerate(gt)])
    return out

  run_job([str(images)], str(masks), generate, progress=False, num_workers=1)
  (masks / "broken.png.json").write_text('{"image": {"file_name": "broken.png", "hei')
  return images, masks


@pytest.fixture(scope="module")
def server(model, folders):
  from samjax.cli.serve import bind
  from samjax.serve.app import create_app
  images, masks = folders
  app = create_app(model, images_dir=str(images), masks_dir=str(masks),
                   allowed_hosts=["127.0.0.1", "localhost"], model_name="tiny_trained")
  sock = bind("127.0.0.1", 0)
  srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
  thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  deadline = time.time() + 30
  while not srv.started and time.time() < deadline:
    time.sleep(0.05)
  assert srv.started, "uvicorn did not start"
  yield f"http://127.0.0.1:{sock.getsockname()[1]}"
  srv.should_exit = True
  thread.join(10)
  sock.close()


@pytest.fixture(scope="module")
def page(server):
  exe = _chromium()
  if exe is None:
    pytest.skip("no Chromium found (set SAMJAX_CHROMIUM, or run .ci/install_browser.sh)")
  with sync_api.sync_playwright() as pw:
    try:
      browser = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_FLAGS)
    except Exception as e:  # pylint: disable=broad-except
      pytest.skip(f"Chromium at {exe} does not start under Playwright: {e}")
    pg = browser.new_page(viewport={"width": 1100, "height": 640})
    pg.set_default_timeout(TIMEOUT_MS)
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server + "/")
    try:
      pg.wait_for_function("() => document.body.dataset.ready === '1'", timeout=30_000)
    except sync_api.TimeoutError:
      pytest.fail(f"the page did not get ready: errors {errors}, status "
                  f"{pg.locator('#status').text_content()!r}")
    yield pg
    browser.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
  out = os.environ.get("SAMJAX_SCREENSHOTS")
  path = Path(out) if out else tmp_path_factory.mktemp("screenshots")
  path.mkdir(parents=True, exist_ok=True)
  return path


# ------------------------------------------------------------------------------ helpers


def _canvas_rgba(page, canvas: str) -> np.ndarray:
  """(H, W, 4) uint8: the canvas's pixels (base64 over the wire)."""
  h, w, b64 = page.evaluate("""(id) => {
    const c = document.getElementById(id);
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let s = '';
    for (let i = 0; i < d.length; i += 8192) s += String.fromCharCode(...d.subarray(i, i + 8192));
    return [c.height, c.width, btoa(s)];
  }""", canvas)
  return np.frombuffer(base64.b64decode(b64), np.uint8).reshape(h, w, 4)


def _canvas_alpha(page, canvas="mask") -> np.ndarray:
  """(H, W) bool: where the canvas has anything drawn."""
  return _canvas_rgba(page, canvas)[..., 3] > 0


def _canvas_rgb(page, canvas="img") -> np.ndarray:
  return _canvas_rgba(page, canvas)[..., :3]


def _screenshot(page, path: Path) -> None:
  """A small PNG of the page (~150 KB): 3/4 size, 64 colours."""
  from PIL import Image
  shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
  shot = shot.resize((shot.width * 3 // 4, shot.height * 3 // 4), Image.LANCZOS)
  shot.quantize(64, dither=Image.Dither.NONE).save(path, optimize=True)


def _screen(page, x: float, y: float):
  """The page coordinates of image pixel (x, y)'s centre."""
  box = page.locator("#ui").bounding_box()
  w, h = page.evaluate("[document.getElementById('ui').width, document.getElementById('ui').height]")
  return box["x"] + (x + 0.5) * box["width"] / w, box["y"] + (y + 0.5) * box["height"] / h


def _click(page, x, y, button="left"):
  sx, sy = _screen(page, x, y)
  page.mouse.move(sx, sy)
  page.mouse.down(button=button)
  page.mouse.up(button=button)


def _wait_history(page, n: int):
  page.wait_for_function(f"() => window.samjax.history.length === {n} && "
                         "document.body.dataset.busy === '0'")


def _open_scene(page, folders):
  page.locator("#tab-prompt").click()
  page.set_input_files("#upload", str(folders[0] / "scene.png"))
  page.wait_for_function(
      "() => document.getElementById('status').textContent.startsWith('ready')")
  assert page.evaluate("window.samjax.history.length") == 0


def _interior_point(mask):
  dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
  y, x = np.unravel_index(np.argmax(dist), dist.shape)
  return int(x), int(y)


# ------------------------------------------------------------------------------ tests


def test_prompt_mode_click_matches_predictor(page, folders, scene, predictor, shots):
  _open_scene(page, folders)
  assert np.array_equal(_canvas_rgb(page), scene[0]), "the picture on the canvas"
  obj = max(scene[1], key=lambda m: m.sum())
  x, y = _interior_point(obj)
  bx, by = 5, 5
  # Expected masks first: the server then finds the functions compiled, and the
  # status line (and screenshot) shows the latency of a click, not of compiling.
  masks, scores, logits = predictor.predict(np.array([[x, y]]), np.array([1]))
  best = int(np.argmax(scores))
  masks2, scores2, _ = predictor.predict(np.array([[x, y], [bx, by]]), np.array([1, 0]),
                                         mask_input=logits[best][None])
  _click(page, x, y)
  _wait_history(page, 1)
  req = page.evaluate("window.samjax.history[0].request")
  assert req["point_coords"] == [[x, y]] and req["point_labels"] == [1]
  assert "mask_input" not in req
  drawn = _canvas_alpha(page)
  assert drawn.any(), "no mask overlay appeared"
  assert np.array_equal(drawn, masks[best]), \
      f"{np.count_nonzero(drawn != masks[best])} pixels differ from Predictor.predict"
  api_mask = decode_rle(page.evaluate(
      "(() => { const s = window.samjax.history[0]; "
      "return s.pred.masks[s.chosen].segmentation; })()"))
  assert np.array_equal(api_mask, drawn)
  assert page.locator("#candidates .cand").count() == 3

  # A right click: background point, the chosen candidate fed back as mask_input.
  _click(page, bx, by, button="right")
  _wait_history(page, 2)
  req = page.evaluate("window.samjax.history[1].request")
  assert req["point_coords"] == [[x, y], [bx, by]] and req["point_labels"] == [1, 0]
  assert req["mask_input"]["index"] == best
  assert np.array_equal(_canvas_alpha(page), masks2[int(np.argmax(scores2))])

  # Choosing another candidate redraws it; undo brings the first click back.
  other = (int(np.argmax(scores2)) + 1) % 3
  page.locator(f"#candidates .cand[data-index='{other}']").click()
  page.wait_for_function(f"() => window.samjax.history[1].chosen === {other}")
  assert np.array_equal(_canvas_alpha(page), masks2[other])
  page.locator(f"#candidates .cand[data-index='{int(np.argmax(scores2))}']").click()
  href = page.locator("#export-png").get_attribute("href")
  assert href.endswith(f"/masks/{int(np.argmax(scores2))}.png")
  _screenshot(page, shots / "prompt.png")
  page.locator("#undo").click()
  _wait_history(page, 1)
  assert np.array_equal(_canvas_alpha(page), masks[best])

  # Two clicks in quick succession: the second builds on the first's result.
  _click(page, x + 3, y)
  _click(page, x, y + 3, button="right")
  _wait_history(page, 3)
  reqs = page.evaluate("window.samjax.history.map((s) => s.request)")
  assert reqs[2]["point_coords"] == [[x, y], [x + 3, y], [x, y + 3]]
  assert reqs[2]["point_labels"] == [1, 1, 0]
  assert reqs[2]["mask_input"]["prediction_id"] == \
      page.evaluate("window.samjax.history[1].pred.prediction_id")


def test_prompt_mode_box_matches_predictor(page, folders, scene, predictor, shots):
  _open_scene(page, folders)
  obj = sorted(scene[1], key=lambda m: m.sum())[-2]
  ys, xs = np.nonzero(obj)
  x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
  masks, scores, _ = predictor.predict(box=np.array([x0, y0, x1, y1]))
  page.mouse.move(*_screen(page, x0, y0))
  page.mouse.down()
  page.mouse.move(*_screen(page, (x0 + x1) / 2, (y0 + y1) / 2), steps=3)
  page.mouse.move(*_screen(page, x1, y1), steps=3)
  page.mouse.up()
  _wait_history(page, 1)
  req = page.evaluate("window.samjax.history[0].request")
  assert req["box"] == [x0, y0, x1, y1] and "point_coords" not in req
  drawn = _canvas_alpha(page)
  assert np.array_equal(drawn, masks[int(np.argmax(scores))])
  iou = (drawn & obj).sum() / (drawn | obj).sum()
  assert iou > 0.5, f"the box's mask has IoU {iou:.3f} with the object"
  _screenshot(page, shots / "box.png")
  page.keyboard.press("Escape")
  _wait_history(page, 0)
  assert not _canvas_alpha(page).any()


def test_everything_mode_matches_generator(page, folders, scene, model, shots):
  from samjax.amg.generator import AutomaticMaskGenerator
  want = AutomaticMaskGenerator(model, options=AmgOptions(**AMG, output_mode="coco_rle")
                                ).generate(scene[0])
  _open_scene(page, folders)
  page.locator("#tab-auto").click()
  for name, value in AMG.items():
    page.fill(f"#opt-{name}", str(value))
  page.locator("#auto-run").click()
  page.wait_for_function("() => window.samjax.auto !== null && document.body.dataset.busy === '0'")
  records = page.evaluate("window.samjax.auto.job.records")
  assert [r["segmentation"] for r in records] == [r["segmentation"] for r in want]
  assert len(want) >= 3
  masks = [decode_rle(r["segmentation"]) for r in want]
  assert np.array_equal(_canvas_alpha(page), np.any(masks, axis=0))

  # Hover names the mask drawn on top (the smallest one there); click selects it.
  order = sorted(range(len(want)), key=lambda k: -want[k]["area"])
  top = np.full(masks[0].shape, -1)
  for k in order:
    top[masks[k]] = k
  k = order[-1]
  x, y = _interior_point(top == k)
  page.mouse.move(*_screen(page, x, y))
  page.wait_for_function(f"() => window.samjax.hover === {k}")
  assert "predicted IoU" in page.locator("#hover-info").text_content()
  _click(page, x, y)
  page.wait_for_function(f"() => window.samjax.selected === {k}")
  assert page.locator("#sel-png").get_attribute("href").endswith(f"/masks/{k}.png")
  _screenshot(page, shots / "everything.png")


def test_bulk_viewer(page, folders, scene, shots):
  images, masks_dir = folders
  page.locator("#tab-bulk").click()
  page.wait_for_selector("#bulk-list li")
  broken = page.locator("#bulk-list li.broken")
  assert broken.count() == 1 and "broken" in broken.first.text_content()
  assert "(1)" in page.locator("#bulk-failures-n").text_content()  # notes.jpg

  page.locator("#bulk-list li[data-path='scene.png.json']").click()
  page.wait_for_function("() => window.samjax.bulk.masks !== null && "
                         "window.samjax.bulk.path === 'scene.png.json' && "
                         "document.body.dataset.busy === '0'")
  assert np.array_equal(_canvas_rgb(page), scene[0])
  record = json.loads((masks_dir / "scene.png.json").read_text())
  masks = [decode_rle(a["segmentation"]) for a in record["annotations"]]
  assert np.array_equal(_canvas_alpha(page), np.any(masks, axis=0))

  # Filter on predicted IoU: only the masks at or above it stay.
  cut = 0.8
  page.evaluate(f"""() => {{ const el = document.getElementById('f-iou');
                   el.value = '{cut}'; el.dispatchEvent(new Event('input')); }}""")
  kept = [m for m, a in zip(masks, record["annotations"]) if a["predicted_iou"] >= cut]
  assert 0 < len(kept) < len(masks)
  assert np.array_equal(_canvas_alpha(page), np.any(kept, axis=0))
  assert f"{len(kept)} of {len(masks)}" in page.locator("#bulk-shown").text_content()
  page.locator("#bulk-failures-box summary").click()
  _screenshot(page, shots / "bulk.png")

  page.locator("#bulk-list li.broken").first.click()
  page.wait_for_function("() => document.getElementById('empty').textContent.includes('broken')")
  assert "not valid JSON" in page.locator("#empty").text_content()
