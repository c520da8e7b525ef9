// cxrkit web page: upload an X-ray, show findings as bars with thresholds, toggle Grad-CAM overlays.
"use strict";

const HEATMAP_EXTRA_TOP = 3; // heatmaps for positive findings plus this many top-ranked others

const elements = {
  dropZone: document.getElementById("drop-zone"),
  fileInput: document.getElementById("file-input"),
  status: document.getElementById("status"),
  viewer: document.getElementById("viewer"),
  xray: document.getElementById("xray"),
  overlay: document.getElementById("overlay"),
  opacity: document.getElementById("opacity"),
  caption: document.getElementById("image-caption"),
  findings: document.getElementById("findings"),
  summary: document.getElementById("summary"),
  timing: document.getElementById("timing"),
  modelInfo: document.getElementById("model-info"),
  sizeLimit: document.getElementById("size-limit"),
};

let model = null;
let activeHeatmap = null;

function setStatus(message, kind = "info") {
  elements.status.textContent = message;
  elements.status.className = `status ${kind}`;
}

function percent(value) {
  return `${(100 * value).toFixed(1)}%`;
}

async function loadModel() {
  try {
    const response = await fetch("v1/model");
    model = await response.json();
    const labels = model.labels.length;
    elements.modelInfo.textContent = `${model.model.id} · v${model.model.version} · ${labels} findings · ${model.runtime}`;
    const megabytes = model.input.max_upload_bytes / (1024 * 1024);
    elements.sizeLimit.textContent = `(up to ${megabytes.toFixed(0)} MB)`;
  } catch (error) {
    elements.modelInfo.textContent = "model information unavailable";
  }
}

async function upload(file) {
  setStatus(`Analysing ${file.name}…`, "busy");
  elements.findings.replaceChildren();
  elements.viewer.hidden = true;
  hideHeatmap();
  elements.summary.textContent = "";
  elements.timing.textContent = "";
  const form = new FormData();
  form.append("file", file, file.name);
  const query = new URLSearchParams({ heatmaps: "true", preview: "true", heatmap_top: String(HEATMAP_EXTRA_TOP) });
  let response;
  try {
    response = await fetch(`v1/predict?${query}`, { method: "POST", body: form });
  } catch (error) {
    setStatus(`Could not reach the server: ${error}`, "error");
    return;
  }
  const body = await response.json().catch(() => null);
  if (!response.ok || body === null) {
    const message = body && body.error ? body.error.message : `HTTP ${response.status}`;
    setStatus(message.includes(file.name) ? message : `${file.name}: ${message}`, "error");
    return;
  }
  showResult(file, body);
}

function showResult(file, result) {
  elements.xray.src = `data:image/png;base64,${result.preview_png}`;
  elements.viewer.hidden = false;
  hideHeatmap();
  const image = result.image;
  elements.caption.textContent = `${file.name} · ${image.format} · ${image.width}×${image.height}`;
  const positives = result.findings;
  elements.summary.textContent = positives.length
    ? `Flagged: ${positives.join(", ")}`
    : "No finding above its operating threshold.";
  elements.summary.className = positives.length ? "summary positive" : "summary";
  const heatmaps = result.heatmaps || {};
  for (const prediction of result.predictions) {
    elements.findings.append(findingRow(prediction, heatmaps[prediction.label]));
  }
  const timing = result.timing_ms;
  elements.timing.textContent = `decode ${timing.decode.toFixed(0)} ms · model ${timing.inference.toFixed(0)} ms`
    + (timing.heatmaps ? ` · heatmaps ${timing.heatmaps.toFixed(0)} ms` : "")
    + ` · total ${timing.total.toFixed(0)} ms`;
  setStatus(`Done: ${file.name}`, "ok");
  const first = result.predictions.find((prediction) => prediction.positive && heatmaps[prediction.label]);
  if (first) toggleHeatmap(first.label, heatmaps[first.label]);
}

function findingRow(prediction, heatmap) {
  const row = document.createElement("li");
  row.className = prediction.positive ? "finding positive" : "finding";
  row.dataset.label = prediction.label;
  row.dataset.probability = String(prediction.probability);

  const name = document.createElement("span");
  name.className = "label";
  name.textContent = prediction.label;

  const bar = document.createElement("span");
  bar.className = "bar";
  bar.title = `probability ${percent(prediction.probability)}, threshold ${percent(prediction.threshold)}`;
  const fill = document.createElement("span");
  fill.className = "fill";
  fill.style.width = percent(prediction.probability);
  const tick = document.createElement("span");
  tick.className = "threshold";
  tick.style.left = percent(prediction.threshold);
  bar.append(fill, tick);

  const value = document.createElement("span");
  value.className = "probability";
  value.textContent = percent(prediction.probability);

  row.append(name, bar, value);
  if (heatmap) {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "chip";
    chip.textContent = "map";
    chip.setAttribute("aria-pressed", "false");
    row.classList.add("has-heatmap");
    row.addEventListener("click", () => toggleHeatmap(prediction.label, heatmap));
    row.append(chip);
  }
  return row;
}

function toggleHeatmap(label, heatmap) {
  if (activeHeatmap === label) {
    hideHeatmap();
    return;
  }
  activeHeatmap = label;
  elements.overlay.src = `data:image/png;base64,${heatmap}`;
  elements.overlay.hidden = false;
  elements.overlay.alt = `Grad-CAM heatmap for ${label}`;
  for (const row of elements.findings.children) {
    const on = row.dataset.label === label;
    row.classList.toggle("active", on);
    const chip = row.querySelector(".chip");
    if (chip) chip.setAttribute("aria-pressed", String(on));
  }
}

function hideHeatmap() {
  activeHeatmap = null;
  elements.overlay.hidden = true;
  for (const row of elements.findings.children) {
    row.classList.remove("active");
    const chip = row.querySelector(".chip");
    if (chip) chip.setAttribute("aria-pressed", "false");
  }
}

function onFiles(files) {
  if (files && files.length) upload(files[0]);
}

elements.fileInput.addEventListener("change", () => onFiles(elements.fileInput.files));
elements.opacity.addEventListener("input", () => {
  elements.overlay.style.opacity = String(elements.opacity.value / 100);
});
for (const name of ["dragenter", "dragover"]) {
  elements.dropZone.addEventListener(name, (event) => {
    event.preventDefault();
    elements.dropZone.classList.add("dragging");
  });
}
for (const name of ["dragleave", "drop"]) {
  elements.dropZone.addEventListener(name, (event) => {
    event.preventDefault();
    elements.dropZone.classList.remove("dragging");
  });
}
elements.dropZone.addEventListener("drop", (event) => onFiles(event.dataTransfer.files));
elements.overlay.style.opacity = String(elements.opacity.value / 100);
loadModel();
