// imgsim web page: one query (file, drop, paste or URL) -> POST /search -> a grid of thumbnails.
// The same query goes to POST /duplicates: results that are duplicates of the query say so, and the
// summary names what the query duplicates. Clicking a result searches with it ("more like this").
// No build step, no dependencies. Thumbnails come from GET /images/{id}; when the server needs an
// API key they are fetched with the Authorization header and shown from blob: URLs.
"use strict";

const KEY_STORAGE = "imgsim.apiKey";
const $ = (id) => document.getElementById(id);
const els = {
  status: $("status"), drop: $("dropzone"), file: $("file"), urlForm: $("url-form"), url: $("url"),
  k: $("k"), keyRow: $("key-row"), key: $("api-key"), keySave: $("key-save"), error: $("error"),
  section: $("results-section"), queryImg: $("query-img"), title: $("summary-title"),
  meta: $("summary-meta"), results: $("results"), empty: $("empty"), dupNote: $("duplicate-note"),
};

let blobUrls = [];   // object URLs to revoke when the next result set replaces this one
let lastQuery = null; // re-run after the user enters an API key

function apiKey() { return sessionStorage.getItem(KEY_STORAGE) || ""; }
function authHeaders() { const key = apiKey(); return key ? { Authorization: `Bearer ${key}` } : {}; }

function showError(message) {
  els.error.textContent = message;
  els.error.hidden = false;
}
function clearError() { els.error.hidden = true; els.error.textContent = ""; }

function askForKey(message) {
  els.keyRow.hidden = false;
  showError(message);
  els.key.focus();
}

function chosenK() {
  const k = Number.parseInt(els.k.value, 10);
  if (!Number.isInteger(k) || k < 1 || k > 100) {
    throw new Error("Choose a number of results between 1 and 100.");
  }
  return k;
}

// Plain words for each kind of failure; the server's own reason is kept when it has one.
function explain(status, reason) {
  const why = reason ? ` (${reason})` : "";
  switch (status) {
    case 400: return reason ? `${reason[0].toUpperCase()}${reason.slice(1)}.` : "The server did not understand that request.";
    case 401: return "This server needs an API key. Enter it below and try again.";
    case 404: return `Not found${why}.`;
    case 413: return `That image is too large to upload${why}.`;
    case 415: return `That kind of file can't be searched${why}. Use a PNG, JPEG, WebP, GIF, BMP or TIFF image.`;
    case 502: case 504: return `The image URL could not be fetched${why}.`;
    default: return `The server had a problem (HTTP ${status})${why}. Please try again.`;
  }
}

async function postSearch(body, headers, k, endpoint = "/search") {
  let response;
  try {
    response = await fetch(`${endpoint}?k=${k}`, { method: "POST", body, headers: { ...headers, ...authHeaders() } });
  } catch (err) {
    throw new Error("Could not reach the server. Is it still running?");
  }
  let payload = null;
  try { payload = await response.json(); } catch (err) { /* not JSON: keep null */ }
  if (!response.ok) {
    const error = new Error(explain(response.status, payload && payload.error));
    error.status = response.status;
    throw error;
  }
  return payload;
}

async function runQuery(query) {
  lastQuery = query;
  clearError();
  let k;
  try { k = chosenK(); } catch (err) { showError(err.message); return; }
  setBusy(true);
  try {
    let body, headers = {};
    if (query.file) {
      body = new FormData();
      body.append("image", query.file, query.file.name || "image");
    } else {
      body = JSON.stringify({ url: query.url, k });
      headers = { "Content-Type": "application/json" };
    }
    // Both at once; a failed duplicate check only leaves the duplicate marks out.
    const duplicates = postSearch(body, headers, 100, "/duplicates").catch(() => null);
    const answer = await postSearch(body, headers, k);
    await render(answer, query, await duplicates);
  } catch (err) {
    if (err.status === 401) askForKey(err.message);
    else showError(err.message);
  } finally {
    setBusy(false);
  }
}

function setBusy(busy) {
  els.drop.classList.toggle("busy", busy);
  for (const button of document.querySelectorAll("button")) button.disabled = busy;
}

function releaseBlobs() {
  for (const url of blobUrls) URL.revokeObjectURL(url);
  blobUrls = [];
}

