// Charts view: GET /admin/timeseries (Corral's own ring of per-second samples) every
// second while the view is shown, drawn with uPlot (vendored: /dashboard/uplot.min.js).
// A chart is rebuilt only when its set of lines changes (a model or instance comes or
// goes); otherwise its data is swapped in place, so nothing on the page moves.
// The last answer and every chart stay reachable as window.corralCharts, which the
// browser tests read instead of pixels.

import { $, api, bytes, el, errorText, fillSelect, POLL_TIMEOUT_MS, pollError } from "./util.js";

const POLL_MS = 1000;
const HEIGHT = 180;
const PALETTE = ["#2563eb", "#16a34a", "#dc2626", "#d97706", "#7c3aed", "#0891b2",
  "#db2777", "#65a30d", "#9333ea", "#0d9488"];

const state = { timer: null, active: false, charts: {}, last: null, lastKey: "",
  timeoutMs: POLL_TIMEOUT_MS };
window.corralCharts = state;

const perSecond = (v) => v == null ? "–" : (+v).toFixed(v < 10 ? 2 : 0) + "/s";
const secs = (v) => v == null ? "–" : v < 1 ? Math.round(v * 1000) + " ms" : (+v).toFixed(2) + " s";
const count = (v) => v == null ? "–" : String(Math.round(v));
const size = (v) => v === 0 ? "0" : bytes(v);
// Tick steps for charts of whole things (calls waiting, instances): no "0.5 instance".
const WHOLE = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000];
const pct = (v) => v == null ? "–" : Math.round(v * 100) + "%";

// One row per chart: id, title, value format, and the lines it draws from an answer.
const CHARTS = [
  { id: "requests", title: "Requests per second, by model", fmt: perSecond,
    lines: (d) => Object.entries(d.requests).map(([m, v]) => [m, v]) },
  { id: "errors", title: "Errors per second (status ≥ 400), by model", fmt: perSecond,
    lines: (d) => Object.entries(d.errors).map(([m, v]) => [m, v]) },
  { id: "tokens", title: "Tokens per second", fmt: perSecond,
    lines: (d) => [["generated", d.tokens.completion], ["prompt", d.tokens.prompt]] },
  { id: "ttft", sparse: true, title: "Time to first token", fmt: secs,
    lines: (d) => [["p50", d.ttft.p50], ["p95", d.ttft.p95]] },
  { id: "duration", sparse: true, title: "Request duration", fmt: secs,
    lines: (d) => [["p50", d.duration.p50], ["p95", d.duration.p95]] },
  { id: "queue", title: "Queue depth", fmt: count, whole: true,
    lines: (d) => [["waiting", d.queue.depth]] },
  { id: "wait", sparse: true, title: "Queue wait (mean of the calls granted that second)", fmt: secs,
    lines: (d) => [["wait", d.queue.wait]] },
  { id: "instances", title: "Instances by state", fmt: count, whole: true,
    lines: (d) => Object.entries(d.instances).map(([s, v]) => [s, v]) },
  { id: "memory", title: "Memory", fmt: size,
    lines: (d) => {
      const m = d.memory;
      const out = [["RAM used", m.ram_used], ["RAM total", m.ram_total],
        ["instances", m.instances_rss]];
      if (m.budget.some((v) => v)) out.push(["RAM budget", m.budget]);
      if (m.vram_total.some((v) => v)) out.push(["VRAM used", m.vram_used], ["VRAM total", m.vram_total]);
      if (m.vram_budget.some((v) => v)) out.push(["VRAM budget", m.vram_budget]);
      return out;
    } },
  { id: "load", title: "Load per instance (in flight / slots)", fmt: pct,
    lines: (d) => Object.entries(d.load).map(([i, v]) => [i, v]) },
];

// -- appending a poll's new seconds to what the page has ---------------------------
// The first poll of a (model, window) gets the whole window; later ones ask only for
// the seconds after the last one shown (?since=), which costs the server a second's
// work instead of an hour's. Every array in an answer is a column aligned on "t",
// except "models" (names). A line missing from one side was flat: zero for counts,
// a gap (null) for the rest.

const NAMES = new Set(["models"]);
const ZERO = new Set(["requests", "errors", "instances"]);

function blank(n, parent) {
  return new Array(n).fill(ZERO.has(parent) ? 0 : null);
}

function join(a, b, na, nb, key, parent) {
  if (NAMES.has(key)) return [...new Set([...(a || []), ...(b || [])])];
  if (Array.isArray(a) || Array.isArray(b)) return (a || blank(na, parent)).concat(b || blank(nb, parent));
  if ((a && typeof a === "object") || (b && typeof b === "object")) {
    const out = {};
    for (const k of new Set([...Object.keys(a || {}), ...Object.keys(b || {})])) {
      out[k] = join(a && a[k], b && b[k], na, nb, k, key);
    }
    return out;
  }
  return b === undefined ? a : b;
}

function drop(x, k, key, parent) {
  if (NAMES.has(key) || k <= 0) return x;
  if (Array.isArray(x)) return x.slice(k);
  if (x && typeof x === "object") {
    const out = {};
    for (const [kk, v] of Object.entries(x)) {
      const kept = drop(v, k, kk, key);
      // A line that left the window entirely (a stopped instance) leaves the chart.
      const gone = Array.isArray(kept) && (key === "load" || key === "instances") &&
        kept.every((y) => !y);
      if (!gone) out[kk] = kept;
    }
    return out;
  }
  return x;
}

