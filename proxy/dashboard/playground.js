// Playground: one message to any listed model (loaded or not; the first call loads
// it) in one of four API families, streamed. Shows the exact request body and the
// stream as it arrived, time to first token and tokens per second. Stop aborts the
// fetch: Corral sees the client go, cancels the upstream call and frees the slot.
// Ollama's chat is reached under /admin/ollama/ on this port (same origin, same key).

import { $, api, errorText, fillSelect } from "./util.js";

const state = { abort: null, models: [], catalogAt: 0, image: null };
window.corralPlayground = state;

// Per family: where it goes, the body, how to read text (and a token count) from it.
const FAMILIES = {
  openai: {
    path: "/v1/chat/completions", sse: true,
    body: (model, content, max) => ({ model, stream: true, max_tokens: max,
      stream_options: { include_usage: true }, messages: [{ role: "user", content }] }),
    image: (text, img) => [{ type: "text", text }, { type: "image_url", image_url: { url: img.url } }],
    read: (ev) => {
      const j = ev.json;
      if (!j) return {};
      const delta = j.choices && j.choices[0] && j.choices[0].delta;
      return { text: delta ? (delta.content || "") : "", tokens: j.usage && j.usage.completion_tokens };
    },
  },
  responses: {
    path: "/v1/responses", sse: true,
    body: (model, content, max) => ({ model, stream: true, max_output_tokens: max,
      input: [{ role: "user", content }] }),
    image: (text, img) => [{ type: "input_text", text }, { type: "input_image", image_url: img.url }],
    read: (ev) => {
      const j = ev.json;
      if (!j) return {};
      if (j.type === "response.output_text.delta") return { text: j.delta || "" };
      if (j.type === "response.completed" && j.response && j.response.usage) {
        return { tokens: j.response.usage.output_tokens };
      }
      return {};
    },
  },
  anthropic: {
    path: "/v1/messages", sse: true,
    headers: { "anthropic-version": "2023-06-01" },
    body: (model, content, max) => ({ model, stream: true, max_tokens: max,
      messages: [{ role: "user", content }] }),
    image: (text, img) => [{ type: "image", source: { type: "base64", media_type: img.type, data: img.b64 } },
      { type: "text", text }],
    read: (ev) => {
      const j = ev.json;
      if (!j) return {};
      if (j.type === "content_block_delta" && j.delta) return { text: j.delta.text || "" };
      if (j.type === "message_delta" && j.usage) return { tokens: j.usage.output_tokens };
      return {};
    },
  },
  ollama: {
    path: "/admin/ollama/api/chat", sse: false,
    body: (model, content, max) => ({ model, stream: true, options: { num_predict: max },
      messages: [typeof content === "string" ? { role: "user", content }
        : { role: "user", content: content.text, images: [content.b64] }] }),
    image: (text, img) => ({ text, b64: img.b64 }),
    read: (ev) => {
      const j = ev.json;
      if (!j) return {};
      return { text: (j.message && j.message.content) || "", tokens: j.done ? j.eval_count : undefined };
    },
  },
};

// Yields {json, raw} per SSE event (data lines) or NDJSON line.
async function* events(resp, sse) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (value) {
      const chunk = decoder.decode(value, { stream: true });
      $("#pg-response").append(chunk);
      buffer += chunk;
    }
    const sep = sse ? /\r?\n\r?\n/ : /\r?\n/;
    const parts = buffer.split(sep);
    buffer = done ? "" : parts.pop();
    for (const part of parts) {
      const text = sse
        ? part.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n")
        : part.trim();
      if (!text || text === "[DONE]") continue;
      let json = null;
      try { json = JSON.parse(text); } catch (e) { /* a comment or a partial line */ }
      yield { json, raw: text };
    }
    if (done) return;
  }
}

function setStats(start, first, tokens, deltas, end) {
  const now = end || performance.now();
  $("#pg-ttft").textContent = first ? Math.round(first - start) + " ms" : "–";
  const n = tokens || deltas;
  $("#pg-tokens").textContent = n ? String(n) + (tokens ? "" : " (chunks)") : "–";
  const genSeconds = first ? (now - first) / 1000 : 0;
  $("#pg-tps").textContent = first && n > 1 && genSeconds > 0 ? (n / genSeconds).toFixed(1) : "–";
  $("#pg-total").textContent = Math.round(now - start) + " ms";
}