async function loadThumbnail(img, id) {
  const src = `/images/${encodeURIComponent(id)}`;
  if (!apiKey()) { img.src = src; return; }
  const response = await fetch(src, { headers: authHeaders() });
  if (!response.ok) { img.alt = `image ${id} unavailable (HTTP ${response.status})`; return; }
  const url = URL.createObjectURL(await response.blob());
  blobUrls.push(url);
  img.src = url;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function formatDistance(d) {
  return typeof d === "number" ? d.toFixed(Math.abs(d) < 10 ? 4 : 2) : String(d);
}

// "More like this": the indexed image's own bytes become the next query.
async function searchByResult(id, path) {
  clearError();
  const response = await fetch(`/images/${encodeURIComponent(id)}`, { headers: authHeaders() }).catch(() => null);
  if (!response || !response.ok) {
    if (response && response.status === 401) askForKey(explain(401));
    else showError(`Image ${id} could not be loaded${response ? ` (HTTP ${response.status})` : ""}.`);
    return;
  }
  const blob = await response.blob();
  const name = (path || `image-${id}`).split("/").pop();
  runQuery({ file: new File([blob], name, { type: blob.type }), fromResult: id });
}

function describeDuplicates(duplicates) {
  if (!duplicates || !duplicates.duplicate || !duplicates.matches.length) { els.dupNote.hidden = true; return; }
  const first = duplicates.matches[0];
  const more = duplicates.matches.length > 1 ? ` and ${duplicates.matches.length - 1} more` : "";
  const how = first.exact ? "an identical file" : "a near-duplicate";
  els.dupNote.textContent = `Duplicate of ${first.path}${more} (${how}; distance ${formatDistance(first.distance)}, threshold ${formatDistance(duplicates.threshold)}).`;
  els.dupNote.hidden = false;
}

async function render(answer, query, duplicates) {
  releaseBlobs();
  if (query.file) {
    const url = URL.createObjectURL(query.file);
    blobUrls.push(url);
    els.queryImg.src = url;
  } else {
    els.queryImg.src = query.url;
  }
  const dupOf = new Map(((duplicates && duplicates.matches) || []).map((m) => [m.id, m]));
  describeDuplicates(duplicates);
  els.queryImg.onload = () => els.queryImg.classList.toggle("pixelated", els.queryImg.naturalWidth < 128);
  const results = answer.results || [];
  els.results.replaceChildren();
  els.title.textContent = results.length ? `Top ${results.length} similar images` : "No results";
  const where = query.fromResult !== undefined ? `more like result image ${query.fromResult}`
    : query.file ? (query.file.name || "your upload") : query.url;
  els.meta.textContent = `${where} · query cluster ${answer.cluster} · ${Math.round(answer.took_ms)} ms`;
  const loads = [];
  for (const r of results) {
    const item = el("li", "result");
    item.dataset.id = r.id;
    item.tabIndex = 0;
    item.title = `${r.path}\nClick: more like this`;
    item.addEventListener("click", () => searchByResult(r.id, r.path));
    item.addEventListener("keydown", (e) => { if (e.key === "Enter") searchByResult(r.id, r.path); });
    const thumb = el("div", "thumb");
    const img = el("img");
    img.alt = r.label ? `${r.label} (result ${r.rank})` : `result ${r.rank}`;
    img.title = r.path;
    img.loading = "eager";
    img.addEventListener("load", () => {
      if (img.naturalWidth < 128) img.classList.add("pixelated");
    });
    thumb.append(img, el("span", "rank", `#${r.rank}`));
    const meta = el("div", "meta");
    meta.append(el("span", "distance", `distance ${formatDistance(r.distance)}`));
    const tags = el("div", "tags");
    const dup = dupOf.get(r.id);
    if (dup) {
      item.classList.add("duplicate");
      tags.append(el("span", "tag dup", dup.exact ? "identical file" : "duplicate"));
    }
    if (r.label) tags.append(el("span", "tag", r.label));
    tags.append(el("span", "tag cluster", `cluster ${r.cluster}`));
    meta.append(tags);
    item.append(thumb, meta);
    els.results.append(item);
    loads.push(loadThumbnail(img, r.id).catch(() => { img.alt = `image ${r.id} unavailable`; }));
  }
  els.section.hidden = false;
  els.empty.hidden = true;
  await Promise.all(loads);
}

function pickFile(file) {
  if (!file) return;
  runQuery({ file });
}

// --- wiring ---------------------------------------------------------------------------------------

els.file.addEventListener("change", () => { pickFile(els.file.files[0]); els.file.value = ""; });
els.drop.addEventListener("click", (e) => { if (e.target.tagName !== "LABEL") els.file.click(); });
els.drop.addEventListener("keydown", (e) => {
  if (e.key === "Enter" || e.key === " ") { e.preventDefault(); els.file.click(); }
});
for (const type of ["dragenter", "dragover"]) {
  els.drop.addEventListener(type, (e) => { e.preventDefault(); els.drop.classList.add("over"); });
}
for (const type of ["dragleave", "drop"]) {
  els.drop.addEventListener(type, () => els.drop.classList.remove("over"));
}
els.drop.addEventListener("drop", (e) => {
  e.preventDefault();
  const file = e.dataTransfer.files[0];
  if (file) { pickFile(file); return; }
  const url = e.dataTransfer.getData("text/uri-list") || e.dataTransfer.getData("text/plain");
  if (url) { els.url.value = url.trim(); runQuery({ url: url.trim() }); }
});
document.addEventListener("paste", (e) => {
  if (e.target === els.url || e.target === els.key || e.target === els.k) return;
  const file = [...(e.clipboardData?.files || [])][0];
  if (file) { e.preventDefault(); pickFile(file); return; }
  const text = e.clipboardData?.getData("text/plain")?.trim();
  if (text && /^https?:\/\//i.test(text)) { els.url.value = text; runQuery({ url: text }); }
});
els.urlForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const url = els.url.value.trim();
  if (!url) { showError("Paste the address of an image first (https://…)."); return; }
  runQuery({ url });
});
els.keySave.addEventListener("click", () => {
  const key = els.key.value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key); else sessionStorage.removeItem(KEY_STORAGE);
  clearError();
  if (lastQuery) runQuery(lastQuery);
});
els.key.addEventListener("keydown", (e) => { if (e.key === "Enter") els.keySave.click(); });

async function checkHealth() {
  try {
    const response = await fetch("/healthz");
    const health = await response.json();
    els.status.textContent = `${health.images.toLocaleString()} images indexed`;
    els.status.className = "chip ok";
  } catch (err) {
    els.status.textContent = "server unreachable";
    els.status.className = "chip bad";
  }
}

if (apiKey()) { els.keyRow.hidden = false; els.key.value = apiKey(); }
checkHealth();