function merge(old, fresh, windowSeconds) {
  const both = join(old, fresh, old.t.length, fresh.t.length, "", "");
  const newest = both.t.length ? both.t[both.t.length - 1] : 0;
  let k = 0;
  while (k < both.t.length && both.t[k] <= newest - windowSeconds) k++;
  return drop(both, k, "", "");
}

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

function options(spec, names, width) {
  const axis = { stroke: cssVar("--muted"), grid: { stroke: cssVar("--line"), width: 1 },
    ticks: { stroke: cssVar("--line"), width: 1 } };
  return {
    width, height: HEIGHT,
    // One cursor for all charts: hovering a second shows every chart's values for it.
    cursor: { drag: { x: false, y: false }, sync: { key: "corral" } },
    legend: { live: true },
    // The x axis always spans the whole window, ending at the newest sample: it does
    // not stretch while the first seconds come in, nor jump when the window fills.
    scales: { x: { time: true, range: (u, min, max) => {
      const end = max == null || Number.isNaN(max) ? Math.floor(Date.now() / 1000) : max;
      return [end - Number($("#chart-window").value), end];
    } },
    // Every figure here is ≥ 0: the y axis starts at 0 and keeps a scale when empty.
    y: { range: (u, min, max) => [0, max == null || Number.isNaN(max) || max <= 0 ? 1 : max * 1.1] } },
    axes: [axis, { ...axis, size: 70, values: (u, vals) => vals.map(spec.fmt),
      ...(spec.whole ? { incrs: WHOLE } : {}) }],
    series: [{}, ...names.map((n, i) => ({
      label: n, stroke: PALETTE[i % PALETTE.length], width: 1.5, spanGaps: false,
      // Quantiles exist only in seconds with calls: a lone second must still show.
      points: spec.sparse ? { show: true, size: 5, fill: PALETTE[i % PALETTE.length] } : {},
      value: (u, v) => spec.fmt(v),
    }))],
  };
}

function box(spec) {
  let node = $("#chart-" + spec.id);
  if (!node) {
    node = el("figure", { id: "chart-" + spec.id, class: "chart", "data-chart": spec.id },
      el("figcaption", {}, el("span", {}, spec.title), el("span", { class: "now muted" })),
      el("div", { class: "plot" }));
    $("#charts").append(node);
  }
  return node;
}

function draw(d) {
  for (const spec of CHARTS) {
    const lines = spec.lines(d);
    const names = lines.map(([n]) => n);
    const data = [d.t, ...lines.map(([, v]) => v)];
    const node = box(spec);
    const plot = $(".plot", node);
    const width = Math.max(240, plot.clientWidth || 400);
    let chart = state.charts[spec.id];
    const key = names.join("\u0000");
    if (!chart || chart.corralKey !== key) {
      if (chart) chart.destroy();
      plot.replaceChildren();
      chart = new uPlot(options(spec, names, width), data, plot);
      chart.corralKey = key;
      state.charts[spec.id] = chart;
    } else {
      chart.setData(data);
    }
    node.dataset.points = String(d.t.length);
    // The latest value of each line as text: readable without a mouse (and by screen
    // readers), where the legend shows values only under the cursor.
    $(".now", node).textContent = lines.length ? "now: " + lines.map(([n, v]) => {
      let last = null;
      for (let i = v.length - 1; i >= 0 && last === null; i--) last = v[i];
      return `${n} ${spec.fmt(last)}`;
    }).join(" · ") : "no data yet";
  }
}

async function refresh() {
  const model = $("#chart-model").value;
  const windowSeconds = $("#chart-window").value;
  const query = new URLSearchParams({ window: windowSeconds });
  if (model) query.set("model", model);
  const key = model + "|" + windowSeconds;
  const old = state.lastKey === key && state.last && state.last.t.length ? state.last : null;
  if (old) query.set("since", String(old.t[old.t.length - 1]));
  try {
    const resp = await api("/admin/timeseries?" + query,
      { signal: AbortSignal.timeout(state.timeoutMs) });
    if (!resp.ok) {
      $("#chart-status").textContent = await errorText(resp);
      return;
    }
    const fresh = await resp.json();
    const d = old ? merge(old, fresh, Number(windowSeconds)) : fresh;
    state.last = d;
    state.lastKey = key;
    if (typeof uPlot === "undefined") {
      $("#chart-status").textContent = "the chart library did not load";
      return;
    }
    draw(d);
    $("#chart-status").textContent = d.t.length
      ? `${d.t.length} s of samples (kept: ${Math.round(d.capacity / 60)} min)` : "no samples yet";
  } catch (e) {
    $("#chart-status").textContent = pollError(e);
  }
}

function loop() {
  if (!state.active) return;
  refresh().finally(() => {
    if (state.active) state.timer = setTimeout(loop, POLL_MS);
  });
}

function resize() {
  for (const [id, chart] of Object.entries(state.charts)) {
    const plot = $("#chart-" + id + " .plot");
    if (plot && plot.clientWidth) chart.setSize({ width: plot.clientWidth, height: HEIGHT });
  }
}

let wired = false;

function wire() {
  if (wired) return;
  wired = true;
  for (const id of ["#chart-model", "#chart-window"]) {
    $(id).addEventListener("change", () => { clearTimeout(state.timer); loop(); });
  }
  new ResizeObserver(() => resize()).observe($("#charts"));
}

export function show() {
  wire();
  if (state.active) return;
  state.active = true;
  loop();
}

export function hide() {
  state.active = false;
  clearTimeout(state.timer);
}

export function overview(o) {
  const names = ["", ...o.models.map((m) => m.name)];
  fillSelect($("#chart-model"), names, { "": "all models" });
}
