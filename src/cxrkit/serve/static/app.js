// cxrkit web page: upload an X-ray, show findings as bars with thresholds, toggle Grad-CAM overlays.
"use strict";

const HEATMAP_EXTRA_TOP = 3; // heatmaps for positive findings plus this many top-ranked others
const TOKEN_KEY = "cxrkit-token"; // the bearer token, asked once and kept in sessionStorage (this tab only)

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
  oodWarning: document.getElementById("ood-warning"),
  timing: document.getElementById("timing"),
  modelInfo: document.getElementById("model-info"),
  sizeLimit: document.getElementById("size-limit"),
  tokenForm: document.getElementById("token-form"),
  tokenInput: document.getElementById("token-input"),
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

// fetch with the stored bearer token; a 401 forgets it and asks for one
async function authorisedFetch(url, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const response = await fetch(url, { ...options, headers });
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    askForToken(token ? "The token was not accepted; enter it again." : null);
  }
  return response;
}

function askForToken(message) {
  elements.tokenForm.hidden = false;
  elements.tokenInput.focus();
  if (message) setStatus(message, "error");
}

async function loadModel() {
  try {
    const response = await authorisedFetch("v1/model");
    if (response.status === 401) {
      elements.modelInfo.textContent = "access token required";
      return;
    }
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
  showOodWarning(null);
  elements.timing.textContent = "";
  const form = new FormData();
  form.append("file", file, file.name);
  const query = new URLSearchParams({ heatmaps: "true", preview: "true", heatmap_top: String(HEATMAP_EXTRA_TOP) });
  let response;
  try {
    response = await authorisedFetch(`v1/predict?${query}`, { method: "POST", body: form });
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
  showOodWarning(result.ood);
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

// The out-of-distribution check: a visible warning when the image is unlike the training chest X-rays.
function showOodWarning(ood) {
  const flagged = Boolean(ood && ood.flagged);
  elements.oodWarning.hidden = !flagged;
  elements.oodWarning.textContent = flagged
    ? "Warning: this does not look like a chest X-ray the model was trained on "
      + `(out-of-distribution score ${ood.score.toFixed(3)} > threshold ${ood.threshold.toFixed(3)}). `
      + "The findings below are unreliable."
    : "";
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
elements.tokenForm.addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, elements.tokenInput.value.trim());
  elements.tokenInput.value = "";
  elements.tokenForm.hidden = true;
  setStatus("", "info");
  loadModel();
});
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
