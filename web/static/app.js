// lorareg playground: instant grid filtering, copy buttons, selection for compare/merge, the merge
// builder's adapter picker, and following background jobs. No inline scripts (the CSP forbids them);
// text from the catalog is only ever set with textContent or attribute values, never as HTML.
"use strict";

const csrf = () => document.querySelector('meta[name="csrf-token"]').content;

// -- copy buttons -------------------------------------------------------------------------------
function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    return navigator.clipboard.writeText(text);
  }
  const area = document.createElement("textarea");  // plain http from another machine: no Clipboard API
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.appendChild(area);
  area.select();
  document.execCommand("copy");
  area.remove();
  return Promise.resolve();
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("[data-copy]");
  if (!button) return;
  event.preventDefault();
  copyText(button.dataset.copy).then(() => {
    button.classList.add("copied");
    setTimeout(() => button.classList.remove("copied"), 900);
  });
});

// Broken or missing images: hide them (error events do not bubble, so listen while capturing).
document.addEventListener("error", (event) => {
  if (event.target.tagName === "IMG") event.target.classList.add("broken");
}, true);

// -- the grid: filter as you type ---------------------------------------------------------------
const filters = document.getElementById("filters");
const results = document.getElementById("results");
let pending = null;
let generation = 0;

function loadResults(url, push) {
  const mine = ++generation;
  if (pending) pending.abort();
  pending = new AbortController();
  const started = performance.now();
  results.classList.add("loading");
  return fetch("/cards" + url.search, {signal: pending.signal, headers: {"Accept": "text/html"}})
    .then((response) => response.text())
    .then((html) => {
      if (mine !== generation) return;
      results.innerHTML = html;  // rendered by the server with every value escaped
      results.classList.remove("loading");
      markPicked();
      if (push) history.pushState(null, "", url.pathname + url.search);
      else history.replaceState(null, "", url.pathname + url.search);
      const detail = {requestStarted: started, shown: performance.now()};
      document.dispatchEvent(new CustomEvent("lorareg:results", {detail}));
    })
    .catch((error) => { if (error.name !== "AbortError") results.classList.remove("loading"); });
}

function filterUrl() {
  const params = new URLSearchParams();
  for (const [key, value] of new FormData(filters)) {
    if (value.trim()) params.set(key, value.trim());
  }
  const url = new URL("/", location.href);
  url.search = params.toString();
  return url;
}

if (filters && results) {
  let timer = null;
  const changed = (delay) => {
    clearTimeout(timer);
    timer = setTimeout(() => loadResults(filterUrl(), false), delay);
  };
  const typing = (target) => target.type === "search" || target.type === "text";
  filters.addEventListener("input", (event) => changed(typing(event.target) ? 120 : 0));
  filters.addEventListener("change", (event) => { if (!typing(event.target)) changed(0); });
  filters.addEventListener("submit", (event) => { event.preventDefault(); changed(0); });
  results.addEventListener("click", (event) => {
    const link = event.target.closest(".pager a");
    if (!link) return;
    event.preventDefault();
    loadResults(new URL(link.href), true).then(() => window.scrollTo(0, 0));
  });
  window.addEventListener("popstate", () => {
    const url = new URL(location.href);
    for (const field of filters.elements) {
      if (field.name) field.value = url.searchParams.get(field.name) || "";
    }
    loadResults(url, false);
  });
}

// -- picking adapters for compare and merge (kept across pages in sessionStorage) ---------------
const PICKS = "lorareg-picks";
const picks = () => JSON.parse(sessionStorage.getItem(PICKS) || "[]");

function savePicks(list) {
  sessionStorage.setItem(PICKS, JSON.stringify(list));
  markPicked();
}

function markPicked() {
  const list = picks();
  const ids = new Set(list.map((p) => String(p.id)));
  for (const box of document.querySelectorAll("[data-pick]")) box.checked = ids.has(box.dataset.pick);
  const bar = document.getElementById("picked");
  if (!bar) return;
  bar.hidden = list.length === 0;
  document.getElementById("picked-count").textContent = String(list.length);
  const query = list.map((p) => "id=" + encodeURIComponent(p.id)).join("&");
  document.getElementById("picked-compare").href = "/compare?" + query;
  document.getElementById("picked-merge").href = "/merge?" + query;
}

