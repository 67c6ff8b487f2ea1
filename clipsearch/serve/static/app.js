// clipsearch's page: plain JavaScript over the JSON API (no build step, nothing from the network).
//
// Every state of the page is in its URL (q, under, min_score, similar, view), so a search can be
// bookmarked, shared, or gone back to; an uploaded image is the one exception, since it is never
// stored anywhere.
"use strict";

const PAGE = 40;
const MAX_OFFSET = 10000; // the deepest page the server gives (app.py's MAX_OFFSET)
const $ = (id) => document.getElementById(id);

const ui = {
  form: $("search"), q: $("q"), under: $("under"), minScore: $("min-score"), refine: $("refine"),
  pick: $("pick"), file: $("file"), results: $("results"), message: $("message"), more: $("more"),
  sentinel: $("sentinel"), drop: $("drop"), source: $("source"), sourceImage: $("source-image"),
  sourceText: $("source-text"), sourceClear: $("source-clear"), statusButton: $("status-button"),
  statusSummary: $("status-summary"), status: $("status"), statusFields: $("status-fields"),
  failures: $("failures"), failuresTitle: $("failures-title"), preview: $("preview"),
};

// What is being searched: the URL's state, plus an upload held in memory only.
let state = { q: "", under: "", min_score: "", similar: "", view: "" };
let upload = null; // a Blob
let uploadUrl = null;
let hits = [];
// Pages are asked for by offset into the ranking as it is at each request: an index run between
// two pages shifts it, and the next page can repeat hits already shown. Those are skipped by id
// (`shown`), and the next offset counts what the server sent (`received`), not what was shown,
// so a page of repeats alone is not asked for again and again.
let shown = new Set();
let received = 0;
let done = true;
let pending = null; // the page being fetched: [generation, promise]
let generation = 0; // a newer search makes the answers to older requests stale
let current = -1; // index in hits of the image the preview shows
let lastStatus = null;

// --- the URL ------------------------------------------------------------------------------

function readUrl() {
  const params = new URLSearchParams(location.search);
  state = {
    q: params.get("q") || "",
    under: params.get("under") || "",
    min_score: params.get("min_score") || "",
    similar: /^\d+$/.test(params.get("similar") || "") ? params.get("similar") : "",
    view: /^\d+$/.test(params.get("view") || "") ? params.get("view") : "",
  };
}

function writeUrl(push) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(state)) if (value) params.set(key, value);
  const query = params.toString();
  const url = location.pathname + (query ? "?" + query : "");
  if (url === location.pathname + location.search) return;
  if (push) history.pushState(null, "", url);
  else history.replaceState(null, "", url);
}

function showState() {
  ui.q.value = state.q;
  ui.under.value = state.under;
  ui.minScore.value = state.min_score;
  if (state.under || state.min_score) ui.refine.open = true;
  document.title = state.q ? `${state.q} – clipsearch` : "clipsearch";
}

// --- searching ----------------------------------------------------------------------------

function searching() {
  return Boolean(upload || state.similar || state.q);
}

function requestFor(offset) {
  const params = new URLSearchParams({ k: String(PAGE), offset: String(offset) });
  if (state.q) params.set("q", state.q);
  if (state.under) params.set("under", state.under);
  if (state.min_score) params.set("min_score", state.min_score);
  if (upload) {
    return ["/api/search/image?" + params, { method: "POST", body: upload,
      headers: { "Content-Type": upload.type || "application/octet-stream" } }];
  }
  if (state.similar) return [`/api/similar/${state.similar}?` + params, {}];
  return ["/api/search?" + params, {}];
}

function startSearch() {
  generation += 1;
  hits = [];
  shown = new Set();
  received = 0;
  current = -1;
  ui.results.replaceChildren();
  done = !searching();
  ui.more.hidden = true;
  showSource();
  say("");
  if (!done) return loadMore();
  return Promise.resolve();
}

