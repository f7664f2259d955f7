// Corral dashboard: the Overview view polls GET /admin/overview every second and
// renders it; buttons call the admin API; a picked instance's log streams from
// GET /admin/instances/{id}/logs?follow=1 (server-sent events read through fetch, so
// that the API key can ride in a header: EventSource cannot send one).
// The other views live in their own modules (charts, playground, models, config,
// keys, requests); each exports show() and hide(), called when its tab is picked.
// Every value from the server goes into the page as text, never as HTML.

import { $, api, bytes, clock, el, POLL_TIMEOUT_MS, pollError, seconds, setKey, ui } from "./util.js";
import * as charts from "./charts.js";
import * as playground from "./playground.js";
import * as models from "./models.js";
import * as config from "./config.js";
import * as keys from "./keys.js";
import * as requests from "./requests.js";

const POLL_MS = 1000;
const LOG_LINES_KEPT = 2000;

const state = {
  busy: new Set(),          // "model/action" pairs whose call is running
  logInstance: null,
  logAbort: null,
};

const VIEWS = { overview: null, charts, playground, models, config, keys, requests };

function stateCell(state) {
  return el("td", { class: "state state-" + state }, state);
}

function loadBar(inFlight, slots) {
  const pct = slots ? Math.min(100, Math.round(100 * inFlight / slots)) : 0;
  const fill = el("span");
  fill.style.width = pct + "%";
  return el("span", { class: "bar", title: pct + "%" }, fill);
}

// -- actions ----------------------------------------------------------------------

async function act(model, action) {
  const tag = model + "/" + action;
  if (state.busy.has(tag)) return;
  state.busy.add(tag);
  $("#model-error").hidden = true;
  try {
    const resp = await api(`/admin/models/${encodeURIComponent(model)}/${action}`, { method: "POST" });
    if (!resp.ok) {
      const body = await resp.json().catch(() => ({}));
      const msg = (body.error && body.error.message) || resp.statusText;
      $("#model-error").textContent = `${action} ${model}: ${msg}`;
      $("#model-error").hidden = false;
    }
  } catch (e) {
    $("#model-error").textContent = `${action} ${model}: ${e.message}`;
    $("#model-error").hidden = false;
  } finally {
    state.busy.delete(tag);
  }
}

function actionButton(model, action, label) {
  const b = el("button", { type: "button", "data-action": action, onclick: () => act(model, action) }, label);
  b.disabled = state.busy.has(model + "/" + action);
  return b;
}

// -- rendering ----------------------------------------------------------------------

function renderModels(models) {
  const rows = models.map((m) => {
    const local = m.instances.filter((i) => !i.remote);
    const inFlight = m.instances.reduce((a, i) => a + (i.in_flight || 0), 0);
    const slots = m.instances.reduce((a, i) => a + (i.slots || 0), 0);
    const rss = local.reduce((a, i) => a + (i.resident_memory_bytes || 0), 0);
    // The name opens the charts, filtered to this model.
    const name = el("td", {}, el("a", {
      href: "#charts", class: "model-link", title: "charts of " + m.name,
      onclick: (ev) => { ev.preventDefault(); chartsOf(m.name); },
    }, el("strong", {}, m.name)),
      m.aliases.length ? el("div", { class: "muted" }, m.aliases.join(", ")) : null);
    const actions = el("td", {},
      actionButton(m.name, "load", "Load"),
      actionButton(m.name, "unload", "Unload"),
      actionButton(m.name, "restart", "Restart"),
      // A launch (or its download) in progress can be stopped: its child is killed,
      // its memory given back, and the calls that waited for it get an error.
      m.state === "loading" ? actionButton(m.name, "cancel", "Cancel") : null,
      m.state === "loaded" ? actionButton(m.name, "replicas/add", "+1") : null,
      m.state === "loaded" && m.instances.length > 1 ? actionButton(m.name, "replicas/remove", "−1") : null,
      (m.state === "failed" || m.state === "unavailable") ? actionButton(m.name, "reset", "Reset") : null);
    const state = stateCell(m.state);
    if (m.last_error) state.title = m.last_error;
    // The load under way against the model's median load time (issue 27).
    if (m.loading) {
      const bar = el("progress", { max: 1, value: m.loading.progress });
      state.append(" ", bar, el("div", { class: "muted" },
        `${seconds(m.loading.elapsed_seconds)}, about ${seconds(m.loading.remaining_seconds)} left`));
    } else if (m.load_seconds_median != null) {
      state.title = (state.title ? state.title + "\n" : "") +
        `loads in about ${seconds(m.load_seconds_median)} (median of its last loads)`;
    }
    return el("tr", { "data-model": m.name },
      name, state,
      el("td", { class: "num" }, m.queued),
      el("td", { class: "num" }, m.instances.length),
      el("td", {}, loadBar(inFlight, slots), ` ${inFlight}/${slots}`),
      el("td", { class: "num", title: "resident now / expected footprint" },
        `${bytes(rss)} / ${bytes(m.footprint_bytes)}`),
      actions);
  });
  $("#models tbody").replaceChildren(...rows);
}

