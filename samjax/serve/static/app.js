// samjax serve: the page. Plain JS and canvas, talking to the JSON API of app.py.
// Three stacked canvases, all at the image's pixel size and scaled together by CSS:
// #img (the picture), #mask (masks only: tests read its alpha), #ui (prompts, hover).
"use strict";

const $ = (id) => document.getElementById(id);
const S = {
  mode: "prompt",
  info: null,
  image: null,       // {image_id, width, height, name} of the open image
  source: null,      // how to reopen it if the server evicted it
  history: [],       // prompt states: {points: [[x, y, label]], box, pred, chosen}
  queue: Promise.resolve(),
  pending: [],       // prompt changes queued behind the request in flight
  generation: 0,     // bumped when another image opens: queued clicks then drop
  auto: null,        // {job, masks: MaskSet}
  bulk: {offset: 0, limit: 100, total: 0, path: null, record: null, masks: null},
  hover: -1, selected: -1,
  renders: 0,        // counts finished mask renders (tests wait on it)
};
window.samjax = S;

const PROMPT_RGBA = [30, 144, 255, 153];  // the official show_mask colour, alpha 0.6

// ------------------------------------------------------------------ helpers
let busyCount = 0;
function busy(delta) {
  busyCount += delta;
  document.body.dataset.busy = busyCount > 0 ? "1" : "0";
}

function status(text, error = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", !!error);
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, opts = {}) {
  const init = {method: opts.method || "GET", headers: {}};
  if (opts.json !== undefined) {
    init.method = opts.method || "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(opts.json);
  } else if (opts.body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/octet-stream";
    init.body = opts.body;
  }
  busy(1);
  try {
    const r = await fetch(path, init);
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    if (!r.ok) {
      throw new ApiError(r.status, (data && data.error) || `${r.status} ${r.statusText}`);
    }
    return data;
  } finally {
    busy(-1);
  }
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const im = new Image();
    im.onload = () => resolve(im);
    im.onerror = () => reject(new Error("the picture did not load"));
    im.src = url;
  });
}

function colour(k) {  // distinct colours: golden-ratio hues
  const h = (k * 0.618033988749895) % 1, s = 0.75, v = 0.95;
  const i = Math.floor(h * 6), f = h * 6 - i;
  const p = v * (1 - s), q = v * (1 - f * s), t = v * (1 - (1 - f) * s);
  const [r, g, b] = [[v, t, p], [q, v, p], [p, v, t], [p, q, v], [t, p, v], [v, p, q]][i % 6];
  return [Math.round(r * 255), Math.round(g * 255), Math.round(b * 255)];
}

function fmt(x, digits = 3) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

// ------------------------------------------------------------------ canvases
function setCanvasSize(w, h) {
  for (const id of ["img", "mask", "ui"]) {
    const c = $(id);
    c.width = w; c.height = h;
  }
  $("view").hidden = false;
  $("empty").hidden = true;
  fitView();
}

// Scales the canvases (by CSS) to fill the stage, up or down, keeping the aspect.
function fitView() {
  const c = $("img"), stage = $("stage");
  if (!c.width) return;
  const availW = stage.clientWidth - 24, availH = stage.clientHeight - 56;
  const scale = Math.max(0.05, Math.min(availW / c.width, availH / c.height));
  $("view").style.width = `${Math.floor(c.width * scale)}px`;
  $("view").style.height = `${Math.floor(c.height * scale)}px`;
}

async function showPicture(url, w, h) {
  setCanvasSize(w, h);
  const ctx = $("img").getContext("2d");
  if (url) {
    const im = await loadImage(url);
    ctx.drawImage(im, 0, 0);
  } else {  // no picture (bulk outputs without --images): a neutral ground
    ctx.fillStyle = "#808080";
    ctx.fillRect(0, 0, w, h);
  }
}

function clearCanvas(id) {
  const c = $(id);
  c.getContext("2d").clearRect(0, 0, c.width, c.height);
}

