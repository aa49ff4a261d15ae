// The page's side of cupbearer in the browser: forms, drawing, and error display around
// the wasm module's exports (web/src/lib.rs). One engine call runs at a time; every
// failure ends in the red box and data-state="error", never in a blank page.
import init, * as engine from "./pkg/cupbearer_web.js";

const $ = (id) => document.getElementById(id);
const FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"];
const builtin = {};   // kernel file -> built-in source, for "revert"
let busy = false;
let adapterText = "";  // what WebGPU and wgpu say of the adapter

function state(s) { document.body.dataset.state = s; }
function status(msg) { $("status").textContent = msg; }
function showError(e) {
  const msg = (e && e.message) ? e.message : String(e);
  $("error").textContent = msg;
  $("error").style.display = "block";
  status("Stopped: see the message above.");
  state("error");
}
function clearError() { $("error").style.display = "none"; $("error").textContent = ""; }
window.addEventListener("error", (ev) => showError(ev.error || ev.message));
window.addEventListener("unhandledrejection", (ev) => showError(ev.reason));

function progress(message, position, length) {
  if (length > 0) {
    $("bar").max = length; $("bar").value = position;
    $("bar-text").textContent = `${message} ${position}/${length}`;
  } else {
    $("bar-text").textContent = message;
    $("log").textContent += message + "\n";
    $("log").scrollTop = $("log").scrollHeight;
  }
}

// Runs one engine call with the buttons disabled; errors go to the red box.
async function run(what, f) {
  if (busy) return;
  busy = true; clearError(); state("busy"); status(what + "…");
  document.querySelectorAll("button").forEach((b) => (b.disabled = true));
  try {
    const r = await f();
    state("idle");
    return r;
  } catch (e) {
    showError(e);
    throw e;
  } finally {
    busy = false;
    document.querySelectorAll("button").forEach((b) => (b.disabled = false));
  }
}

async function startEngine() {
  const info = JSON.parse(await engine.start());
  // wgpu names no browser adapter: ask WebGPU itself what it is.
  const a = await navigator.gpu.requestAdapter();
  const about = a && a.info ? [a.info.vendor, a.info.architecture, a.info.description]
    .filter((x) => x).join(" / ") : "";
  adapterText = (about ? about + " " : "") + info.adapter;
  $("adapter").textContent = adapterText +
    (info.edited.length ? ` — edited kernels: ${info.edited.join(", ")}` : "");
  $("limits").innerHTML = Object.entries(info.limits)
    .map(([k, v]) => `<tr><td style="text-align:left">${k}</td><td>${v}</td></tr>`).join("");
  return info;
}

async function loadData(buffers) {
  const n = (id) => parseInt($(id).value, 10);
  const summary = engine.load_mnist(...buffers, n("n-train"), n("n-test"));
  $("data-info").textContent = "Loaded " + summary + ".";
  status("Data loaded.");
}

async function fetchBeside() {
  const buffers = [];
  for (const f of FILES) {
    const r = await fetch(f + ".gz");
    if (!r.ok) throw new Error(`${f}.gz: HTTP ${r.status}; put MNIST's four .gz files beside ` +
                               "the page (web/build.sh copies them) or pick them below");
    buffers.push(new Uint8Array(await r.arrayBuffer()));
  }
  return buffers;
}

async function picked(fileList) {
  const byName = {};
  for (const file of fileList) {
    const stem = FILES.find((f) => file.name.startsWith(f));
    if (stem) byName[stem] = file;
  }
  const missing = FILES.filter((f) => !byName[f]);
  if (missing.length) throw new Error("missing file(s): " + missing.join(", "));
  return Promise.all(FILES.map(async (f) => new Uint8Array(await byName[f].arrayBuffer())));
}

function backdoor() {
  const p = parseFloat($("p").value);
  const kind = $("trigger").value;
  const trigger = kind === "corner" ? { kind, corner: "top-left" }
    : kind === "noise" ? { kind, std: 0.3, clip: true }
    : { kind, control_grid_width: 4, warping_strength: 0.5, grid_rescale: 1.0, p_noise: 0.0,
        grid_seed: 0 };
  return { ...trigger, p_backdoor: p, target_class: 0 };
}