function renderInstances(models) {
  const rows = [];
  for (const m of models) {
    for (const i of m.instances) {
      const logButton = !i.remote
        ? el("button", { type: "button", onclick: () => followLog(i.id) }, "Log")
        : null;
      const state = stateCell(i.state);
      if (i.failure) state.title = i.failure;
      rows.push(el("tr", { "data-instance": i.id },
        el("td", {}, i.id), state,
        el("td", { class: "num" }, i.pid ?? "–"),
        el("td", {}, loadBar(i.in_flight, i.slots), ` ${i.in_flight}/${i.slots}`),
        el("td", { class: "num" }, bytes(i.resident_memory_bytes)),
        el("td", { class: "num" }, i.served ?? "–"),
        el("td", { class: "num" }, seconds(i.idle_seconds)),
        el("td", { class: "num" }, seconds(i.load_seconds)),
        el("td", {}, logButton)));
    }
  }
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 9, class: "muted" }, "no instance running")));
  $("#instances tbody").replaceChildren(...rows);
}

function renderRequests(requests) {
  const rows = requests.map((r) => el("tr", {},
    el("td", {}, clock(r.time)),
    el("td", {}, r.dialect),
    el("td", {}, r.model || "–"),
    el("td", {}, `${r.method} ${r.endpoint}`),
    el("td", { class: "num status-" + String(r.status)[0] }, r.status),
    el("td", { class: "num" }, seconds(r.duration_seconds)),
    el("td", { class: "muted" }, r.request_id)));
  $("#requests tbody").replaceChildren(...rows);
}

function renderEvents(events) {
  const items = events.map((e) => el("li", {},
    el("span", { class: "muted" }, clock(e.time) + " "),
    `${e.model} ${e.event}`, e.detail !== null ? ` (${e.detail})` : ""));
  $("#events").replaceChildren(...items);
}

function renderHeader(o) {
  $("#version").textContent = "v" + o.version;
  const m = o.memory;
  $("#memory").textContent =
    `RAM ${bytes(m.available_bytes)} free of ${bytes(m.total_bytes)} · Corral ${bytes(m.corral_resident_bytes)}` +
    (m.budget_bytes ? ` · budget ${bytes(m.budget_bytes)}` : "");
  const cfg = o.config;
  const status = $("#config-status");
  if (cfg.last_reload_error) {
    status.className = "error";
    status.textContent = "config reload failed (still on the previous config)";
    status.title = cfg.last_reload_error;
  } else {
    status.className = "muted";
    status.textContent = cfg.path ? "config: " + cfg.path : "";
    status.title = "";
  }
}

function render(o) {
  renderHeader(o);
  renderModels(o.models);
  renderInstances(o.models);
  renderRequests(o.requests);
  renderEvents(o.events);
  // Views that list models keep their pickers current from the same poll.
  for (const view of Object.values(VIEWS)) if (view && view.overview) view.overview(o);
}