// Image pixel under a mouse event (continuous; floor gives the pixel index).
function eventPixel(ev) {
  const c = $("ui"), r = c.getBoundingClientRect();
  return [(ev.clientX - r.left) * c.width / r.width, (ev.clientY - r.top) * c.height / r.height];
}

function screenScale() {
  const c = $("ui"), r = c.getBoundingClientRect();
  return c.width / Math.max(r.width, 1);
}

// One mask painted into #mask (everything else cleared).
function paintMask(rle, rgba, canvasId = "mask") {
  const c = $(canvasId), ctx = c.getContext("2d");
  const [h, w] = rle.size;
  const img = ctx.createImageData(w, h);
  const d = img.data;
  RLE.forEachPixel(RLE.counts(rle.counts), h, w, (i) => {
    d[4 * i] = rgba[0]; d[4 * i + 1] = rgba[1]; d[4 * i + 2] = rgba[2]; d[4 * i + 3] = rgba[3];
  });
  ctx.putImageData(img, 0, 0);
}

// ------------------------------------------------------------------ many masks
// The masks of an automask job or a bulk output: decoded once, drawn largest first so
// small masks stay visible; `label` maps each pixel to the mask drawn on top.
class MaskSet {
  constructor(records, h, w) {
    this.records = records;
    this.h = h; this.w = w;
    this.runs = records.map((r) => RLE.counts(r.segmentation.counts));
    this.visible = records.map(() => true);
    this.label = new Int32Array(h * w);
  }

  filter(pred) {
    this.visible = this.records.map(pred);
    return this.visible.filter(Boolean).length;
  }

  render() {
    const {h, w} = this;
    const c = $("mask"), ctx = c.getContext("2d");
    const img = ctx.createImageData(w, h), d = img.data, label = this.label;
    label.fill(-1);
    const order = this.records.map((r, k) => k).filter((k) => this.visible[k])
      .sort((a, b) => this.records[b].area - this.records[a].area);
    for (const k of order) RLE.forEachPixel(this.runs[k], h, w, (i) => { label[i] = k; });
    const palette = this.records.map((r, k) => colour(k));
    for (let i = 0; i < label.length; i++) {
      const k = label[i];
      if (k < 0) continue;
      const col = palette[k];
      d[4 * i] = col[0]; d[4 * i + 1] = col[1]; d[4 * i + 2] = col[2]; d[4 * i + 3] = 140;
    }
    ctx.putImageData(img, 0, 0);
    S.renders++;
  }

  at(x, y) {
    x = Math.floor(x); y = Math.floor(y);
    if (x < 0 || y < 0 || x >= this.w || y >= this.h) return -1;
    return this.label[y * this.w + x];
  }

  highlight(k, selected) {  // the hovered / selected mask in white on #ui
    const c = $("ui"), ctx = c.getContext("2d");
    ctx.clearRect(0, 0, c.width, c.height);
    const draw = (j, alpha) => {
      if (j < 0) return;
      const img = ctx.getImageData(0, 0, this.w, this.h), d = img.data;
      RLE.forEachPixel(this.runs[j], this.h, this.w, (i) => {
        d[4 * i] = 255; d[4 * i + 1] = 255; d[4 * i + 2] = 255; d[4 * i + 3] = alpha;
      });
      ctx.putImageData(img, 0, 0);
    };
    draw(selected, 170);
    if (k !== selected) draw(k, 90);
  }
}

function describe(rec, k) {
  return `#${k}: predicted IoU ${fmt(rec.predicted_iou)}, stability ${fmt(rec.stability_score)}, ` +
    `area ${rec.area} px`;
}

function currentMaskSet() {
  if (S.mode === "auto") return S.auto && S.auto.masks;
  if (S.mode === "bulk") return S.bulk.masks;
  return null;
}