async function train() {
  const request = {
    backdoor: backdoor(),
    epochs: parseInt($("epochs").value, 10),
    batch_size: parseInt($("batch").value, 10),
    learning_rate: parseFloat($("lr").value),
    seed: parseInt($("seed").value, 10),
    hidden: [256, 256],
  };
  $("epochs-table").innerHTML = "";
  $("train-result").textContent = "";
  const r = JSON.parse(await engine.train(JSON.stringify(request), progress));
  $("epochs-table").innerHTML = "<tr><th>epoch</th><th>loss</th><th>accuracy</th><th>s</th></tr>" +
    r.epochs.map((e) => `<tr><td>${e.epoch}</td><td>${e.train_loss.toFixed(4)}</td>` +
      `<td>${e.train_accuracy.toFixed(4)}</td><td>${e.seconds.toFixed(1)}</td></tr>`).join("");
  const asr = r.attack_success_rate == null ? "" : `, attack success ${r.attack_success_rate.toFixed(4)}`;
  $("train-result").innerHTML = `<span class="big">clean test accuracy ${r.clean_accuracy.toFixed(4)}` +
    `${asr}</span><br>${r.steps} steps in ${r.train_seconds.toFixed(1)} s ` +
    `(<span id="step-ms">${lastStepMs(r).toFixed(1)}</span> ms per step in the last epoch; ` +
    `the first one also compiles the kernels) on ${adapterText}` +
    (r.edited_kernels.length ? `; edited kernels: ${r.edited_kernels.join(", ")}` : "");
  status("Trained.");
  return r;
}

function lastStepMs(r) {
  const e = r.epochs[r.epochs.length - 1];
  return 1000 * e.seconds / Math.max(e.steps, 1);
}

async function detect() {
  const request = { detector: $("detector").value, trusted: parseInt($("trusted").value, 10) };
  const r = JSON.parse(await engine.detect(JSON.stringify(request), progress));
  $("detect-result").innerHTML = `<span class="big">AUROC <span id="auroc">${r.auc_roc.toFixed(4)}</span>` +
    `, AP ${r.ap.toFixed(4)}</span>, FPR at 95% TPR ${r.fpr_at_95_tpr.toFixed(4)}; ` +
    `fit ${r.fit_seconds.toFixed(1)} s, scoring ${r.score_seconds.toFixed(1)} s (${r.detector})`;
  drawHistogram(r.clean_scores, r.triggered_scores);
  drawRoc(r.roc);
  status("Detector evaluated.");
  return r;
}

// Score histograms on a log axis (scores span orders of magnitude).
function drawHistogram(clean, triggered) {
  const c = $("hist"), g = c.getContext("2d"), W = c.width, H = c.height, pad = 28, bins = 50;
  g.clearRect(0, 0, W, H);
  const lg = (v) => Math.log10(Math.max(v, 1e-6));
  const all = clean.concat(triggered).map(lg);
  const lo = Math.min(...all), hi = Math.max(...all) + 1e-9;
  const count = (xs) => {
    const h = new Array(bins).fill(0);
    xs.forEach((v) => h[Math.min(bins - 1, Math.floor((lg(v) - lo) / (hi - lo) * bins))]++);
    return h.map((k) => k / xs.length);
  };
  const hc = count(clean), ht = count(triggered), top = Math.max(...hc, ...ht);
  const bw = (W - pad) / bins;
  [[hc, "rgba(40,110,200,0.55)"], [ht, "rgba(220,70,40,0.55)"]].forEach(([h, color]) => {
    g.fillStyle = color;
    h.forEach((v, i) => g.fillRect(pad + i * bw, H - pad - v / top * (H - 2 * pad), bw - 1,
                                   v / top * (H - 2 * pad)));
  });
  g.fillStyle = "#333"; g.font = "11px sans-serif";
  g.fillText(`log10 score: ${lo.toFixed(2)} … ${hi.toFixed(2)}`, pad, H - 8);
  g.fillStyle = "rgba(40,110,200,1)"; g.fillText("clean", W - 110, 14);
  g.fillStyle = "rgba(220,70,40,1)"; g.fillText("triggered", W - 60, 14);
}

