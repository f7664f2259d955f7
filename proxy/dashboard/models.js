// Models view: every model the scheduler knows (GET /admin/catalog: configured and
// discovered, with source, size, quantization, context, capabilities) and actions on
// each (load, unload, restart, reset, pin). The table is refreshed from the overview poll (state) and re-read right after
// an action, so its effect shows at once. The pull form streams Ollama's /api/pull
// NDJSON progress ({status, digest, total, completed}) into a progress bar.

import { $, api, bytes, el, errorText } from "./util.js";

const state = { models: [], busy: new Set(), pulling: false };
window.corralModels = state;

const ACTIONS = [
  ["load", "Load"], ["unload", "Unload"], ["restart", "Restart"], ["reset", "Reset"],
];

async function act(model, action) {
  const tag = model + "/" + action;
  if (state.busy.has(tag)) return;
  state.busy.add(tag);
  render();
  $("#catalog-error").hidden = true;
  try {
    const resp = await api(`/admin/models/${encodeURIComponent(model)}/${action}`, { method: "POST" });
    if (!resp.ok) {
      $("#catalog-error").textContent = `${action} ${model}: ${await errorText(resp)}`;
      $("#catalog-error").hidden = false;
    }
  } catch (e) {
    $("#catalog-error").textContent = `${action} ${model}: ${e.message}`;
    $("#catalog-error").hidden = false;
  } finally {
    state.busy.delete(tag);
    await load();
  }
}

function row(m) {
  const src = m.source;
  const where = el("td", { title: src.where },
    el("span", { class: "tag" }, src.configured ? src.kind : `${src.origin || "discovered"} · ${src.kind}`), " ",
    el("span", { class: "muted ellipsis" }, src.where));
  // What a launch gets (ctx_size "auto": the training context capped by max_ctx and
  // memory), of the most a call can get, of the model's training context.
  const given = m.context || m.ctx_size || m.context_length;
  const most = m.max_context && m.max_context !== given ? ` (up to ${m.max_context})` : "";
  const ctx = m.context_length ? `${given}${most} of ${m.context_length}` : String(given || "–");
  const busy = [...state.busy].some((t) => t.startsWith(m.name + "/"));
  // Pinning is the model's evictable = false in the config file (written for you
  // when admin_config_write is on): kept loaded, never evicted.
  const pin = m.pinned ? ["unpin", "Unpin"] : ["pin", "Pin"];
  const actions = el("td", {}, ...[...ACTIONS, pin].map(([a, label]) => el("button", {
    type: "button", "data-action": a, disabled: busy,
    onclick: () => act(m.name, a),
  }, label)));
  return el("tr", { "data-model": m.name },
    el("td", {}, el("strong", {}, m.name),
      m.aliases.length ? el("div", { class: "muted" }, m.aliases.join(", ")) : null),
    el("td", { class: "state state-" + (busy ? "loading" : m.state) }, busy ? "working…" : m.state,
      m.pinned ? el("div", { class: "tag" }, "pinned") : null),
    where,
    el("td", { class: "num" }, bytes(m.size_bytes)),
    el("td", {}, m.quantization || "–", m.parameters ? el("div", { class: "muted" }, m.parameters) : null),
    el("td", { class: "num", title: `context per slot (ctx_size = ${m.ctx_size}) of the model's training context` }, ctx),
    el("td", {}, m.capabilities.join(", ")),
    actions);
}

function render() {
  const rows = state.models.map(row);
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 8, class: "muted" }, "no model configured")));
  $("#catalog tbody").replaceChildren(...rows);
}

async function load() {
  try {
    const resp = await api("/admin/catalog");
    if (!resp.ok) throw new Error(await errorText(resp));
    state.models = (await resp.json()).models;
    render();
  } catch (e) {
    $("#catalog-error").textContent = e.message;
    $("#catalog-error").hidden = false;
  }
}

async function pull(ev) {
  ev.preventDefault();
  if (state.pulling) return;
  const name = $("#pull-name").value.trim();
  if (!name) return;
  state.pulling = true;
  const bar = $("#pull-progress");
  const status = $("#pull-status");
  bar.hidden = false;
  bar.removeAttribute("value");  // indeterminate until a total is known
  status.textContent = "starting…";
  try {
    const resp = await api("/admin/ollama/api/pull", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: name, stream: true }),
    });
    if (!resp.ok) { status.textContent = "error: " + await errorText(resp); return; }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      buffer += value ? decoder.decode(value, { stream: true }) : "";
      const lines = buffer.split("\n");
      buffer = done ? "" : lines.pop();
      for (const line of lines) {
        if (!line.trim()) continue;
        const p = JSON.parse(line);
        if (p.error) { status.textContent = "error: " + p.error; continue; }
        if (p.total) { bar.max = p.total; bar.value = p.completed || 0; }
        status.textContent = p.total
          ? `${p.status}: ${bytes(p.completed || 0)} of ${bytes(p.total)}` : p.status;
      }
      if (done) break;
    }
    if (status.textContent === "success") { bar.max = 1; bar.value = 1; }
  } catch (e) {
    status.textContent = "error: " + e.message;
  } finally {
    state.pulling = false;
    load();
  }
}

let wired = false;

export function show() {
  if (!wired) {
    wired = true;
    $("#pull-form").addEventListener("submit", pull);
  }
  load();
}

export function hide() {}

export function overview(o) {
  if ($("#view-models").hidden || !state.models.length) return;
  // States change every second; the facts (size, source) only on a reload.
  const live = Object.fromEntries(o.models.map((m) => [m.name, m.state]));
  const names = new Set(state.models.map((m) => m.name));
  if (o.models.some((m) => !names.has(m.name)) || state.models.some((m) => !(m.name in live))) {
    load();
    return;
  }
  let changed = false;
  for (const m of state.models) {
    if (live[m.name] !== m.state) { m.state = live[m.name]; changed = true; }
  }
  if (changed) render();
}