function setSelected(k) {
  const set = currentMaskSet();
  S.selected = k;
  const exp = $("select-export");
  if (!set || k < 0) {
    $("select-info").textContent = "";
    exp.hidden = true;
  } else {
    $("select-info").textContent = "selected " + describe(set.records[k], k);
    if (S.mode === "auto") {
      const base = `/api/jobs/${S.auto.job.job_id}/masks/${k}`;
      $("sel-png").href = base + ".png";
      $("sel-json").href = base + ".json";
      exp.hidden = false;
    } else {
      exp.hidden = true;
    }
  }
  if (set) set.highlight(S.hover, k);
}

// ------------------------------------------------------------------ opening images
async function openWith(fn, source) {
  status("embedding the image…");
  const t0 = performance.now();
  try {
    const info = await fn();
    S.image = info;
    S.source = source;
    S.generation++;
    S.pending = [];
    S.history = [];
    S.auto = null;
    S.hover = S.selected = -1;
    await showPicture(`/api/images/${info.image_id}/image.png`, info.width, info.height);
    $("image-name").textContent = `${info.name || "upload"} — ${info.width}×${info.height}`;
    $("auto-run").disabled = false;
    renderPrompt();
    const t = (performance.now() - t0).toFixed(0);
    status(info.cached ? `ready (embedding cached; ${t} ms)`
      : `ready (embedded in ${info.embed_ms.toFixed(0)} ms; ${t} ms in all)`);
  } catch (e) {
    status(e.message, true);
  }
}

function uploadFile(file) {
  return api(`/api/images?name=${encodeURIComponent(file.name || "")}`, {body: file});
}

function openFile(file) {
  if (S.mode === "bulk") switchMode("prompt");
  return openWith(() => uploadFile(file), {file});
}

function openLibrary(path) {
  if (S.mode === "bulk") switchMode("prompt");
  return openWith(() => api("/api/library/open", {json: {path}}), {path});
}

async function reopen() {  // after the server evicted the image from its cache
  const src = S.source;
  const info = src.file ? await uploadFile(src.file)
    : await api("/api/library/open", {json: {path: src.path}});
  S.image.image_id = info.image_id;
}

// ------------------------------------------------------------------ prompt mode
function current() { return S.history.length ? S.history[S.history.length - 1] : null; }

// What the prompts will be once the queued clicks are done (drawn at once).
function preview() {
  const c = current();
  const s = {points: c ? c.points.slice() : [], box: c ? c.box : null};
  for (const change of S.pending) change(s);
  return s;
}

// Clicks queue up: each builds on the state the previous one produced.
function addPrompt(change) {
  if (!S.image) return;
  const generation = S.generation;
  S.pending.push(change);
  drawPrompts(preview());
  S.queue = S.queue.then(async () => {
    if (generation !== S.generation) return;  // another image was opened meanwhile
    const prev = current();
    const state = {points: prev ? prev.points.slice() : [], box: prev ? prev.box : null,
                   pred: null, chosen: 0};
    change(state);
    try {
      await predict(state, prev);
    } finally {
      if (generation === S.generation) S.pending.shift();
    }
  }).catch((e) => { status(e.message, true); drawPrompts(preview()); });
  return S.queue;
}

async function predict(state, prev) {
  const body = {image_id: S.image.image_id, multimask_output: $("multimask").checked};
  if (state.points.length) {
    body.point_coords = state.points.map((p) => [p[0], p[1]]);
    body.point_labels = state.points.map((p) => p[2]);
  }
  if (state.box) body.box = state.box;
  if ($("feedback").checked && prev && prev.pred) {
    body.mask_input = {prediction_id: prev.pred.prediction_id, index: prev.chosen};
  }
  const t0 = performance.now();
  let pred;
  try {
    pred = await api("/api/predict", {json: body});
  } catch (e) {
    if (e.status === 410 && body.mask_input) {  // logits no longer kept: prompts alone
      delete body.mask_input;
      pred = await api("/api/predict", {json: body});
    } else if (e.status === 404 && S.source) {
      await reopen();
      body.image_id = S.image.image_id;
      delete body.mask_input;
      pred = await api("/api/predict", {json: body});
    } else {
      throw e;
    }
  }
  state.pred = pred;
  state.chosen = pred.best;
  state.request = body;
  S.history.push(state);
  renderPrompt();
  const ms = (performance.now() - t0).toFixed(0);
  status(`${pred.masks.length} mask(s): server ${pred.timing_ms.predict.toFixed(0)} ms, ` +
         `${ms} ms round trip`);
}

