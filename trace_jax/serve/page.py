"""The one page of ``trace-jax serve``: plain HTML, CSS and JS in one string (no external assets, so the
page works offline and the package needs no data files)."""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>trace-jax: explain and invert</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
  header { background: #234; color: #fff; padding: 8px 16px; display: flex; gap: 16px; align-items: baseline; }
  header h1 { font-size: 18px; margin: 0; }
  #model-info { font-size: 13px; opacity: .85; }
  main { padding: 12px 16px; }
  #source { display: flex; gap: 12px; align-items: center; flex-wrap: wrap; margin-bottom: 8px; }
  nav { margin: 8px 0; }
  .tab { border: 1px solid #999; background: #eee; padding: 6px 16px; cursor: pointer; font-size: 14px; }
  .tab.active { background: #234; color: #fff; }
  .view { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
  .view[hidden] { display: none; }
  .controls { width: 420px; display: flex; flex-direction: column; gap: 8px; }
  textarea { width: 100%; box-sizing: border-box; font-family: inherit; }
  .preview { max-width: 400px; max-height: 300px; border: 1px solid #ccc; background: #fff; }
  .error { color: #b00; font-weight: 600; white-space: pre-wrap; }
  .error:empty, .warn:empty { display: none; }
  .warn { color: #864; font-size: 13px; white-space: pre-wrap; }
  .status { font-size: 13px; color: #345; }
  table.grid { border-collapse: collapse; }
  table.grid td, table.grid th { border: 1px solid #ddd; padding: 4px; vertical-align: top; font-size: 13px; }
  table.grid img { max-width: 256px; max-height: 256px; display: block; }
  .tok { display: inline-block; padding: 1px 4px; margin: 1px; border-radius: 3px; }
  #mask-canvas { border: 1px solid #888; cursor: crosshair; touch-action: none; align-self: flex-start; }
  .boxitem { font-size: 12px; }
  button.run { font-size: 15px; padding: 6px 18px; }
</style>
</head>
<body>
<header><h1>trace-jax</h1><span id="model-info">loading…</span></header>
<main>
<section id="source">
  <label>Image <input type="file" id="image-file" accept="image/*"></label>
  <span>or an example of the embedded dataset
    <select id="example-select"></select> <button id="example-load">use example</button></span>
  <span id="image-info" class="status"></span>
  <span id="image-error" class="error"></span>
</section>
<nav><button class="tab active" id="tab-explain">Explain</button><button class="tab" id="tab-invert">Invert</button></nav>

<section class="view" id="view-explain">
  <div class="controls">
    <img id="explain-preview" class="preview" alt="(no image yet)">
    <label>Phrases, one per line<textarea id="phrases" rows="4" placeholder="a red circle"></textarea></label>
    <div id="methods"></div>
    <div><button class="run" id="run-explain">Explain</button> <span id="explain-status" class="status"></span></div>
    <div id="explain-error" class="error"></div>
    <div id="explain-warnings" class="warn"></div>
  </div>
  <div id="explain-results"></div>
</section>

<section class="view" id="view-invert" hidden>
  <div class="controls">
    <div class="status">Drag on the image to draw boxes (one mask each), or upload mask files (white = inside).</div>
    <canvas id="mask-canvas" width="400" height="300"></canvas>
    <div id="box-list"></div>
    <div><button id="clear-boxes">clear boxes</button></div>
    <label>Mask files <input type="file" id="mask-files" accept="image/*" multiple></label>
    <label>Classes, one per line (empty: the embedded dataset's concepts)
      <textarea id="classes" rows="4"></textarea></label>
    <div><button class="run" id="run-invert">Invert</button> <span id="invert-status" class="status"></span></div>
    <div id="invert-error" class="error"></div>
  </div>
  <div id="invert-results"></div>
</section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const state = { blob: null, img: null, boxes: [], drag: null, info: null };

function esc(s) { const d = document.createElement("div"); d.textContent = String(s); return d.innerHTML; }

async function getJSON(url, opts) {
  let r;
  try { r = await fetch(url, opts); } catch (e) { throw new Error("the server did not answer (" + e + ")"); }
  let body;
  try { body = await r.json(); } catch (e) { throw new Error("bad answer from the server (HTTP " + r.status + ")"); }
  if (!r.ok) throw new Error(body.error || ("HTTP " + r.status));
  return body;
}

function timer(el, what) {
  const t0 = performance.now();
  el.textContent = what + "…";
  const h = setInterval(() => { el.textContent = what + "… " + ((performance.now() - t0) / 1000).toFixed(1) + " s"; }, 100);
  return () => { clearInterval(h); return ((performance.now() - t0) / 1000).toFixed(2); };
}

function setImage(blob, label) {
  state.blob = blob; state.boxes = []; renderBoxes();
  $("image-error").textContent = "";
  const url = URL.createObjectURL(blob);
  const img = new Image();
  img.onload = () => {
    state.img = img;
    $("explain-preview").src = url;
    $("image-info").textContent = label + ": " + img.naturalWidth + "×" + img.naturalHeight;
    drawCanvas();
  };
  img.onerror = () => {
    state.img = null;
    $("explain-preview").removeAttribute("src");
    $("image-info").textContent = label + ": the browser cannot show this file; the server will check it";
    drawCanvas();
  };
  img.src = url;
}

$("image-file").addEventListener("change", (ev) => {
  const f = ev.target.files[0];
  if (f) setImage(f, f.name);
});

$("example-load").addEventListener("click", async () => {
  try {
    const ex = await getJSON("/api/example/" + $("example-select").value);
    const blob = await (await fetch(ex.image)).blob();
    $("image-file").value = "";  // the example replaces any chosen file
    setImage(blob, "example " + $("example-select").value + " (" + ex.caption + ")");
    $("phrases").value = ex.phrases.join("\n");
  } catch (e) { $("image-error").textContent = e.message; }
});

function showTab(name) {
  for (const v of ["explain", "invert"]) {
    $("view-" + v).hidden = v !== name;
    $("tab-" + v).classList.toggle("active", v === name);
  }
  drawCanvas();
}
$("tab-explain").addEventListener("click", () => showTab("explain"));
$("tab-invert").addEventListener("click", () => showTab("invert"));

// ------------------------------------------------------------------ explain
function tokenColour(s) {  // white -> dark red, as matplotlib 'Reds' roughly
  const g = Math.round(245 - 200 * s), r = Math.round(255 - 90 * s * s);
  return "rgb(" + r + "," + g + "," + g + ")";
}

// one run of a view ("explain" / "invert"): its form POSTed to /api/<view> with a ticking status and
// the button locked until the answer; render(res) -> [status note, results HTML]; errors in <view>-error
async function runView(view, fd, what, render) {
  $(view + "-error").textContent = "";
  if (state.blob) fd.append("image", state.blob, "upload");
  const done = timer($(view + "-status"), what);
  $("run-" + view).disabled = true;
  try {
    const res = await getJSON("/api/" + view, { method: "POST", body: fd });
    const [note, html] = render(res);
    $(view + "-status").textContent = "done in " + done() + " s (" + note + ")";
    $(view + "-results").innerHTML = html;
  } catch (e) {
    done(); $(view + "-status").textContent = "";
    $(view + "-error").textContent = e.message;
  } finally { $("run-" + view).disabled = false; }
}

$("run-explain").addEventListener("click", () => {
  $("explain-warnings").textContent = "";
  const methods = [...document.querySelectorAll("input[name=method]:checked")].map((c) => c.value);
  const fd = new FormData();
  fd.append("phrases", $("phrases").value);
  for (const m of methods) fd.append("method", m);
  const n = $("phrases").value.split("\n").filter((s) => s.trim()).length;
  return runView("explain", fd, "running " + methods.join(", ") + " on " + n + " phrase(s)", (res) => {
    $("explain-warnings").textContent = res.warnings.join("\n");
    let h = '<table class="grid" id="explain-grid"><tr><th>phrase</th>';
    for (const m of res.methods) h += "<th>" + esc(m) + "</th>";
    h += "</tr>";
    res.phrases.forEach((p, i) => {
      h += "<tr><th>" + esc(p) + "</th>";
      for (const m of res.methods) {
        h += '<td><img class="overlay" data-method="' + esc(m) + '" data-phrase="' + i + '" src="' + res.overlays[m][i] + '">';
        h += '<div class="score">score ' + res.scores[m][i].toFixed(4) + "</div>";
        if (res.tokens[m]) {
          h += '<div class="tokens">' + res.tokens[m][i].map(([t, s]) =>
            '<span class="tok" title="' + s.toFixed(3) + '" style="background:' + tokenColour(s) +
            (s > 0.6 ? ';color:#fff' : '') + '">' + esc(t) + "</span>").join("") + "</div>";
        }
        h += "</td>";
      }
      h += "</tr>";
    });
    h += '</table><p><a id="npz-link" href="' + res.npz + '" download>raw maps (.npz)</a></p>';
    return [res.width + "×" + res.height, h];
  });
});

// ------------------------------------------------------------------ invert: boxes on a canvas
const canvas = $("mask-canvas");
function scale() { return state.img ? state.img.naturalWidth / canvas.width : 1; }
function drawCanvas() {
  const ctx = canvas.getContext("2d");
  if (state.img) {
    const s = Math.min(400 / state.img.naturalWidth, 400 / state.img.naturalHeight);
    const w = Math.max(1, Math.round(state.img.naturalWidth * s)), h = Math.max(1, Math.round(state.img.naturalHeight * s));
    if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    ctx.drawImage(state.img, 0, 0, w, h);
  } else {
    ctx.fillStyle = "#eee"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  }
  const k = scale();
  const all = state.drag ? state.boxes.concat([state.drag]) : state.boxes;
  all.forEach((b, i) => {
    ctx.strokeStyle = i < state.boxes.length ? "#ff0" : "#0ff"; ctx.lineWidth = 2;
    ctx.strokeRect(b[0] / k, b[1] / k, (b[2] - b[0]) / k, (b[3] - b[1]) / k);
    ctx.fillStyle = "#ff0"; ctx.font = "14px sans-serif"; ctx.fillText(String(i + 1), b[0] / k + 3, b[1] / k + 15);
  });
}
function imgPoint(ev) {
  const r = canvas.getBoundingClientRect(), k = scale();  // inside the border: client box
  const w = canvas.clientWidth, h = canvas.clientHeight;
  const cx = Math.min(Math.max(ev.clientX - r.left - canvas.clientLeft, 0), w) * canvas.width / w;
  const cy = Math.min(Math.max(ev.clientY - r.top - canvas.clientTop, 0), h) * canvas.height / h;
  return [cx * k, cy * k];
}
canvas.addEventListener("pointerdown", (ev) => {
  if (!state.img) return;
  const [x, y] = imgPoint(ev); state.drag = [x, y, x, y]; canvas.setPointerCapture(ev.pointerId);
});
canvas.addEventListener("pointermove", (ev) => {
  if (!state.drag) return;
  const [x, y] = imgPoint(ev); state.drag[2] = x; state.drag[3] = y; drawCanvas();
});
canvas.addEventListener("pointerup", (ev) => {
  if (!state.drag) return;
  const b = state.drag; state.drag = null;
  const box = [Math.min(b[0], b[2]), Math.min(b[1], b[3]), Math.max(b[0], b[2]), Math.max(b[1], b[3])].map(Math.round);
  if (box[2] - box[0] >= 1 && box[3] - box[1] >= 1) state.boxes.push(box);
  renderBoxes();
});
function renderBoxes() {
  $("box-list").innerHTML = state.boxes.map((b, i) =>
    '<div class="boxitem">box ' + (i + 1) + ": [" + b.join(", ") + '] <a href="#" data-i="' + i + '">remove</a></div>').join("");
  for (const a of $("box-list").querySelectorAll("a")) a.onclick = (ev) => {
    ev.preventDefault(); state.boxes.splice(+a.dataset.i, 1); renderBoxes();
  };
  drawCanvas();
}
$("clear-boxes").addEventListener("click", () => { state.boxes = []; renderBoxes(); });

$("run-invert").addEventListener("click", () => {
  const fd = new FormData();
  fd.append("boxes", JSON.stringify(state.boxes));
  for (const f of $("mask-files").files) fd.append("mask", f, f.name);
  fd.append("classes", $("classes").value);
  const n = state.boxes.length + $("mask-files").files.length;
  return runView("invert", fd, "MaskInversion for " + n + " mask(s)", (res) => {
    let h = '<table class="grid" id="invert-grid"><tr><th>#</th><th>mask</th><th>final LeGrad map of its LET</th><th>top classes</th></tr>';
    res.masks.forEach((m, i) => {
      h += '<tr class="mask-row"><th>' + (i + 1) + '</th><td><img class="mask" src="' + m + '"></td><td><img class="map" src="' +
        res.maps[i] + '"></td><td><ol class="top">' + res.top[i].map(([c, s]) =>
        '<li><span class="cls">' + esc(c) + "</span> " + s.toFixed(3) + "</li>").join("") + "</ol></td></tr>";
    });
    h += '</table><p><a id="invert-npz" href="' + res.npz + '" download>LETs and maps (.npz)</a></p>';
    return ["loss " + res.losses[0].toFixed(4) + " → " + res.losses[1].toFixed(4) + ", " + res.mode, h];
  });
});

// ------------------------------------------------------------------ start
(async () => {
  try {
    const info = await getJSON("/api/info");
    state.info = info;
    $("model-info").textContent = info.model + " · " + info.image_size + " px input, patch " + info.patch_size +
      " · " + info.tower + " tower";
    $("methods").innerHTML = info.methods.map((m) =>
      '<label><input type="checkbox" name="method" id="method-' + m + '" value="' + m + '"' +
      (m === "legrad" ? " checked" : "") + "> " + m + "</label> ").join("");
    $("example-select").innerHTML = [...Array(info.examples).keys()].map((i) => "<option>" + i + "</option>").join("");
    $("classes").placeholder = info.default_classes.join("\n");
    document.body.dataset.ready = "1";
  } catch (e) { $("model-info").textContent = "cannot reach the server: " + e.message; }
  drawCanvas();
})();
</script>
</body>
</html>
"""
