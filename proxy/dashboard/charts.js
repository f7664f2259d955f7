// Charts view: GET /admin/timeseries (Corral's own ring of per-second samples) every
// second while the view is shown, drawn with uPlot (vendored: /dashboard/uplot.min.js).
// A chart is rebuilt only when its set of lines changes (a model or instance comes or
// goes); otherwise its data is swapped in place, so nothing on the page moves.
// The last answer and every chart stay reachable as window.corralCharts, which the
// browser tests read instead of pixels.

import { $, api, bytes, el, errorText, fillSelect } from "./util.js";

const POLL_MS = 1000;
const HEIGHT = 180;
const PALETTE = ["#2563eb", "#16a34a", "#dc2626", "#d97706", "#7c3aed", "#0891b2",
  "#db2777", "#65a30d", "#9333ea", "#0d9488"];

const state = { timer: null, active: false, charts: {}, last: null };
window.corralCharts = state;

const perSecond = (v) => v == null ? "–" : (+v).toFixed(v < 10 ? 2 : 0) + "/s";
const secs = (v) => v == null ? "–" : v < 1 ? Math.round(v * 1000) + " ms" : (+v).toFixed(2) + " s";
const count = (v) => v == null ? "–" : String(Math.round(v));
const pct = (v) => v == null ? "–" : Math.round(v * 100) + "%";

// One row per chart: id, title, value format, and the lines it draws from an answer.
const CHARTS = [
  { id: "requests", title: "Requests per second, by model", fmt: perSecond,
    lines: (d) => Object.entries(d.requests).map(([m, v]) => [m, v]) },
  { id: "errors", title: "Errors per second (status ≥ 400), by model", fmt: perSecond,
    lines: (d) => Object.entries(d.errors).map(([m, v]) => [m, v]) },
  { id: "tokens", title: "Tokens per second", fmt: perSecond,
    lines: (d) => [["generated", d.tokens.completion], ["prompt", d.tokens.prompt]] },
  { id: "ttft", title: "Time to first token", fmt: secs,
    lines: (d) => [["p50", d.ttft.p50], ["p95", d.ttft.p95]] },
  { id: "duration", title: "Request duration", fmt: secs,
    lines: (d) => [["p50", d.duration.p50], ["p95", d.duration.p95]] },
  { id: "queue", title: "Queue depth", fmt: count,
    lines: (d) => [["waiting", d.queue.depth]] },
  { id: "wait", title: "Queue wait (mean of the calls granted that second)", fmt: secs,
    lines: (d) => [["wait", d.queue.wait]] },
  { id: "instances", title: "Instances by state", fmt: count,
    lines: (d) => Object.entries(d.instances).map(([s, v]) => [s, v]) },
  { id: "memory", title: "Memory", fmt: bytes,
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

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

function options(spec, names, width) {
  const axis = { stroke: cssVar("--muted"), grid: { stroke: cssVar("--line"), width: 1 },
    ticks: { stroke: cssVar("--line"), width: 1 } };
  return {
    width, height: HEIGHT,
    cursor: { drag: { x: false, y: false } },
    legend: { live: true },
    scales: { x: { time: true } },
    axes: [axis, { ...axis, size: 70, values: (u, vals) => vals.map(spec.fmt) }],
    series: [{}, ...names.map((n, i) => ({
      label: n, stroke: PALETTE[i % PALETTE.length], width: 1.5, spanGaps: false,
      value: (u, v) => spec.fmt(v),
    }))],
  };
}

function box(spec) {
  let node = $("#chart-" + spec.id);
  if (!node) {
    node = el("figure", { id: "chart-" + spec.id, class: "chart", "data-chart": spec.id },
      el("figcaption", {}, spec.title), el("div", { class: "plot" }));
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
  }
}

async function refresh() {
  const model = $("#chart-model").value;
  const windowSeconds = $("#chart-window").value;
  const query = new URLSearchParams({ window: windowSeconds });
  if (model) query.set("model", model);
  try {
    const resp = await api("/admin/timeseries?" + query);
    if (!resp.ok) {
      $("#chart-status").textContent = await errorText(resp);
      return;
    }
    const d = await resp.json();
    state.last = d;
    if (typeof uPlot === "undefined") {
      $("#chart-status").textContent = "the chart library did not load";
      return;
    }
    draw(d);
    $("#chart-status").textContent = d.t.length
      ? `${d.t.length} s of samples (kept: ${Math.round(d.capacity / 60)} min)` : "no samples yet";
  } catch (e) {
    $("#chart-status").textContent = e.message;
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