function drawPrompts(state) {
  const c = $("ui"), ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height);
  if (!state) return;
  const s = screenScale();
  if (state.box) {
    const [x0, y0, x1, y1] = state.box;
    ctx.strokeStyle = "#00e000";
    ctx.lineWidth = 2 * s;
    ctx.strokeRect(x0 + 0.5, y0 + 0.5, x1 - x0, y1 - y0);
  }
  for (const [x, y, label] of state.points) {
    ctx.beginPath();
    ctx.arc(x + 0.5, y + 0.5, 6 * s, 0, 2 * Math.PI);
    ctx.fillStyle = label ? "#00c800" : "#e00000";
    ctx.fill();
    ctx.lineWidth = 1.5 * s;
    ctx.strokeStyle = "#fff";
    ctx.stroke();
  }
}

function renderPrompt() {
  const state = current();
  $("undo").disabled = !state;
  $("clear").disabled = !state;
  const box = $("candidates");
  box.textContent = "";
  clearCanvas("mask");
  drawPrompts(preview());
  $("prompt-export").hidden = !state;
  if (!state) { S.renders++; return; }
  const pred = state.pred;
  paintMask(pred.masks[state.chosen].segmentation, PROMPT_RGBA);
  pred.masks.forEach((m, k) => box.appendChild(candidate(m, k, k === state.chosen)));
  const base = `/api/predictions/${pred.prediction_id}/masks/${state.chosen}`;
  $("export-png").href = base + ".png";
  $("export-json").href = base + ".json";
  S.renders++;
}

function candidate(m, k, chosen) {
  const el = document.createElement("div");
  el.className = "cand" + (chosen ? " chosen" : "");
  el.dataset.index = k;
  const [h, w] = m.segmentation.size;
  const tw = 96, th = Math.max(1, Math.round(h * tw / w));
  const thumb = document.createElement("canvas");
  thumb.width = tw; thumb.height = th;
  const off = document.createElement("canvas");
  off.width = w; off.height = h;
  const octx = off.getContext("2d"), img = octx.createImageData(w, h);
  RLE.forEachPixel(RLE.counts(m.segmentation.counts), h, w, (i) => {
    img.data[4 * i] = PROMPT_RGBA[0]; img.data[4 * i + 1] = PROMPT_RGBA[1];
    img.data[4 * i + 2] = PROMPT_RGBA[2]; img.data[4 * i + 3] = 200;
  });
  octx.putImageData(img, 0, 0);
  const tctx = thumb.getContext("2d");
  tctx.drawImage($("img"), 0, 0, tw, th);
  tctx.drawImage(off, 0, 0, tw, th);
  const label = document.createElement("span");
  label.textContent = `IoU ${fmt(m.predicted_iou)} · ${m.area} px`;
  el.append(thumb, label);
  el.addEventListener("click", () => {
    const state = current();
    if (state) { state.chosen = k; renderPrompt(); }
  });
  return el;
}

function undo() {
  S.queue = S.queue.then(() => { S.history.pop(); renderPrompt(); status("undone"); });
}

function clearPrompts() {
  S.queue = S.queue.then(() => { S.history = []; renderPrompt(); status("cleared"); });
}

// mouse: click = point, drag = box, right/shift = background
let drag = null;
function onDown(ev) {
  if (S.mode !== "prompt" || !S.image) return;
  ev.preventDefault();
  drag = {start: eventPixel(ev), button: ev.button, moved: false, sx: ev.clientX, sy: ev.clientY};
}