function drawRoc(points) {
  const c = $("roc"), g = c.getContext("2d"), W = c.width, H = c.height, pad = 24;
  g.clearRect(0, 0, W, H);
  g.strokeStyle = "#bbb"; g.beginPath(); g.moveTo(pad, H - pad); g.lineTo(W - pad, pad); g.stroke();
  g.strokeStyle = "#c0392b"; g.lineWidth = 2; g.beginPath();
  points.forEach(([x, y], i) => {
    const px = pad + x * (W - 2 * pad), py = H - pad - y * (H - 2 * pad);
    i ? g.lineTo(px, py) : g.moveTo(px, py);
  });
  g.stroke(); g.lineWidth = 1;
  g.fillStyle = "#333"; g.font = "11px sans-serif";
  g.fillText("FPR", W / 2 - 8, H - 6); g.fillText("TPR", 2, pad - 8); g.fillText("ROC", W - 50, H - pad - 6);
}

function showKernel(name) {
  $("source").value = engine.kernel_source(name);
  $("kernel-notes").textContent = engine.kernel_notes(name);
  $("kernel-message").textContent = "";
}

function checkKernel() {
  const name = $("kernel").value, m = $("kernel-message");
  try {
    m.textContent = engine.edit_kernel(name, $("source").value);
    m.className = "good";
    return true;
  } catch (e) {
    m.textContent = e.message || String(e);
    m.className = "bad";
    return false;
  }
}

// Recompiles with the kept edits, then runs the file's f64-reference checks.
async function references() {
  if (!checkKernel()) return;
  const name = $("kernel").value, m = $("kernel-message");
  await startEngine();
  const r = JSON.parse(await engine.check_kernel(name, progress));
  const head = `${name}.wgsl: ${r.comparisons - r.failed.length}/${r.comparisons} comparisons ` +
    `with the f64 references pass (${r.checks.join(", ")}; ${r.seconds.toFixed(1)} s)`;
  m.textContent = head + r.failed.slice(0, 8).map((o) =>
    `\nFAILED ${o.check} ${o.variant} ${o.case}: ${o.message || ""}`).join("");
  m.className = r.failed.length ? "bad" : "good";
  m.dataset.failed = r.failed.length;
  status("Reference checks done.");
  return r;
}

// Everything the page does for ?auto=1 (and the CI test): load, train, detect.
async function pipeline() {
  await run("Loading MNIST", async () => loadData(await fetchBeside()));
  await run("Training", train);
  await run("Fitting the detector", detect);
  state("done");
}

async function main() {
  if (!navigator.gpu) {
    throw new Error("This browser exposes no WebGPU (navigator.gpu is missing). Use a " +
      "browser with WebGPU enabled (Chrome/Edge 113+, or Chromium with --enable-unsafe-webgpu).");
  }
  await init();
  const info = await run("Requesting a GPU adapter", startEngine);
  $("kernel").innerHTML = info.kernels.map((k) => `<option>${k}</option>`).join("");
  info.kernels.forEach((k) => (builtin[k] = engine.kernel_source(k)));
  showKernel(info.kernels[0]);
  status("Ready: load the data.");
  state("idle");

  $("kernel").onchange = () => showKernel($("kernel").value);
  $("check").onclick = checkKernel;
  $("references").onclick = () => run("Running the reference checks", references);
  $("revert").onclick = () => { $("source").value = builtin[$("kernel").value]; checkKernel(); };
  $("retrain").onclick = async () => {
    if (!checkKernel()) return;
    await run("Compiling the edited kernels", startEngine);
    await run("Training with the edits", train);
    await run("Fitting the detector", detect);
  };
  $("load-beside").onclick = () => run("Loading MNIST", async () => loadData(await fetchBeside()));
  $("files").onchange = (ev) =>
    run("Reading the picked files", async () => loadData(await picked(ev.target.files)));
  $("train").onclick = () => run("Training", train);
  $("detect").onclick = () => run("Fitting the detector", detect);

  const q = new URLSearchParams(location.search);
  for (const [param, id] of [["train", "n-train"], ["test", "n-test"], ["epochs", "epochs"],
                             ["p", "p"], ["trigger", "trigger"], ["detector", "detector"],
                             ["trusted", "trusted"]]) {
    if (q.has(param)) $(id).value = q.get(param);
  }
  if (q.get("auto") === "1") await pipeline();
}

main().catch(showError);