function loadMore() {
  if (pending && pending[0] === generation) return pending[1];
  if (done) return Promise.resolve();
  const mine = generation;
  const promise = fetchPage(mine).finally(() => {
    if (pending && pending[1] === promise) pending = null;
    if (mine === generation && !done && sentinelVisible()) loadMore(); // the window is not full yet
  });
  pending = [mine, promise];
  return promise;
}

async function fetchPage(mine) {
  const [url, init] = requestFor(received);
  say(hits.length ? "Loading more…" : "Searching…");
  try {
    const response = await fetch(url, init);
    const body = await response.json().catch(() => ({ error: `The server answered ${response.status}.` }));
    if (mine !== generation) return;
    if (!response.ok) {
      done = true;
      say(body.error || `The server answered ${response.status}.`, true);
      return;
    }
    const first = hits.length;
    const added = body.hits.filter((hit) => !shown.has(hit.id));
    added.forEach((hit) => shown.add(hit.id));
    hits.push(...added);
    added.forEach((hit, i) => ui.results.append(tile(hit, first + i)));
    received += body.hits.length;
    const deepest = body.hits.length === PAGE && received > MAX_OFFSET; // more there, not served
    done = body.hits.length < PAGE || deepest;
    ui.more.hidden = done;
    if (ui.preview.open) showPosition(); // "39 of 40+" had stayed after the last page came
    if (deepest) say(`The first ${received.toLocaleString("en")} results: narrow the search to see others.`);
    else say(hits.length ? `${hits.length}${done ? "" : "+"} results` : "No matches.");
  } catch (error) {
    if (mine === generation) {
      done = true;
      say("The server cannot be reached; is `clipsearch serve` still running?", true);
    }
  }
}

// A tile reached with Tab scrolls into view below the sticky header, not under it. Where the
// header would take more than a third of the window (zoomed in, a phone with Refine open), it
// scrolls away with the page instead: kept, it had left a strip too thin for a row of tiles.
const header = document.querySelector("header");
function fitHeader() {
  const tall = header.offsetHeight > window.innerHeight / 3;
  header.classList.toggle("scrolls", tall);
  document.documentElement.style.scrollPaddingTop = tall ? "" : `${header.offsetHeight + 8}px`;
}
new ResizeObserver(fitHeader).observe(header);
window.addEventListener("resize", fitHeader);

function tile(hit, index) {
  const item = document.createElement("li");
  item.dataset.id = hit.id;
  item.dataset.path = hit.path;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "hit";
  button.dataset.index = index;
  const name = baseName(hit.path);
  button.setAttribute("aria-label", `${name}, score ${hit.score.toFixed(3)}`);
  const image = document.createElement("img");
  // Versioned by the hit's size and mtime: an edited file, indexed again, gets a new URL, so
  // the server lets the browser keep each one for good without showing an old picture.
  image.src = `/api/thumbnail/${hit.id}?v=${hit.size}-${hit.mtime}`;
  image.alt = name;
  image.loading = "lazy";
  image.decoding = "async";
  // The server refuses a file changed or deleted since it was indexed: say so, not a broken icon.
  image.addEventListener("error", () => {
    const note = document.createElement("span");
    note.className = "gone";
    note.textContent = "Changed or deleted since it was indexed";
    image.replaceWith(note);
    button.setAttribute("aria-label", `${name}, changed or deleted since it was indexed`);
  }, { once: true });
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  score.setAttribute("aria-hidden", "true");
  const label = document.createElement("span");
  label.className = "name";
  label.textContent = name;
  label.setAttribute("aria-hidden", "true");
  button.append(image, score, label);
  button.addEventListener("click", () => openPreview(index));
  item.append(button);
  return item;
}

function say(text, isError = false) {
  ui.message.textContent = text;
  ui.message.classList.toggle("error", isError);
}

function showSource() {
  if (upload) {
    ui.sourceImage.src = uploadUrl;
    ui.sourceImage.alt = "The image you gave";
    ui.sourceText.textContent = "Images like the one you gave (it is not stored, so this search is not in the URL).";
  } else if (state.similar) {
    ui.sourceImage.src = `/api/thumbnail/${state.similar}`;
    ui.sourceImage.alt = "The image whose look-alikes are shown";
    ui.sourceText.textContent = state.q ? `Images similar to this one, refined by “${state.q}”.` : "Images similar to this one.";
  }
  ui.source.hidden = !(upload || state.similar);
}

