// Keys view: per-key usage and limits from GET /admin/keys, when Corral has named
// keys ([[keys]]); a clear empty state when it has none or the endpoint is absent.

import { $, api, el, errorText } from "./util.js";

const POLL_MS = 2000;
const state = { timer: null, active: false, last: null };
window.corralKeys = state;

const n = (v) => v === null || v === undefined ? "–" : String(v);

function limits(l) {
  if (!l) return "–";
  const parts = [];
  if (l.max_concurrent) parts.push(`${l.max_concurrent} at once`);
  if (l.requests_per_minute) parts.push(`${l.requests_per_minute} req/min`);
  if (l.tokens_per_minute) parts.push(`${l.tokens_per_minute} tokens/min`);
  return parts.join(", ") || "none";
}

function empty(text) {
  $("#keys tbody").replaceChildren();
  $("#keys").hidden = true;
  $("#keys-empty").textContent = text;
  $("#keys-empty").hidden = false;
}

async function refresh() {
  try {
    const resp = await api("/admin/keys");
    if (resp.status === 404) {
      empty("No named keys: this Corral has no per-key accounting ([[keys]] in the config).");
      return;
    }
    if (!resp.ok) { empty(await errorText(resp)); return; }
    const body = await resp.json();
    state.last = body;
    const keys = body.keys || [];
    if (!keys.length) {
      empty("No named keys configured. Add [[keys]] entries to the config to see per-key usage.");
      return;
    }
    $("#keys").hidden = false;
    $("#keys-empty").hidden = true;
    $("#keys tbody").replaceChildren(...keys.map((k) => {
      const u = k.usage || {};
      return el("tr", { "data-key": k.name },
        el("td", {}, el("strong", {}, k.name)),
        el("td", {}, (k.models || []).join(", ") || "all"),
        el("td", {}, k.admin ? "yes" : "no"),
        el("td", { class: "num" }, n(k.priority)),
        el("td", { class: "num" }, n(u.in_flight)),
        el("td", { class: "num" }, n(u.requests_total)),
        el("td", { class: "num" }, n(u.tokens_total)),
        el("td", { class: "num" }, `${n(u.requests_last_minute)} req · ${n(u.tokens_last_minute)} tok`),
        el("td", { class: "num" }, n(u.rejected_total)),
        el("td", {}, limits(k.limits)));
    }));
  } catch (e) {
    empty(e.message);
  }
}

function loop() {
  if (!state.active) return;
  refresh().finally(() => { if (state.active) state.timer = setTimeout(loop, POLL_MS); });
}

export function show() {
  if (state.active) return;
  state.active = true;
  loop();
}

export function hide() {
  state.active = false;
  clearTimeout(state.timer);
}
