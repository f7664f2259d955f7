// Shared by the dashboard's views: DOM building (text only, never HTML), the admin
// API behind the key, number formatting.

const KEY_STORAGE = "corral-api-key";

export const ui = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",
};

export function setKey(key) {
  ui.key = key;
  sessionStorage.setItem(KEY_STORAGE, key);
}

export const $ = (sel, root = document) => root.querySelector(sel);

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v;
    else if (k === "onclick") node.addEventListener("click", v);
    else if (k.startsWith("data-") || k.startsWith("aria-") || k === "role") node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export function authHeaders() {
  return ui.key ? { Authorization: "Bearer " + ui.key } : {};
}

// A poll gives up on an answer after this long and the next one asks again: one
// request lost on the way (a dropped connection, a laptop asleep) must not stop a
// view's updates for good.
export const POLL_TIMEOUT_MS = 10000;

// What a poll failed with, as a line for the page.
export function pollError(e) {
  return e.name === "TimeoutError" ? "Corral did not answer in time; asking again" : e.message;
}

export async function api(path, options = {}) {
  const resp = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (resp.status === 401) {
    $("#key-form").hidden = false;
    throw new Error("API key required");
  }
  return resp;
}

// The message of an error answer in any of the envelopes Corral speaks.
export async function errorText(resp) {
  const text = await resp.text();
  try {
    const body = JSON.parse(text);
    if (typeof body.error === "string") return body.error;
    if (body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON: the text itself */ }
  return text || resp.statusText;
}

export function bytes(n) {
  if (n === null || n === undefined || n === 0) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

export function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return Math.round(s * 1000) + " ms";
  if (s < 120) return s.toFixed(1) + " s";
  return Math.round(s / 60) + " min";
}

export function clock(unix) {
  return new Date(unix * 1000).toLocaleTimeString();
}

// Fill a <select> with options, keeping the current choice when it still exists.
export function fillSelect(select, values, labels = {}) {
  const current = select.value;
  const same = select.options.length === values.length &&
    values.every((v, i) => select.options[i].value === v);
  if (same) return;
  select.replaceChildren(...values.map((v) => el("option", { value: v }, labels[v] ?? v)));
  if (values.includes(current)) select.value = current;
}
