"""Latency of one click in `samjax serve`, next to the bare `Predictor.predict`.

For each model, a real server (uvicorn on a free loopback port, in this process) gets
the image once (`POST /api/images`), then a sequence of clicks (`POST /api/predict`),
each adding a point to the object's earlier ones and feeding the previous best
candidate back as `mask_input`, as the page does (a new object every 6 points). The same prompts then go through `Predictor.predict` directly on the same
embedding. Both are timed after warm-up calls that compile every variant, so the
numbers are steady-state latencies.

Columns:
  * predict: `Predictor.predict` alone (prompt encoder + decoder + upsampling to the
    image size, masks to numpy);
  * server: the same call inside the server (`timing_ms.predict`), plus the RLE encoding
    of the three masks (`timing_ms.encode`);
  * round trip: what the client waits for, HTTP and JSON included;
  * overhead: round trip - predict (medians).

Models: `tiny` is the committed trained checkpoint (tests/fixtures/tiny_trained);
`vit_b` is a randomized ViT-B (`samjax.reference.save_random_checkpoint` +
`samjax.convert_checkpoint`; needs torch and segment_anything), whose masks are
meaningless but whose cost is the real model's.

  python -m benchmarks.serve_latency [--models tiny,vit_b] [--clicks 30] [--image HxW]
                                     [--out results.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny_trained"


def _scene(h: int, w: int) -> np.ndarray:
  from samjax.data.synthetic import make_synthetic_image
  return make_synthetic_image(777, (h, w))[0]


def _png(image: np.ndarray) -> bytes:
  import cv2
  return cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()


def _load(name: str, workdir: str):
  import samjax
  from samjax.predictor import load_model
  if name == "tiny":
    return load_model(checkpoint=str(TINY))
  from samjax import reference
  cfg = samjax.get_config(name)
  pth = os.path.join(workdir, f"{name}_random.pth")
  reference.save_random_checkpoint(cfg, pth, seed=0)
  ckpt = os.path.join(workdir, f"{name}_random")
  samjax.convert_checkpoint(pth, ckpt)
  os.unlink(pth)
  return load_model(checkpoint=ckpt)


class _Server:
  """The app on a real loopback port, in a thread; `post(path, json)` over keep-alive."""

  def __init__(self, model):
    import uvicorn
    from samjax.cli.serve import bind
    from samjax.serve.app import create_app
    self.app = create_app(model, allowed_hosts=["127.0.0.1"], max_upload_bytes=200 << 20)
    self.sock = bind("127.0.0.1", 0)
    self.port = self.sock.getsockname()[1]
    # A long keep-alive: the bare-Predictor runs between requests take seconds.
    self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning",
                                                access_log=False, timeout_keep_alive=3600))
    self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                   daemon=True)
    self.thread.start()
    while not self.server.started:
      time.sleep(0.02)
    self.conn = http.client.HTTPConnection("127.0.0.1", self.port)

  def post(self, path: str, body: bytes, ctype: str) -> Dict[str, Any]:
    try:
      self.conn.request("POST", path, body=body, headers={"Content-Type": ctype})
      r = self.conn.getresponse()
    except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
      self.conn.close()  # The server closed the idle connection: reconnect once.
      self.conn.request("POST", path, body=body, headers={"Content-Type": ctype})
      r = self.conn.getresponse()
    data = json.loads(r.read())
    if r.status != 200:
      raise RuntimeError(f"{path}: {r.status} {data}")
    return data

  def close(self):
    self.conn.close()
    self.server.should_exit = True
    self.thread.join(10)
    self.sock.close()


#: Points per object: then the next object starts afresh (8 points share one compiled
#: decoder, see samjax.model.point_bucket; more would time a compilation).
POINTS_PER_OBJECT = 6


def _clicks(n: int, h: int, w: int, seed: int = 0) -> List[List[List[float]]]:
  """n prompt sets in pixels: on each object the user adds points one by one."""
  rng = np.random.default_rng(seed)
  pts = np.stack([rng.integers(0, w, n), rng.integers(0, h, n)], 1).tolist()
  return [pts[i - i % POINTS_PER_OBJECT:i + 1] for i in range(n)]


def _labels(k: int) -> List[int]:
  return [1 if j % 3 != 2 else 0 for j in range(k)]  # every third point is background


def _pct(xs: List[float], q: float) -> float:
  return float(np.percentile(np.asarray(xs), q))


def bench_model(name: str, image: np.ndarray, n_clicks: int, warmup: int,
                workdir: str) -> Dict[str, Any]:
  from samjax.predictor import Predictor
  t0 = time.perf_counter()
  model = _load(name, workdir)
  load_s = time.perf_counter() - t0
  h, w = image.shape[:2]
  srv = _Server(model)
  try:
    t0 = time.perf_counter()
    info = srv.post("/api/images", _png(image), "image/png")
    first_upload_s = time.perf_counter() - t0
    # The embedding again, now compiled (the LRU would answer from cache: a new image).
    t0 = time.perf_counter()
    srv.post("/api/images", _png(image[::-1].copy()), "image/png")
    embed_warm_ms = 1e3 * (time.perf_counter() - t0)
    srv.post("/api/images", _png(image), "image/png")  # back to the measured image
    iid = info["image_id"]
    prompts = _clicks(n_clicks, h, w)

    def server_run(seq):
      rows, prev = [], None
      for pts in seq:
        body = {"image_id": iid, "point_coords": pts, "point_labels": _labels(len(pts))}
        if prev is not None and len(pts) > 1:
          body["mask_input"] = {"prediction_id": prev["prediction_id"], "index": prev["best"]}
        data = json.dumps(body).encode()
        t = time.perf_counter()
        prev = srv.post("/api/predict", data, "application/json")
        rows.append((1e3 * (time.perf_counter() - t), prev["timing_ms"]))
      return rows

    pred = Predictor(model)
    pred.set_image(image)

    def bare_run(seq):
      times, logits, best = [], None, None
      for pts in seq:
        t = time.perf_counter()
        masks, scores, lr = pred.predict(
            np.array(pts, np.float64), np.array(_labels(len(pts))),
            mask_input=None if len(pts) == 1 else logits[best][None])
        times.append(1e3 * (time.perf_counter() - t))
        logits, best = lr, int(np.argmax(scores))
      return times

    # Warm-up: compiles both variants (without / with mask_input) on both paths.
    server_run(prompts[:max(warmup, 2)])
    bare_run(prompts[:max(warmup, 2)])
    rows = server_run(prompts)
    bare = bare_run(prompts)
  finally:
    srv.close()
  rt = [r[0] for r in rows]
  inside = [r[1]["predict"] for r in rows]
  enc = [r[1]["encode"] for r in rows]
  return {
      "model": name, "image": f"{h}x{w}", "clicks": n_clicks, "load_s": round(load_s, 1),
      "first_upload_s": round(first_upload_s, 2), "embed_warm_ms": round(embed_warm_ms, 1),
      "predict_ms_median": statistics.median(bare), "predict_ms_p90": _pct(bare, 90),
      "server_predict_ms_median": statistics.median(inside),
      "server_encode_ms_median": statistics.median(enc),
      "round_trip_ms_median": statistics.median(rt), "round_trip_ms_p90": _pct(rt, 90),
      "overhead_ms_median": statistics.median(rt) - statistics.median(bare),
  }


def table(rows: List[Dict[str, Any]]) -> str:
  head = ("| model | image | predict (ms, median / p90) | server: predict + RLE (ms) | "
          "round trip (ms, median / p90) | overhead (ms) | embed (ms, warm) |")
  lines = [head, "|" + "---|" * 7]
  for r in rows:
    lines.append(
        f"| {r['model']} | {r['image']} | {r['predict_ms_median']:.1f} / "
        f"{r['predict_ms_p90']:.1f} | {r['server_predict_ms_median']:.1f} + "
        f"{r['server_encode_ms_median']:.1f} | {r['round_trip_ms_median']:.1f} / "
        f"{r['round_trip_ms_p90']:.1f} | {r['overhead_ms_median']:+.1f} | "
        f"{r['embed_warm_ms']:.0f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.serve_latency",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="tiny,vit_b", help="comma list of tiny, vit_b, vit_l, "
                 "vit_h (default: %(default)s)")
  p.add_argument("--clicks", type=int, default=30, help="timed clicks (default: %(default)s)")
  p.add_argument("--warmup", type=int, default=3, help="untimed clicks first (default: "
                 "%(default)s)")
  p.add_argument("--image", default="768x1024", metavar="HxW",
                 help="synthetic scene size (default: %(default)s)")
  p.add_argument("--out", help="also write the rows as JSON here")
  args = p.parse_args(argv)
  h, w = (int(v) for v in args.image.lower().split("x"))
  image = _scene(h, w)
  import jax
  rows = []
  with tempfile.TemporaryDirectory(prefix="samjax-serve-bench-") as workdir:
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
      print(f"serve_latency: {name} ...", file=sys.stderr, flush=True)
      rows.append(bench_model(name, image, args.clicks, args.warmup, workdir))
      print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
  device = jax.devices()[0]
  meta = {"device": f"{device.platform} ({device.device_kind})", "cpus": os.cpu_count(),
          "load_avg_1m": os.getloadavg()[0], "python": platform.python_version(),
          "jax": jax.__version__}
  print(f"device {meta['device']}, {meta['cpus']} CPUs, load {meta['load_avg_1m']:.1f}")
  print(table(rows))
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