function sentinelVisible() {
  const box = ui.sentinel.getBoundingClientRect();
  return box.top < window.innerHeight + 400;
}

// A new search (pushed to the history, so Back returns to the one before); ``keepUpload`` keeps
// searching by the image given, with other filters.
function search(changes, keepUpload = false) {
  closePreview(false);
  Object.assign(state, { view: "" }, changes);
  if (!keepUpload) setUpload(null);
  writeUrl(true);
  showState();
  return startSearch();
}

function setUpload(blob) {
  if (uploadUrl) URL.revokeObjectURL(uploadUrl);
  upload = blob;
  uploadUrl = blob ? URL.createObjectURL(blob) : null;
}

function searchByImage(file) {
  if (!file || !(file.type || "").startsWith("image/")) {
    say("That is not an image file.", true);
    return;
  }
  setUpload(file);
  search({ q: "", similar: "" }, true);
}

// --- the preview --------------------------------------------------------------------------

const preview = {
  image: $("preview-image"), name: $("preview-name"), path: $("preview-path"), score: $("preview-score"),
  size: $("preview-size"), dimensions: $("preview-dimensions"), taken: $("preview-taken"),
  modified: $("preview-modified"), similar: $("preview-similar"), original: $("preview-original"),
  copy: $("preview-copy"), prev: $("preview-prev"), next: $("preview-next"), close: $("preview-close"),
  position: $("preview-position"), gone: $("preview-gone"),
};

preview.image.addEventListener("error", () => {
  if (!preview.image.getAttribute("src")) return; // let go of on closing
  preview.image.hidden = true;
  preview.gone.hidden = false;
});

// The preview changes the URL in place (view=ID): Back leaves the search, not the image.
function openPreview(index) {
  if (index < 0 || index >= hits.length) return;
  current = index;
  const hit = hits[index];
  preview.image.hidden = false;
  preview.gone.hidden = true;
  preview.image.src = `/api/original/${hit.id}`;
  preview.image.alt = baseName(hit.path);
  preview.name.textContent = baseName(hit.path);
  preview.path.replaceChildren(...pathParts(hit.path));
  preview.score.textContent = hit.score.toFixed(4);
  preview.size.textContent = formatBytes(hit.size);
  preview.dimensions.textContent = hit.width && hit.height ? `${hit.width} × ${hit.height}` : "unknown";
  preview.modified.textContent = new Date(hit.mtime * 1000).toLocaleString();
  preview.taken.textContent = "…";
  preview.original.href = `/api/original/${hit.id}`;
  showPosition();
  fetch(`/api/image/${hit.id}`).then((r) => (r.ok ? r.json() : null)).then((details) => {
    if (current === index) preview.taken.textContent = details && details.taken ? new Date(details.taken).toLocaleString() : "unknown";
  }).catch(() => { preview.taken.textContent = "unknown"; });
  if (!ui.preview.open) ui.preview.showModal();
  state.view = String(hit.id);
  writeUrl(false);
  if (!done && index >= hits.length - 3) loadMore();
}

// The preview's place in the results, and its ← → buttons. A button disabled while it has the
// focus drops the focus out of the dialog, where ← and → no longer reach it: it moves first.
function showPosition() {
  const atStart = current === 0;
  const atEnd = done && current === hits.length - 1;
  preview.position.textContent = `${current + 1} of ${hits.length}${done ? "" : "+"}`;
  const focused = document.activeElement;
  if ((atStart && focused === preview.prev) || (atEnd && focused === preview.next)) {
    (atStart && atEnd ? preview.close : atStart ? preview.next : preview.prev).focus();
  }
  preview.prev.disabled = atStart;
  preview.next.disabled = atEnd;
}

async function move(step) {
  if (!ui.preview.open) return;
  const target = current + step;
  if (target >= hits.length && !done) {
    await loadMore();
  }
  if (target >= 0 && target < hits.length) openPreview(target);
}