async function poll() {
  try {
    const resp = await api("/admin/overview", { signal: AbortSignal.timeout(POLL_TIMEOUT_MS) });
    if (resp.ok) {
      render(await resp.json());
      $("#status").textContent = "live";
    } else {
      $("#status").textContent = "error " + resp.status;
    }
  } catch (e) {
    $("#status").textContent = pollError(e);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

// -- logs -------------------------------------------------------------------------

function appendLog(lines) {
  const pre = $("#log");
  const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  pre.append(lines.join("\n") + "\n");
  // Keep the page light: drop the oldest text once it grows past the limit.
  const text = pre.textContent;
  const all = text.split("\n");
  if (all.length > LOG_LINES_KEPT) pre.textContent = all.slice(-LOG_LINES_KEPT).join("\n");
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}

async function followLog(instanceId) {
  if (state.logAbort) state.logAbort.abort();
  const abort = new AbortController();
  state.logAbort = abort;
  state.logInstance = instanceId;
  $("#log").textContent = "";
  $("#log-title").textContent = instanceId;
  try {
    const resp = await api(`/admin/instances/${encodeURIComponent(instanceId)}/logs?follow=1&tail=200`,
      { signal: abort.signal });
    if (!resp.ok) { appendLog([`[cannot follow: HTTP ${resp.status}]`]); return; }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const events = buffer.split("\n\n");
      buffer = events.pop();
      const lines = [];
      for (const ev of events) {
        const isEnd = ev.startsWith("event: end");
        for (const line of ev.split("\n")) {
          if (line.startsWith("data: ")) lines.push(isEnd ? `[${line.slice(6)}]` : line.slice(6));
        }
      }
      if (lines.length) appendLog(lines);
    }
  } catch (e) {
    if (e.name !== "AbortError") appendLog([`[log stream ended: ${e.message}]`]);
  }
}

// -- tabs -------------------------------------------------------------------------

function chartsOf(model) {
  $("#chart-model").value = model;
  pick("charts");
}

let current = "overview";

function pick(name, focus = false) {
  if (!(name in VIEWS)) name = "overview";
  for (const view of Object.keys(VIEWS)) {
    const tab = $("#tab-" + view);
    const on = view === name;
    tab.setAttribute("aria-selected", on ? "true" : "false");
    tab.tabIndex = on ? 0 : -1;
    $("#view-" + view).hidden = !on;
  }
  if (current !== name && VIEWS[current]) VIEWS[current].hide();
  current = name;
  if (VIEWS[name]) VIEWS[name].show();
  if (focus) $("#tab-" + name).focus();
  // A view is a link (#charts ...); the landing view keeps the bare address.
  const hash = name === "overview" && !location.hash ? "" : name;
  if (location.hash.slice(1) !== hash) history.replaceState(null, "", hash ? "#" + hash : location.pathname);
}

function setUpTabs() {
  const names = Object.keys(VIEWS);
  for (const name of names) {
    const tab = $("#tab-" + name);
    tab.addEventListener("click", () => pick(name));
    // Arrow keys move between tabs (the WAI-ARIA tabs pattern); Tab goes into the view.
    tab.addEventListener("keydown", (ev) => {
      const i = names.indexOf(name);
      const to = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: names.length - 1 }[ev.key];
      if (to === undefined) return;
      ev.preventDefault();
      pick(names[(to + names.length) % names.length], true);
    });
  }
  window.addEventListener("hashchange", () => pick(location.hash.slice(1)));
  pick(location.hash.slice(1) || "overview");
}

// -- start --------------------------------------------------------------------------

$("#key-button").addEventListener("click", () => { $("#key-form").hidden = !$("#key-form").hidden; });
$("#key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  setKey($("#key-input").value.trim());
  $("#key-form").hidden = true;
  if (state.logInstance) followLog(state.logInstance);
  if (VIEWS[current]) VIEWS[current].show();
});
setUpTabs();
poll();