document.addEventListener("change", (event) => {
  const box = event.target.closest("[data-pick]");
  if (!box) return;
  const list = picks().filter((p) => String(p.id) !== box.dataset.pick);
  if (box.checked) list.push({id: box.dataset.pick, name: box.dataset.name});
  savePicks(list);
});
const clear = document.getElementById("picked-clear");
if (clear) clear.addEventListener("click", () => savePicks([]));
markPicked();

// -- the merge builder --------------------------------------------------------------------------
const pickQuery = document.getElementById("pick-query");
if (pickQuery) {
  const list = document.getElementById("pick-results");
  const rows = document.getElementById("merge-inputs");
  const template = document.getElementById("input-row");
  const addInput = (item) => {
    if (rows.querySelector(`input[name="adapter"][value="${CSS.escape(String(item.id))}"]`)) return;
    const row = template.content.firstElementChild.cloneNode(true);
    row.querySelector('input[name="adapter"]').value = item.id;
    row.querySelector(".name").textContent = item.name;
    row.querySelector(".arch").textContent = item.architecture || "?";
    row.querySelector('input[name="weight"]').setAttribute("aria-label", "weight of " + item.name);
    rows.appendChild(row);
  };
  let timer = null;
  const search = () => {
    fetch("/pick?q=" + encodeURIComponent(pickQuery.value.trim()))
      .then((response) => response.json())
      .then((items) => {
        list.replaceChildren();
        for (const item of items) {
          const entry = document.createElement("li");
          const button = document.createElement("button");
          button.type = "button";
          button.className = "link";
          button.dataset.id = item.id;
          button.textContent = `${item.name} (${item.architecture || "?"}, ${item.format || "?"}, rank ${item.rank})`;
          button.addEventListener("click", () => { addInput(item); list.replaceChildren(); pickQuery.value = ""; });
          entry.appendChild(button);
          list.appendChild(entry);
        }
      });
  };
  pickQuery.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(search, 120); });
  pickQuery.addEventListener("focus", search);
  rows.addEventListener("click", (event) => {
    if (event.target.classList.contains("remove-input")) event.target.closest("tr").remove();
  });
}

// -- following a job ----------------------------------------------------------------------------
const job = document.getElementById("job");
if (job) {
  const state = document.getElementById("job-state");
  const bar = document.getElementById("job-progress");
  const count = document.getElementById("job-count");
  const step = document.getElementById("job-step");
  const error = document.getElementById("job-error");
  const result = document.getElementById("job-result");
  const cancelForm = document.getElementById("job-cancel-form");
  const show = (data) => {
    state.textContent = data.state;
    state.className = "state " + data.state;
    step.textContent = data.step || "";
    if (data.total) {
      bar.max = data.total;
      bar.value = data.done;
      count.textContent = `${data.done} / ${data.total}`;
    }
    if (data.error) { error.textContent = data.error; error.hidden = false; }
    if (data.finished) {
      cancelForm.hidden = true;
      step.textContent = "";
      if (data.state === "done") bar.value = bar.max;
      if (data.result && data.result.entry_id && !document.getElementById("job-entry")) {
        const link = document.createElement("a");
        link.id = "job-entry";
        link.href = "/a/" + encodeURIComponent(data.result.entry_id);
        link.textContent = data.result.name;
        result.prepend(link);
      }
      result.hidden = !data.result || Object.keys(data.result).length === 0;
    }
    return data.finished;
  };
  const poll = () => {
    fetch(job.dataset.status, {cache: "no-store"})
      .then((response) => response.json())
      .then((data) => { if (!show(data)) setTimeout(poll, 400); })
      .catch(() => setTimeout(poll, 2000));
  };
  poll();
  cancelForm.addEventListener("submit", (event) => {
    event.preventDefault();
    fetch(job.dataset.cancel, {method: "POST", headers: {"X-CSRF-Token": csrf()}})
      .then((response) => response.json()).then(show);
  });
}