function onMove(ev) {
  if (S.mode === "prompt") {
    if (!drag || drag.button !== 0) return;
    if (Math.hypot(ev.clientX - drag.sx, ev.clientY - drag.sy) > 5) drag.moved = true;
    if (!drag.moved) return;
    const [x, y] = eventPixel(ev);
    drawPrompts(preview());
    const ctx = $("ui").getContext("2d");
    ctx.setLineDash([6 * screenScale(), 4 * screenScale()]);
    ctx.strokeStyle = "#00e000";
    ctx.lineWidth = 2 * screenScale();
    ctx.strokeRect(drag.start[0], drag.start[1], x - drag.start[0], y - drag.start[1]);
    ctx.setLineDash([]);
    return;
  }
  const set = currentMaskSet();
  if (!set) return;
  const [x, y] = eventPixel(ev);
  const k = ev.target === $("ui") ? set.at(x, y) : -1;
  if (k === S.hover) return;
  S.hover = k;
  $("hover-info").textContent = k >= 0 ? describe(set.records[k], k) : "hover a mask";
  set.highlight(k, S.selected);
}

function onUp(ev) {
  if (S.mode !== "prompt") {
    const set = currentMaskSet();
    if (set && ev.button === 0 && ev.target === $("ui")) {
      const [x, y] = eventPixel(ev);
      setSelected(set.at(x, y));
    }
    return;
  }
  if (!drag) return;
  const d = drag;
  drag = null;
  const clampX = (v) => Math.min(Math.max(Math.floor(v), 0), S.image.width - 1);
  const clampY = (v) => Math.min(Math.max(Math.floor(v), 0), S.image.height - 1);
  if (d.button === 0 && d.moved) {
    const [x, y] = eventPixel(ev);
    const box = [clampX(Math.min(x, d.start[0])), clampY(Math.min(y, d.start[1])),
                 clampX(Math.max(x, d.start[0])), clampY(Math.max(y, d.start[1]))];
    addPrompt((s) => { s.box = box; });
  } else if (d.button === 0 || d.button === 2) {
    const label = d.button === 2 || ev.shiftKey ? 0 : 1;
    const [x, y] = d.start;
    addPrompt((s) => { s.points.push([clampX(x), clampY(y), label]); });
  }
}

// ------------------------------------------------------------------ everything mode
async function buildAutoForm() {
  const {options} = await api("/api/automask/options");
  const form = $("auto-form");
  for (const o of options) {
    const label = document.createElement("label");
    label.title = o.help;
    const input = document.createElement("input");
    input.type = "number";
    input.name = o.name;
    input.id = "opt-" + o.name;
    input.step = o.type === "int" ? "1" : "any";
    input.value = o.default === null ? "" : o.default;
    input.dataset.kind = o.type;
    input.dataset.default = input.value;
    label.append(o.name.replace(/_/g, " "), input);
    form.appendChild(label);
  }
  form.addEventListener("submit", (ev) => { ev.preventDefault(); runAuto(); });
}

function autoOptions() {
  const out = {};
  for (const input of $("auto-form").querySelectorAll("input")) {
    if (input.value === input.dataset.default) continue;  // the server's default
    out[input.name] = input.dataset.kind === "int" ? parseInt(input.value, 10)
      : parseFloat(input.value);
  }
  return out;
}

async function runAuto() {
  if (!S.image) return;
  $("auto-run").disabled = true;
  const t0 = performance.now();
  busy(1);
  try {
    let job = await api("/api/automask", {json: {image_id: S.image.image_id,
                                                 options: autoOptions()}});
    $("auto-status").textContent = `job ${job.job_id}: ${job.status}…`;
    while (job.status === "queued" || job.status === "running") {
      await new Promise((r) => setTimeout(r, 250));
      job = await api(`/api/jobs/${job.job_id}`);
      $("auto-status").textContent = `job ${job.job_id}: ${job.status}…`;
    }
    if (job.status !== "done") throw new Error(`automask failed: ${job.error}`);
    if (S.mode !== "auto") switchMode("auto");
    S.auto = {job, masks: new MaskSet(job.records, S.image.height, S.image.width)};
    S.hover = S.selected = -1;
    clearCanvas("ui");
    S.auto.masks.render();
    const ms = (performance.now() - t0).toFixed(0);
    $("auto-status").textContent = `${job.records.length} masks in ${job.seconds.toFixed(2)} s ` +
      `(server), ${ms} ms in all`;
    status(`${job.records.length} masks`);
  } catch (e) {
    $("auto-status").textContent = e.message;
    status(e.message, true);
  } finally {
    busy(-1);
    $("auto-run").disabled = !S.image;
  }
}