function closePreview(updateUrl = true) {
  if (ui.preview.open) ui.preview.close();
  if (updateUrl && state.view) {
    state.view = "";
    writeUrl(false);
  }
}

ui.preview.addEventListener("close", () => {
  const button = ui.results.querySelector(`button[data-index="${current}"]`);
  if (state.view) {
    state.view = "";
    writeUrl(false);
  }
  preview.image.removeAttribute("src");
  if (button) button.focus();
});

ui.preview.addEventListener("keydown", (event) => {
  if (event.key === "ArrowRight") { event.preventDefault(); move(1); }
  else if (event.key === "ArrowLeft") { event.preventDefault(); move(-1); }
});

ui.preview.addEventListener("click", (event) => {
  if (event.target === ui.preview) closePreview(); // a click on the backdrop
});

preview.prev.addEventListener("click", () => move(-1));
preview.next.addEventListener("click", () => move(1));
preview.close.addEventListener("click", () => closePreview());
preview.similar.addEventListener("click", async () => {
  const hit = hits[current];
  if (!hit) return;
  await search({ q: "", similar: String(hit.id) });
  ui.results.querySelector("button.hit")?.focus(); // its tile is gone: the focus had fallen to the page
});
preview.copy.addEventListener("click", async () => {
  const hit = hits[current];
  if (!hit) return;
  const copied = await copyText(hit.path);
  preview.copy.textContent = copied ? "Copied" : "Select the path above to copy it";
  setTimeout(() => { preview.copy.textContent = "Copy path"; }, 1500);
});

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    ui.preview.append(area);
    area.select();
    const copied = document.execCommand("copy");
    area.remove();
    return copied;
  }
}

// --- the status panel ---------------------------------------------------------------------

async function refreshStatus() {
  try {
    const response = await fetch("/api/status");
    if (!response.ok) return null;
    lastStatus = await response.json();
  } catch {
    return null;
  }
  const s = lastStatus;
  const indexed = s.counts.indexed || 0;
  ui.statusSummary.textContent = `${indexed.toLocaleString()} images · ${s.model}${s.indexing ? " · indexing…" : ""}`;
  ui.statusButton.classList.toggle("indexing", Boolean(s.indexing));
  ui.statusButton.setAttribute("aria-label", `Index status: ${ui.statusSummary.textContent}`);
  return s;
}

function renderStatus(s) {
  const rows = [
    ["Index", s.home],
    ["Model", s.dim ? `${s.model} (${s.dim}-d vectors)` : s.model],
    ["Images", `${s.counts.indexed} indexed, ${s.counts.failed} failed, ${s.counts.missing} missing`],
    ["Vector index", `${s.vectors_in_index.toLocaleString()} in a ${s.index_type} index` +
      (s.recall_at_10 != null ? `, recall@10 ${s.recall_at_10.toFixed(3)}` : "") +
      (s.consistent ? "" : " (behind the catalog: catching up)")],
    ["On disk", `catalog ${formatBytes(s.catalog_bytes)}, vectors ${formatBytes(s.vectors_bytes)}, ` +
      `thumbnails ${formatBytes(s.thumbnail_bytes)}`],
    ["Index run", s.indexing === null ? "unknown" : s.indexing ? "going on now" : "none"],
  ];
  if ((s.models || []).length > 1) {
    rows.splice(2, 0, ["Models", s.models.map((m) =>
      `${m.name}: ${m.vectors.toLocaleString()} vectors${m.default ? " (default)" : ""}`).join("; ")]);
  }
  ui.statusFields.replaceChildren(...rows.flatMap(([term, value]) => {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    return [dt, dd];
  }));
  ui.failuresTitle.hidden = s.failures_total === 0;
  ui.failuresTitle.textContent = `Files that could not be indexed (${s.failures_total})`;
  ui.failures.replaceChildren(...s.failures.map((failure) => {
    const item = document.createElement("li");
    const path = document.createElement("code");
    path.replaceChildren(...pathParts(failure.path));
    item.append(path, `: ${failure.reason}`);
    return item;
  }));
}

