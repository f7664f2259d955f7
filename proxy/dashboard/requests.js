// Requests view: the calls in flight (each with a Cancel button) and the recent calls
// from GET /admin/requests, polled; a captured call opens a detail view from
// GET /admin/requests/{id} (bodies, the answer assembled, timings, tokens, its curl
// command) with "Replay against model X" answering in the page.

import { $, api, clock, el, errorText, fillSelect, seconds } from "./util.js";

const POLL_MS = 1000;
const state = { timer: null, active: false, open: null, models: [] };
window.corralRequests = state;

function message(text, isError = false) {
  const p = $("#rq-message");
  p.textContent = text;
  p.className = isError ? "error" : "muted";
}

async function cancel(id) {
  const resp = await api(`/admin/requests/${encodeURIComponent(id)}/cancel`, { method: "POST" });
  message(resp.ok ? `cancelled ${id}` : `cancel ${id}: ${await errorText(resp)}`, !resp.ok);
  refresh();
}

function renderInFlight(calls) {
  $("#rq-inflight-empty").hidden = calls.length > 0;
  $("#rq-inflight tbody").replaceChildren(...calls.map((c) => el("tr", { "data-id": c.request_id },
    el("td", {}, c.request_id),
    el("td", {}, c.model),
    el("td", {}, c.answering ? "answering" : "waiting"),
    el("td", { class: "num" }, seconds(c.seconds)),
    el("td", {}, el("button", { type: "button", class: "cancel",
      onclick: () => cancel(c.request_id) }, "Cancel")))));
}

function renderRecent(requests) {
  $("#rq-recent tbody").replaceChildren(...requests.map((r) => el("tr", { "data-id": r.request_id },
    el("td", {}, clock(r.time)),
    el("td", {}, r.method + " " + r.endpoint),
    el("td", {}, r.model || "–"),
    el("td", { class: r.status >= 400 ? "error" : "" }, String(r.status)),
    el("td", { class: "num" }, seconds(r.duration_seconds)),
    el("td", {}, r.captured
      ? el("button", { type: "button", class: "open", onclick: () => openDetail(r.request_id) }, "Details")
      : el("span", { class: "muted" }, r.request_id)))));
}

function block(title, text) {
  return el("details", { open: true }, el("summary", {}, title), el("pre", { class: "code" }, text));
}

function pretty(text) {
  try { return JSON.stringify(JSON.parse(text), null, 2); } catch (e) { return text; }
}

async function openDetail(id) {
  state.open = id;
  const resp = await api(`/admin/requests/${encodeURIComponent(id)}`);
  if (!resp.ok) { message(`${id}: ${await errorText(resp)}`, true); return; }
  const c = await resp.json();
  const t = c.timings || {};
  const tok = c.tokens || {};
  const assembled = c.answer && c.answer.assembled;
  $("#rq-detail-title").textContent = `${c.id} · ${c.method || ""} ${c.path} · ${c.model} · ${c.status}` +
    (c.cancelled ? " · cancelled" : "") + (c.in_flight ? " · in flight" : "");
  $("#rq-timings").replaceChildren(...[
    ["queue", seconds(t.queue_seconds)], ["launch", seconds(t.launch_seconds)],
    ["first token", seconds(t.first_token_seconds)], ["generation", seconds(t.generation_seconds)],
    ["total", seconds(t.total_seconds)],
    ["prompt tokens", tok.prompt ?? "–"], ["completion tokens", tok.completion ?? "–"],
  ].map(([k, v]) => el("li", {}, el("span", { class: "muted" }, k + " "), String(v))));
  $("#rq-bodies").replaceChildren(
    ...(assembled ? [block("Answer (assembled)", assembled.reasoning
      ? `[reasoning]\n${assembled.reasoning}\n\n[text]\n${assembled.text}` : assembled.text)] : []),
    block("Request as received", pretty(c.request.body)),
    block(`Sent upstream (${c.upstream.instance || "–"} ${c.upstream.path || ""})`, pretty(c.upstream.body)),
    block(`Answer as the upstream sent it (${c.answer.content_type || "–"})`, pretty(c.answer.body)),
    block("Request headers (secrets redacted)",
      (c.request.headers || []).map(([k, v]) => `${k}: ${v}`).join("\n")),
    block("As a curl command", c.curl));
  fillSelect($("#rq-model"), state.models);
  if (state.models.includes(c.model)) $("#rq-model").value = c.model;
  $("#rq-replay-answer").textContent = "";
  $("#rq-detail").hidden = false;
}

async function replay(ev) {
  ev.preventDefault();
  if (!state.open) return;
  const model = $("#rq-model").value;
  $("#rq-replay-answer").textContent = `replaying against ${model}…`;
  const resp = await api(`/admin/requests/${encodeURIComponent(state.open)}/replay`, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model }) });
  if (!resp.ok) { $("#rq-replay-answer").textContent = await errorText(resp); return; }
  const out = await resp.json();
  const answer = typeof out.answer === "string" ? out.answer : JSON.stringify(out.answer, null, 2);
  $("#rq-replay-answer").textContent = `HTTP ${out.status} · ${out.request_id}\n${answer}`;
}

async function refresh() {
  try {
    const resp = await api("/admin/requests?limit=50");
    if (!resp.ok) { message(await errorText(resp), true); return; }
    const body = await resp.json();
    renderInFlight(body.in_flight || []);
    renderRecent(body.requests || []);
    const cap = body.captures;
    $("#rq-captures").textContent = cap
      ? `captures: ${cap.records} kept, ${Math.round(cap.bytes / 1024)} of ${Math.round(cap.memory / 1024)} KiB`
      : "captures are off ([server.capture] memory)";
  } catch (e) {
    message(e.message, true);
  }
}

async function loadModels() {
  const resp = await api("/admin/models");
  if (resp.ok) state.models = ((await resp.json()).models || []).map((m) => m.name);
}

function loop() {
  if (!state.active) return;
  refresh().finally(() => { if (state.active) state.timer = setTimeout(loop, POLL_MS); });
}

let wired = false;

export function show() {
  if (!wired) {
    $("#rq-replay").addEventListener("submit", replay);
    $("#rq-close").addEventListener("click", () => { $("#rq-detail").hidden = true; state.open = null; });
    wired = true;
  }
  if (state.active) return;
  state.active = true;
  loadModels().catch(() => {});
  loop();
}

export function hide() {
  state.active = false;
  clearTimeout(state.timer);
}