// ------------------------------------------------------------------ bulk viewer
async function loadBulkList() {
  const b = S.bulk;
  const data = await api(`/api/bulk?offset=${b.offset}&limit=${b.limit}`);
  b.total = data.total;
  $("bulk-folder").textContent = data.folder;
  $("bulk-range").textContent = data.total
    ? `${b.offset + 1}–${b.offset + data.items.length} of ${data.total}` : "no outputs";
  $("bulk-prev").disabled = b.offset === 0;
  $("bulk-next").disabled = b.offset + b.limit >= b.total;
  const ul = $("bulk-list");
  ul.textContent = "";
  for (const it of data.items) {
    const li = document.createElement("li");
    li.dataset.path = it.path;
    li.className = it.status === "broken" ? "broken" : "";
    li.textContent = it.status === "broken" ? `${it.path} — broken: ${it.reason}`
      : `${it.path} (${it.masks} masks)`;
    li.title = li.textContent;
    li.addEventListener("click", () => openBulk(it.path));
    ul.appendChild(li);
  }
}

async function loadBulkInfo() {
  const [f, s] = await Promise.all([api("/api/bulk/failures"), api("/api/bulk/settings")]);
  $("bulk-failures-n").textContent = `(${f.failures.length})`;
  const ul = $("bulk-failures");
  ul.textContent = "";
  for (const r of f.failures) {
    const li = document.createElement("li");
    li.textContent = r.broken ? `unreadable line: ${r.line}`
      : `${r.path}: ${r.stage} — ${r.reason}`;
    ul.appendChild(li);
  }
  $("bulk-settings").textContent = JSON.stringify(s, null, 1);
}

async function openBulk(path) {
  const b = S.bulk;
  for (const li of $("bulk-list").children) li.classList.toggle("active", li.dataset.path === path);
  b.path = path;
  S.hover = S.selected = -1;
  setSelected(-1);
  let rec;
  try {
    rec = await api(`/api/bulk/record?path=${encodeURIComponent(path)}`);
  } catch (e) {
    b.record = b.masks = null;
    const li = [...$("bulk-list").children].find((x) => x.dataset.path === path);
    if (li && e.status === 422) li.classList.add("broken");
    $("view").hidden = true;
    $("empty").hidden = false;
    $("empty").textContent = e.message;
    status(e.message, true);
    S.renders++;
    return;
  }
  const {width: w, height: h} = rec.image;
  await showPicture(rec.has_picture ? `/api/bulk/image?path=${encodeURIComponent(path)}` : null,
                    w, h);
  b.record = rec;
  b.masks = new MaskSet(rec.annotations, h, w);
  applyFilters();
  status(`${rec.image.file_name}: ${rec.annotations.length} masks` +
         (rec.has_picture ? "" : " (no picture: give --images DIR)"));
}

function applyFilters() {
  const set = S.bulk.masks;
  $("f-iou-v").textContent = $("f-iou").value;
  $("f-stab-v").textContent = $("f-stab").value;
  if (!set) return;
  const iou = parseFloat($("f-iou").value), stab = parseFloat($("f-stab").value);
  const amin = parseFloat($("f-amin").value) || 0;
  const amax = $("f-amax").value === "" ? Infinity : parseFloat($("f-amax").value);
  const n = set.filter((r) => (r.predicted_iou ?? 0) >= iou && (r.stability_score ?? 0) >= stab &&
                               r.area >= amin && r.area <= amax);
  $("bulk-shown").textContent = `${n} of ${set.records.length} masks shown`;
  S.hover = -1;
  if (S.selected >= 0 && !set.visible[S.selected]) setSelected(-1);
  set.render();
  set.highlight(-1, S.selected);
}