ui.statusButton.addEventListener("click", async () => {
  ui.status.showModal();
  const s = (await refreshStatus()) || lastStatus;
  if (s) renderStatus(s);
});

// --- images given by drop, pick or paste ----------------------------------------------------

ui.pick.addEventListener("click", () => ui.file.click());
ui.file.addEventListener("change", () => {
  if (ui.file.files.length) searchByImage(ui.file.files[0]);
  ui.file.value = "";
});

let dragDepth = 0;
window.addEventListener("dragenter", (event) => {
  if (![...(event.dataTransfer?.types || [])].includes("Files")) return;
  dragDepth += 1;
  ui.drop.hidden = false;
});
window.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) ui.drop.hidden = true;
});
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => {
  event.preventDefault();
  dragDepth = 0;
  ui.drop.hidden = true;
  const file = event.dataTransfer?.files?.[0];
  if (file) searchByImage(file);
});
window.addEventListener("paste", (event) => {
  const file = [...(event.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
  if (file) {
    event.preventDefault();
    searchByImage(file);
  }
});

// --- the rest of the page -----------------------------------------------------------------

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const q = ui.q.value.trim();
  if (!q) {
    if (ui.message.classList.contains("error")) say(""); // the last search's error, under an empty box
    ui.q.focus();
    return;
  }
  search({ q, similar: "", under: ui.under.value.trim(), min_score: ui.minScore.value.trim() });
});

for (const input of [ui.under, ui.minScore]) {
  input.addEventListener("change", () => {
    if (searching() || ui.q.value.trim()) {
      const q = upload || state.similar ? state.q : ui.q.value.trim() || state.q;
      search({ q, under: ui.under.value.trim(), min_score: ui.minScore.value.trim() }, true);
    }
  });
}

ui.sourceClear.addEventListener("click", () => search({ q: "", similar: "" }));
ui.more.addEventListener("click", () => loadMore());

new IntersectionObserver((entries) => {
  if (entries.some((entry) => entry.isIntersecting)) loadMore();
}, { rootMargin: "400px" }).observe(ui.sentinel);

document.addEventListener("keydown", (event) => {
  if (event.key === "/" && !ui.preview.open && !ui.status.open && document.activeElement?.tagName !== "INPUT") {
    event.preventDefault();
    ui.q.focus();
    ui.q.select();
  }
});

window.addEventListener("popstate", () => restore());

async function restore() {
  readUrl();
  setUpload(null);
  showState();
  const view = state.view;
  await startSearch();
  if (!view) {
    closePreview(false);
    return;
  }
  // Bring the viewed image into the loaded pages (up to a few), then show it.
  let index = hits.findIndex((hit) => String(hit.id) === view);
  while (index < 0 && !done && hits.length < 5 * PAGE) {
    await loadMore();
    index = hits.findIndex((hit) => String(hit.id) === view);
  }
  if (index >= 0) openPreview(index);
  else {
    // A shared link whose image left the search's results (an index run since): say so, where
    // the page had shown the results alone, with no word of the image the link was for.
    state.view = "";
    writeUrl(false);
    say(`The image this link showed is not among ${done ? "the" : `the first ${hits.length}`} results now.`);
  }
}

// A path's names each isolated, the slashes between them left to right: a slash between two
// right-to-left names had taken their direction, and /me/عطلة/صيف/ showed as /me/صيف/عطلة/.
function pathParts(path) {
  return path.split("/").flatMap((name, i) => {
    const part = document.createElement("bdi");
    part.textContent = name;
    return i ? ["/", part] : [part];
  });
}

function baseName(path) {
  return path.slice(path.lastIndexOf("/") + 1);
}

function formatBytes(bytes) {
  if (bytes == null) return "unknown";
  const units = ["bytes", "KB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return unit ? `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}` : `${bytes} bytes`;
}

refreshStatus();
setInterval(refreshStatus, 15000);
restore().then(() => { if (!state.q && !state.similar) ui.q.focus(); });