async function send() {
  const model = $("#pg-model").value;
  const family = FAMILIES[$("#pg-family").value];
  const prompt = $("#pg-prompt").value;
  const max = Math.max(1, Math.min(8192, parseInt($("#pg-max").value, 10) || 128));
  if (!model) return;
  const content = state.image && !$("#pg-image").disabled ? family.image(prompt, state.image) : prompt;
  const body = family.body(model, content, max);
  const shown = JSON.stringify(body, (k, v) =>
    typeof v === "string" && v.length > 200 && (k === "url" || k === "data" || k === "image_url" || k === "b64" || k === "0")
      ? v.slice(0, 60) + `… (${v.length} characters)` : v, 2);
  $("#pg-request").textContent = `POST ${family.path}\n\n${shown}`;
  $("#pg-response").textContent = "";
  $("#pg-output").textContent = "";
  $("#pg-state").textContent = "sending…";
  const abort = new AbortController();
  state.abort = abort;
  $("#pg-send").disabled = true;
  $("#pg-stop").disabled = false;
  const start = performance.now();
  let first = 0, tokens = 0, deltas = 0;
  try {
    const resp = await api(family.path, {
      method: "POST", signal: abort.signal,
      headers: { "Content-Type": "application/json", ...(family.headers || {}) },
      body: JSON.stringify(body),
    });
    const heads = [...resp.headers].map(([k, v]) => `${k}: ${v}`).join("\n");
    $("#pg-response").textContent = `HTTP ${resp.status}\n${heads}\n\n`;
    if (!resp.ok) {
      $("#pg-state").textContent = "error: " + await errorText(resp);
      return;
    }
    $("#pg-state").textContent = "streaming…";
    for await (const ev of events(resp, family.sse)) {
      if (ev.json && ev.json.error) {
        const e = ev.json.error;
        $("#pg-state").textContent = "error: " + (typeof e === "string" ? e : e.message);
        continue;
      }
      const got = family.read(ev);
      if (got.text) {
        if (!first) first = performance.now();
        deltas++;
        $("#pg-output").append(got.text);
      }
      if (got.tokens) tokens = got.tokens;
      setStats(start, first, tokens, deltas);
    }
    setStats(start, first, tokens, deltas, performance.now());
    $("#pg-state").textContent = "done";
  } catch (e) {
    $("#pg-state").textContent = e.name === "AbortError" ? "stopped" : "error: " + e.message;
    setStats(start, first, tokens, deltas, performance.now());
  } finally {
    state.abort = null;
    $("#pg-send").disabled = false;
    $("#pg-stop").disabled = true;
  }
}

function stop() {
  if (state.abort) state.abort.abort();
}

function readImage(file) {
  state.image = null;
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    const url = String(reader.result);
    state.image = { url, b64: url.slice(url.indexOf(",") + 1), type: file.type || "image/png", name: file.name };
  };
  reader.readAsDataURL(file);
}

function visionOnly() {
  const m = state.models.find((x) => x.name === $("#pg-model").value);
  const vision = !!(m && m.capabilities.includes("vision"));
  $("#pg-image").disabled = !vision;
  $("#pg-image-label").title = vision ? "" : "the picked model does not take images";
}

async function loadModels() {
  try {
    const resp = await api("/admin/catalog");
    if (!resp.ok) return;
    state.models = (await resp.json()).models;
    state.catalogAt = Date.now();
    const chat = state.models.filter((m) => m.capabilities.includes("chat") ||
      m.capabilities.includes("completion"));
    fillSelect($("#pg-model"), chat.map((m) => m.name),
      Object.fromEntries(chat.map((m) => [m.name, `${m.name} (${m.state})`])));
    visionOnly();
  } catch (e) {
    $("#pg-state").textContent = e.message;
  }
}

let wired = false;

export function show() {
  if (!wired) {
    wired = true;
    $("#pg-send").addEventListener("click", send);
    $("#pg-stop").addEventListener("click", stop);
    $("#pg-model").addEventListener("change", visionOnly);
    $("#pg-image").addEventListener("change", (ev) => readImage(ev.target.files[0]));
    $("#pg-form").addEventListener("submit", (ev) => { ev.preventDefault(); send(); });
    // Ctrl/Cmd+Enter in the message sends it.
    $("#pg-prompt").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); send(); }
    });
  }
  loadModels();
}

export function hide() {}

export function overview(o) {
  if ($("#view-playground").hidden) return;
  // A model added by a reload shows up here without reopening the view.
  const known = new Set(state.models.map((m) => m.name));
  if (o.models.some((m) => !known.has(m.name))) { loadModels(); return; }
  const live = Object.fromEntries(o.models.map((m) => [m.name, m.state]));
  for (const opt of $("#pg-model").options) {
    const label = `${opt.value} (${live[opt.value] || "gone"})`;
    if (opt.textContent !== label) opt.textContent = label;
  }
}