// ------------------------------------------------------------------ modes
function switchMode(mode) {
  S.mode = mode;
  document.body.dataset.mode = mode;
  for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.dataset.mode === mode);
  S.hover = S.selected = -1;
  $("hover-info").textContent = "hover a mask";
  $("select-info").textContent = "";
  $("select-export").hidden = true;
  if (mode === "bulk") {
    clearCanvas("mask"); clearCanvas("ui");
    if (S.bulk.path) openBulk(S.bulk.path);
    else { $("view").hidden = true; $("empty").hidden = false;
           $("empty").textContent = "Pick an output on the left."; }
    return;
  }
  if (!S.image) { $("view").hidden = true; $("empty").hidden = false;
                  $("empty").textContent = "Open an image to start."; return; }
  showPicture(`/api/images/${S.image.image_id}/image.png`, S.image.width, S.image.height)
    .then(() => {
      if (mode === "prompt") renderPrompt();
      else if (S.auto) { clearCanvas("ui"); S.auto.masks.render(); }
      else { clearCanvas("mask"); clearCanvas("ui"); S.renders++; }
    });
}

async function init() {
  const ui = $("ui");
  window.addEventListener("resize", () => { fitView(); if (S.mode === "prompt") drawPrompts(preview()); });
  ui.addEventListener("mousedown", onDown);
  window.addEventListener("mousemove", onMove);
  window.addEventListener("mouseup", onUp);
  ui.addEventListener("contextmenu", (ev) => ev.preventDefault());
  $("upload").addEventListener("change", (ev) => {
    if (ev.target.files.length) openFile(ev.target.files[0]);
    ev.target.value = "";
  });
  $("stage").addEventListener("dragover", (ev) => ev.preventDefault());
  $("stage").addEventListener("drop", (ev) => {
    ev.preventDefault();
    if (ev.dataTransfer.files.length) openFile(ev.dataTransfer.files[0]);
  });
  $("library").addEventListener("change", (ev) => { if (ev.target.value) openLibrary(ev.target.value); });
  $("undo").addEventListener("click", undo);
  $("clear").addEventListener("click", clearPrompts);
  $("auto-run").addEventListener("click", runAuto);
  for (const t of document.querySelectorAll(".tab")) {
    t.addEventListener("click", () => switchMode(t.dataset.mode));
  }
  for (const id of ["f-iou", "f-stab", "f-amin", "f-amax"]) $(id).addEventListener("input", applyFilters);
  $("bulk-prev").addEventListener("click", () => {
    S.bulk.offset = Math.max(0, S.bulk.offset - S.bulk.limit); loadBulkList();
  });
  $("bulk-next").addEventListener("click", () => { S.bulk.offset += S.bulk.limit; loadBulkList(); });
  document.addEventListener("keydown", (ev) => {
    if (S.mode !== "prompt" || ev.target.tagName === "INPUT") return;
    if ((ev.ctrlKey || ev.metaKey) && ev.key === "z") { ev.preventDefault(); undo(); }
    if (ev.key === "Escape") clearPrompts();
  });
  try {
    S.info = await api("/api/info");
    $("model").textContent = `${S.info.model} · ${S.info.dtype} · samjax ${S.info.samjax}`;
    await buildAutoForm();
    if (S.info.images) {
      const lib = await api("/api/library");
      $("library-box").hidden = false;
      for (const f of lib.files) {
        const o = document.createElement("option");
        o.value = f; o.textContent = f;
        $("library").appendChild(o);
      }
    }
    if (S.info.masks) {
      $("tab-bulk").hidden = false;
      await Promise.all([loadBulkList(), loadBulkInfo()]);
    }
    document.body.dataset.ready = "1";
  } catch (e) {
    status(e.message, true);
  }
}

init();
