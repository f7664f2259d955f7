// Config view: the config file as on disk (API keys redacted: GET /admin/config/file),
// edited in place. Every edit is checked by a dry run (POST /admin/config/validate:
// `corral check` semantics, keys HTTP may not change, errors at their line, a diff against the
// running file); Apply writes it (PUT /admin/config: backup kept, then the usual
// reload, which restarts only the models whose config changed). A refused or failed
// apply leaves the running config as it was and says why.

import { $, api, el, errorText } from "./util.js";

const VALIDATE_AFTER_MS = 600;
const state = { loaded: false, original: "", report: null, timer: null, seq: 0, writable: false };
window.corralConfig = state;

const TOML = { "Content-Type": "application/toml" };

function message(text, kind = "") {
  const p = $("#cfg-message");
  p.textContent = text;
  p.className = kind;
}

function gutter() {
  const text = $("#cfg-text").value;
  const lines = text.split("\n").length;
  const bad = new Map();
  for (const e of (state.report && state.report.errors) || []) {
    if (e.line) bad.set(e.line, (bad.get(e.line) ? bad.get(e.line) + "\n" : "") + e.message);
  }
  const rows = [];
  for (let i = 1; i <= lines; i++) {
    const span = el("span", { class: bad.has(i) ? "bad" : "", title: bad.get(i) || "" }, String(i));
    rows.push(span, "\n");
  }
  $("#cfg-gutter").replaceChildren(...rows);
  $("#cfg-gutter").scrollTop = $("#cfg-text").scrollTop;
}

function goToLine(line) {
  const ta = $("#cfg-text");
  const lines = ta.value.split("\n");
  let start = 0;
  for (let i = 0; i < line - 1 && i < lines.length; i++) start += lines[i].length + 1;
  ta.focus();
  ta.setSelectionRange(start, start + (lines[line - 1] || "").length);
  const lineHeight = parseFloat(getComputedStyle(ta).lineHeight) || 16;
  ta.scrollTop = Math.max(0, (line - 3) * lineHeight);
}

function showReport(r) {
  state.report = r;
  state.writable = r.writable;
  const items = r.errors.map((e) => el("li", { "data-line": e.line ?? "" },
    e.line ? el("button", { type: "button", class: "link", onclick: () => goToLine(e.line) },
      `line ${e.line}`) : el("span", { class: "muted" }, "file"),
    " ", e.message));
  $("#cfg-errors").replaceChildren(...items);
  $("#cfg-diff").textContent = r.diff || "(no change)";
  $("#cfg-apply").disabled = !r.writable;
  const off = "Writing the config over HTTP is off: edits are checked here but cannot be " +
    `applied. Set [server] admin_config_write = true in ${state.path || "the config file"} ` +
    "and restart Corral, or edit the file (Corral reloads it by itself).";
  $("#cfg-apply").title = r.writable ? "" : off;
  $("#cfg-note").textContent = off;
  $("#cfg-note").hidden = r.writable;
  gutter();
  if (!r.ok) {
    message(`${r.errors.length} problem(s): this edit would be refused.`, "error");
  } else if (r.diff) {
    const c = r.changes;
    const parts = [];
    if (c.added && c.added.length) parts.push("adds " + c.added.join(", "));
    if (c.removed && c.removed.length) parts.push("removes " + c.removed.join(", "));
    if (c.changed && c.changed.length) parts.push("restarts " + c.changed.join(", "));
    if (r.restart_required.length) parts.push("needs a Corral restart for " + r.restart_required.join(", "));
    message("Valid. Applying it " + (parts.join("; ") || "changes no model") + ".", "ok");
  } else {
    message("Valid; same as the running file.", "muted");
  }
}

async function validate() {
  const seq = ++state.seq;
  const resp = await api("/admin/config/validate", { method: "POST", headers: TOML, body: $("#cfg-text").value });
  if (seq !== state.seq) return null;  // a newer edit is being checked
  if (!resp.ok) {
    state.report = { ok: false, errors: [{ line: null, message: await errorText(resp) }], diff: "", writable: state.writable };
    showReport(state.report);
    return state.report;
  }
  const r = await resp.json();
  showReport(r);
  return r;
}

async function apply() {
  clearTimeout(state.timer);
  $("#cfg-apply").disabled = true;
  try {
    const r = await validate();
    if (!r || !r.ok) {
      message("Not applied: fix the problems listed (the running config is unchanged).", "error");
      return;
    }
    const resp = await api("/admin/config", { method: "PUT", headers: TOML, body: $("#cfg-text").value });
    if (resp.status === 200) {
      const out = await resp.json();
      const c = out.changes || {};
      const done = ["added", "removed", "changed"].filter((k) => c[k] && c[k].length)
        .map((k) => `${k}: ${c[k].join(", ")}`).join("; ");
      await load();
      message(`Applied (${done || "no model changed"}). The previous file is kept as ${state.backup}.`, "ok");
    } else if (resp.status === 422) {
      const out = await resp.json();
      message("Written but the reload failed; still running the previous config: " + out.error, "error");
    } else {
      message("Not applied: " + await errorText(resp), "error");
    }
  } catch (e) {
    message("Not applied: " + e.message, "error");
  } finally {
    $("#cfg-apply").disabled = !state.writable;
  }
}

async function load() {
  const resp = await api("/admin/config/file");
  if (!resp.ok) {
    message(await errorText(resp), "muted");
    $("#cfg-text").value = "";
    $("#cfg-text").disabled = true;
    for (const id of ["#cfg-validate", "#cfg-apply"]) $(id).disabled = true;
    return;
  }
  state.original = await resp.text();
  $("#cfg-text").disabled = false;
  $("#cfg-text").value = state.original;
  $("#cfg-validate").disabled = false;
  const running = await api("/admin/config");
  if (running.ok) {
    const body = await running.json();
    state.backup = body.backup;
    state.path = body.path;
    $("#cfg-path").textContent = body.path || "";
    $("#cfg-running").textContent = JSON.stringify(body.config, null, 2);
  }
  state.loaded = true;
  await validate();
}

let wired = false;

function wire() {
  if (wired) return;
  wired = true;
  const ta = $("#cfg-text");
  ta.addEventListener("input", () => {
    gutter();
    clearTimeout(state.timer);
    state.timer = setTimeout(validate, VALIDATE_AFTER_MS);
  });
  ta.addEventListener("scroll", () => { $("#cfg-gutter").scrollTop = ta.scrollTop; });
  $("#cfg-validate").addEventListener("click", validate);
  $("#cfg-apply").addEventListener("click", apply);
  $("#cfg-reload").addEventListener("click", () => load().then(() => message("Reloaded from disk.", "muted")));
}

export function show() {
  wire();
  if (!state.loaded) load().catch((e) => message(e.message, "error"));
}

export function hide() {}
