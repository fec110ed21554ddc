// The clipsearch web page: plain JS over the gateway's HTTP/JSON API (proto3 JSON mapping).
"use strict";

const KEY_STORAGE = "clipsearch-api-key";
const COLLECTION_STORAGE = "clipsearch-collection";
const PAGES = 10; // top_k = page size x this
const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

// ------------------------------------------------------------------ API key

function apiKey() { return sessionStorage.getItem(KEY_STORAGE) || ""; }

function authHeaders() {
  const key = apiKey();
  return key ? { authorization: `Bearer ${key}` } : {};
}

let keyWaiters = [];

function askForKey(reason) {
  $("key-reason").textContent = reason || "This gateway needs an API key. It is kept in this browser tab only.";
  $("api-key").value = "";
  if (!$("key-dialog").open) $("key-dialog").showModal();
  $("api-key").focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

function keyDialogClosed(saved) {
  if (saved) sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
  const waiters = keyWaiters;
  keyWaiters = [];
  waiters.forEach((resolve) => resolve(saved));
}

// ------------------------------------------------------------------ calls

async function call(method, path, body, retry = true) {
  const headers = { ...authHeaders() };
  let payload;
  if (body instanceof FormData) payload = body;
  else if (body !== undefined) { headers["content-type"] = "application/json"; payload = JSON.stringify(body); }
  const response = await fetch(path, { method, headers, body: payload });
  const text = await response.text();
  let data = {};
  try { data = text ? JSON.parse(text) : {}; } catch (e) { data = { message: text }; }
  if (response.status === 401 && retry) {
    const saved = await askForKey(apiKey() ? `The API key was refused: ${data.message}` : undefined);
    if (saved) return call(method, path, body, false);
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

const collection = () => encodeURIComponent($("collection").value);

// Images: same-origin URLs (the content route) need the key, so they load through fetch.
const blobUrls = [];

async function showImage(img, url) {
  if (!url.startsWith(location.origin)) { img.src = url; return; }
  try {
    const response = await fetch(url, { headers: authHeaders() });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const blobUrl = URL.createObjectURL(await response.blob());
    blobUrls.push(blobUrl);
    img.src = blobUrl;
  } catch (e) {
    img.alt = `${img.alt} (not loaded: ${e.message})`;
  }
}

// ------------------------------------------------------------------ collections

async function loadCollections() {
  const select = $("collection");
  try {
    const data = await call("GET", "/v1/collections?pageSize=1000");
    const names = (data.collections || []).map((c) => c.name);
    select.replaceChildren(...names.map((name) => new Option(name, name)));
    const fallback = document.querySelector("meta[name=default-collection]").content; // the gateway's default
    const preferred = [sessionStorage.getItem(COLLECTION_STORAGE), fallback].find((n) => n && names.includes(n));
    if (preferred) select.value = preferred;
    setStatus("search-status", names.length ? "" : "No collection is readable with this key.");
  } catch (e) {
    setStatus("search-status", `Could not list collections: ${e.message}`, true);
  }
}

// ------------------------------------------------------------------ search

const state = { image: null, positive: [], negative: [], tokens: [""], page: 0, ran: false };

function setStatus(id, text, error = false) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", error);
}

function parseValue(raw) {
  const text = raw.trim();
  if (text !== "" && !Number.isNaN(Number(text))) return { numberValue: Number(text) };
  return { stringValue: text };
}

// "kind=photo, year>=2020, tag=a|b" -> Filter conditions (proto3 JSON).
function parseFilters(text) {
  const conditions = [];
  for (const clause of text.split(",").map((c) => c.trim()).filter(Boolean)) {
    const m = clause.match(/^([^<>=!]+?)\s*(>=|<=|>|<|=)\s*(.*)$/);
    if (!m) throw new Error(`cannot read the filter "${clause}": use key=value, key>=n, key<n`);
    const [, key, op, value] = m;
    if (op === "=") {
      const values = value.split("|");
      conditions.push(values.length > 1 ? { key, inSet: { values: values.map(parseValue) } }
        : { key, equals: parseValue(value) });
    } else {
      const bound = { ">=": "gte", ">": "gt", "<=": "lte", "<": "lt" }[op];
      conditions.push({ key, range: { [bound]: parseValue(value) } });
    }
  }
  return conditions;
}

function searchRequest() {
  const pageSize = Number($("page-size").value);
  const request = { topK: pageSize * PAGES, pageSize, diversity: Number($("diversity").value),
                    parts: [], filter: { conditions: parseFilters($("filters").value) } };
  const text = $("query-text").value.trim();
  if (text) request.parts.push({ text });
  const minScore = $("min-score").value;
  if (minScore !== "") request.minScore = Number(minScore);
  if (state.positive.length || state.negative.length) {
    request.feedback = { positiveIds: state.positive, negativeIds: state.negative };
  }
  const token = state.tokens[state.page];
  if (token) request.pageToken = token;
  return request;
}

async function runSearch() {
  let request;
  try { request = searchRequest(); } catch (e) { setStatus("search-status", e.message, true); return; }
  if (!request.parts.length && !state.image) {
    setStatus("search-status", "Type a text or choose an image to search.", true);
    return;
  }
  let body = request;
  if (state.image) {
    body = new FormData();
    body.append("request", JSON.stringify(request));
    body.append("parts", state.image, state.image.name || "query");
  }
  setStatus("search-status", "Searching…");
  $("search-button").disabled = true;
  try {
    const started = performance.now();
    const data = await call("POST", `/v1/collections/${collection()}/images:search`, body);
    state.ran = true;
    state.tokens.length = state.page + 1;
    if (data.nextPageToken) state.tokens.push(data.nextPageToken);
    renderResults(data.hits || []);
    const partial = data.partial ? ` (partial: shards ${data.missingShards.join(", ")} did not answer)` : "";
    setStatus("search-status", `${(data.hits || []).length} results in ${Math.round(performance.now() - started)} ms`
      + partial);
  } catch (e) {
    setStatus("search-status", `Search failed: ${e.message}`, true);
  } finally {
    $("search-button").disabled = false;
    updatePager();
  }
}

function describeValue(value) {
  if (value.stringValue !== undefined) return value.stringValue;
  if (value.numberValue !== undefined) return String(value.numberValue);
  if (value.timestampValue !== undefined) return value.timestampValue;
  return "";
}

function renderResults(hits) {
  blobUrls.splice(0).forEach((u) => URL.revokeObjectURL(u));
  const list = $("results");
  list.replaceChildren();
  const rankBase = state.page * Number($("page-size").value);
  hits.forEach((hit, i) => {
    const item = document.createElement("li");
    item.dataset.id = hit.id;
    const fields = (hit.metadata && hit.metadata.fields) || {};
    const name = fields.filename ? describeValue(fields.filename) : hit.id.slice(0, 12);
    const img = document.createElement("img");
    img.alt = `result ${rankBase + i + 1}: ${name}`;
    img.loading = "lazy";
    showImage(img, hit.url);
    const meta = document.createElement("div");
    meta.className = "meta";
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = `#${rankBase + i + 1} · score ${(hit.score || 0).toFixed(4)}`;
    meta.append(score);
    for (const [key, value] of Object.entries(fields).sort()) {
      const line = document.createElement("div");
      line.textContent = `${key}: ${describeValue(value)}`;
      meta.append(line);
    }
    const buttons = document.createElement("div");
    buttons.className = "buttons";
    for (const [label, list, other, cls] of [["More like this", "positive", "negative", "more"],
                                             ["Less like this", "negative", "positive", "less"]]) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = cls;
      button.textContent = label;
      button.setAttribute("aria-label", `${label}: result ${rankBase + i + 1}, ${name}`);
      button.addEventListener("click", () => {
        state[other] = state[other].filter((id) => id !== hit.id);
        if (!state[list].includes(hit.id)) state[list].push(hit.id);
        state.tokens = [""];
        state.page = 0;
        updateFeedback();
        runSearch();
      });
      buttons.append(button);
    }
    item.append(img, meta, buttons);
    list.append(item);
  });
}

function updateFeedback() {
  const parts = [];
  if (state.positive.length) parts.push(`more like ${state.positive.length}`);
  if (state.negative.length) parts.push(`less like ${state.negative.length}`);
  $("feedback").textContent = parts.length ? `Feedback: ${parts.join(", ")}` : "";
  $("feedback-clear").hidden = !parts.length;
}

function updatePager() {
  $("prev-page").disabled = state.page === 0;
  $("next-page").disabled = state.page + 1 >= state.tokens.length;
  $("page-number").textContent = state.ran ? `Page ${state.page + 1}` : "";
}

function newSearch() {
  state.tokens = [""];
  state.page = 0;
  runSearch();
}

function setQueryImage(file) {
  state.image = file;
  $("query-image-name").textContent = file ? `image: ${file.name}` : "or drop an image here";
  $("query-image-clear").hidden = !file;
  if (!file) $("query-image").value = "";
}

// ------------------------------------------------------------------ upload

function parseMetadata(text) {
  const fields = {};
  for (const line of text.split("\n").map((l) => l.trim()).filter(Boolean)) {
    const at = line.indexOf("=");
    if (at <= 0) throw new Error(`cannot read the metadata line "${line}": use key=value`);
    fields[line.slice(0, at).trim()] = parseValue(line.slice(at + 1));
  }
  return fields;
}

function uploadOne(file, metadata, row) {
  const progress = row.querySelector("progress");
  const status = row.querySelector(".state");
  const form = new FormData();
  form.append("request", JSON.stringify({ items: [{ metadata: { fields: metadata } }] }));
  form.append("items", file, file.name);
  return new Promise((resolve) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/v1/collections/${collection()}/images:upload`);
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) progress.value = e.loaded / e.total; };
    const done = (cls, text) => {
      status.className = `state ${cls}`;
      status.textContent = text;
      row.dataset.state = cls.replace("state-", "");
      resolve(xhr.status);
    };
    xhr.onerror = () => done("state-failed", "failed: network error");
    xhr.onload = () => {
      progress.value = 1;
      let data = {};
      try { data = JSON.parse(xhr.responseText || "{}"); } catch (e) { data = { message: xhr.responseText }; }
      if (xhr.status !== 200) { done("state-failed", `failed: ${data.message || xhr.status}`); return; }
      const result = (data.results || [])[0] || {};
      if (result.status && result.status.code) done("state-failed", `failed: ${result.status.message}`);
      else if (result.created) done("state-new", "new");
      else done("state-duplicate", "duplicate");
    };
    xhr.send(form);
  });
}

async function uploadFiles(files) {
  let metadata;
  try { metadata = parseMetadata($("upload-metadata").value); } catch (e) {
    setStatus("upload-status", e.message, true);
    return;
  }
  if (!files.length) { setStatus("upload-status", "Choose or drop images first.", true); return; }
  const rows = files.map((file) => {
    const row = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = file.name;
    const progress = document.createElement("progress");
    progress.max = 1;
    progress.value = 0;
    progress.setAttribute("aria-label", `upload progress of ${file.name}`);
    const status = document.createElement("span");
    status.className = "state";
    status.textContent = "waiting";
    row.append(name, progress, status);
    $("uploads").prepend(row);
    return row;
  });
  setStatus("upload-status", `Uploading ${files.length} image(s)…`);
  let next = 0;
  let needKey = false;
  const worker = async () => {
    while (next < files.length) {
      const i = next++;
      rows[i].querySelector(".state").textContent = "uploading";
      if ((await uploadOne(files[i], metadata, rows[i])) === 401) needKey = true;
    }
  };
  await Promise.all([worker(), worker()]);
  const count = (s) => rows.filter((r) => r.dataset.state === s).length;
  setStatus("upload-status", `Done: ${count("new")} new, ${count("duplicate")} duplicate, ${count("failed")} failed.`,
    count("failed") > 0);
  if (needKey) askForKey("The upload needs an API key with write access.");
}

// ------------------------------------------------------------------ wiring

function selectTab(name) {
  for (const tab of ["search", "upload"]) {
    $(`tab-${tab}`).setAttribute("aria-selected", String(tab === name));
    $(`panel-${tab}`).hidden = tab !== name;
  }
}

function dropZone(zone, onFiles) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    onFiles([...e.dataTransfer.files].filter((f) => f.type.startsWith("image/")));
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $("tab-search").addEventListener("click", () => selectTab("search"));
  $("tab-upload").addEventListener("click", () => selectTab("upload"));
  $("key-button").addEventListener("click", async () => { if (await askForKey()) loadCollections(); });
  $("key-form").addEventListener("submit", () => keyDialogClosed(true));
  $("key-cancel").addEventListener("click", () => { $("key-dialog").close(); keyDialogClosed(false); });
  $("collection").addEventListener("change", () => {
    sessionStorage.setItem(COLLECTION_STORAGE, $("collection").value);
    state.positive = []; state.negative = [];
    updateFeedback();
    if (state.ran) newSearch();
  });
  $("diversity").addEventListener("input", () => { $("diversity-value").textContent = $("diversity").value; });
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); newSearch(); });
  $("query-image").addEventListener("change", () => setQueryImage($("query-image").files[0] || null));
  $("query-image-clear").addEventListener("click", () => setQueryImage(null));
  dropZone($("query-drop"), (files) => { if (files[0]) { setQueryImage(files[0]); newSearch(); } });
  $("feedback-clear").addEventListener("click", () => {
    state.positive = []; state.negative = [];
    updateFeedback();
    newSearch();
  });
  $("prev-page").addEventListener("click", () => { state.page -= 1; runSearch(); });
  $("next-page").addEventListener("click", () => { state.page += 1; runSearch(); });
  $("upload-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const files = [...$("upload-files").files];
    $("upload-files").value = "";
    uploadFiles(files);
  });
  dropZone($("upload-drop"), (files) => uploadFiles(files));
  updatePager();
  loadCollections();
});
