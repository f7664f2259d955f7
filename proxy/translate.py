"""Pure translation between the Ollama API and llama-server's OpenAI-compatible API.

Every mapping of docs/compatibility.md (and of reference/compat.md part C, which
mirrors Ollama's own ``llm/llama_server.go``) lives here as a function without I/O,
so that each one is tested by a table. The handlers in ``ollama.py`` and
``lmstudio.py`` only read requests, call these, and write what they return.

Errors in a client's request raise ``BadRequest`` (400); errors that llama-server
reports are turned into ``CorralError`` values carrying llama-server's status, so the
dialect's error middleware renders both.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import math
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, cast

from scheduler.errors import BadRequest, CorralError, UpstreamFailed

# --- names and times ------------------------------------------------------------------


def tagged(name: str) -> str:
    """The name with an explicit tag, as Ollama lists it: ``x`` -> ``x:latest``.

    Open WebUI appends ``:latest`` to any id without a colon and then looks it up in
    /api/tags, so every listed name must carry a tag. A colon before the last ``/``
    is a registry port, not a tag (``host:5000/x`` -> ``host:5000/x:latest``).
    """
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def name_candidates(name: str) -> list[str]:
    """Configured names a client's model name may mean, most specific first."""
    if name.endswith(":latest"):
        return [name, name.removesuffix(":latest")]
    return [name]


def name_digest(name: str) -> str:
    """A stable 64-hex digest for a model whose file cannot be read yet."""
    return hashlib.sha256(name.encode()).hexdigest()


# ~292 years: Go's largest time.Duration, Ollama's "forever".
MAX_KEEP_ALIVE = 292 * 365 * 86400.0
# The last second datetime can format; later (or NaN) timestamps are clamped to it.
_MAX_TS = 253402300799.0


def rfc3339(ts: float | None = None) -> str:
    """UTC time with at most 6 fractional digits: Python before 3.11 rejects more."""
    ts = time.time() if ts is None else ts
    if not 0.0 <= ts <= _MAX_TS:  # also NaN
        ts = 0.0 if ts < 0 else _MAX_TS
    whole = math.floor(ts)
    micros = min(999_999, round((ts - whole) * 1e6))
    return f"{_second(whole)}.{micros:06d}Z"


@functools.lru_cache(maxsize=4)
def _second(whole: int) -> str:
    # Every streamed line carries a timestamp; formatting each second once keeps
    # strftime out of the per-token path.
    return datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def human_number(n: int) -> str:
    """Ollama's format.HumanNumber: 8B, 7.6B, 137M, 22.57M, 500K, 999."""
    for unit, scale, decimals in (("B", 1e9, 1), ("M", 1e6, 2), ("K", 1e3, 0)):
        if n >= scale:
            value = n / scale
            if unit == "K" or value == math.floor(value):
                return f"{value:.0f}{unit}"
            return f"{value:.{decimals}f}{unit}"
    return str(n)


# --- keep_alive, think, format, options -----------------------------------------------

_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """A Go duration ("5m", "1h30m", "-1m", "300ms", "0") in seconds."""
    s = text.strip()
    sign = -1.0 if s.startswith("-") else 1.0
    body = s.lstrip("+-")
    if body == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(body):
        m = _DURATION_PART.match(body, pos)
        if m is None:
            raise BadRequest(f"time: invalid duration {text!r}")
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not body:
        raise BadRequest(f"time: invalid duration {text!r}")
    return sign * total


def keep_alive_seconds(value: object) -> float | None:
    """Ollama's keep_alive as seconds: None when absent (the model's default), -1 for
    "forever" (any negative), 0 for "unload after this call".

    A number is seconds; a string is a Go duration. A bare numeric string ("300") is
    a 400 in Ollama; it is read as seconds here, since nothing else can be meant.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRequest("keep_alive must be a number or a duration string")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            seconds = parse_duration(value)
    else:
        raise BadRequest("keep_alive must be a number or a duration string")
    if math.isnan(seconds):
        raise BadRequest("keep_alive must be a number or a duration string")
    # Ollama treats a duration beyond what it can represent as forever; so do we,
    # which also keeps expiry timestamps (rfc3339) inside datetime's range.
    return -1.0 if seconds < 0 or seconds > MAX_KEEP_ALIVE else seconds


Think = bool | Literal["low", "medium", "high", "max"]
_THINK_LEVELS = ("low", "medium", "high", "max")


def parse_think(value: object) -> Think | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value in _THINK_LEVELS:
        return cast(Think, value)
    raise BadRequest(
        f"invalid think value: {value!r} (expected true, false, \"low\", \"medium\", "
        "\"high\" or \"max\")"
    )


def template_kwargs(think: Think | None) -> dict[str, Any] | None:
    """chat_template_kwargs for llama-server, exactly as Ollama's own runner sends them."""
    if think is None:
        return None
    if isinstance(think, bool):
        return {"enable_thinking": think}
    return {"enable_thinking": True, "reasoning_effort": think}


def response_format(fmt: object) -> dict[str, Any] | None:
    """Ollama ``format`` -> OpenAI ``response_format`` (the chat path)."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        # Ollama's chat path sends an empty schema too: any JSON value is accepted.
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "schema", "schema": fmt}}
    raise BadRequest(f'invalid format: {fmt!r}; expected "json" or a valid JSON Schema object')


def completion_format(fmt: object) -> dict[str, Any] | None:
    """Ollama ``format`` for /v1/completions (raw prompts), which reads a top-level
    ``json_schema`` but not ``response_format``."""
    rf = response_format(fmt)
    if rf is None:
        return None
    if rf["type"] == "json_object":
        return {"json_schema": {}}
    return {"json_schema": rf["json_schema"]["schema"]}


# Ollama's api.DefaultOptions for the sampler. llama-server's own defaults differ
# (top_p 0.95, min_p 0.05), so every one is sent explicitly for the same behaviour.
OLLAMA_DEFAULTS: Mapping[str, Any] = {
    "num_keep": 4,
    "seed": -1,
    "num_predict": -1,
    "top_k": 40,
    "top_p": 0.9,
    "min_p": 0.0,
    "typical_p": 1.0,
    "repeat_last_n": 64,
    "temperature": 0.8,
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}

# Ollama option -> llama-server field, and the JSON type it must have.
SAMPLER_FIELDS: Mapping[str, tuple[str, type]] = {
    "num_keep": ("n_keep", int),
    "seed": ("seed", int),
    "num_predict": ("n_predict", int),
    "top_k": ("top_k", int),
    "top_p": ("top_p", float),
    "min_p": ("min_p", float),
    "typical_p": ("typical_p", float),
    "repeat_last_n": ("repeat_last_n", int),
    "temperature": ("temperature", float),
    "repeat_penalty": ("repeat_penalty", float),
    "presence_penalty": ("presence_penalty", float),
    "frequency_penalty": ("frequency_penalty", float),
    "mirostat": ("mirostat", int),
    "mirostat_tau": ("mirostat_tau", float),
    "mirostat_eta": ("mirostat_eta", float),
}

# Accepted and ignored. Load-time options would need a restart with other flags; a
# shared instance cannot change per call (set ctx_size, n_gpu_layers, threads in the
# model's config instead). The rest are legacy keys old clients still send.
IGNORED_OPTIONS = frozenset({
    "num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread",
    "draft_num_predict", "numa", "low_vram", "f16_kv", "logits_all", "vocab_only",
    "use_mlock", "embedding_only", "tfs_z", "penalize_newline",
})


def _number(key: str, value: object, kind: type) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"option {key!r} must be a number, not {json.dumps(value)}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise BadRequest(f"option {key!r} must be an integer, not {value}")
        return int(value)
    return float(value)


def sampler_params(options: object) -> dict[str, Any]:
    """Ollama ``options`` merged over Ollama's defaults, as llama-server fields."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise BadRequest("options must be an object")
    # null means "the default" (some clients send every key of their Options type).
    merged = {**OLLAMA_DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    out: dict[str, Any] = {}
    for key, value in merged.items():
        if key in IGNORED_OPTIONS:
            continue
        if key == "stop":
            stops = [value] if isinstance(value, str) else value
            if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
                raise BadRequest("option 'stop' must be a string or a list of strings")
            if stops:
                out["stop"] = stops
            continue
        spec = SAMPLER_FIELDS.get(key)
        if spec is None:
            continue  # unknown keys are ignored, as Ollama does (it logs them)
        target, kind = spec
        number = _number(key, value, kind)
        if key == "seed" and number < 0:
            continue  # "random": llama-server's own default; -1 would wrap to 2**32-1
        out[target] = number
    return out


# --- messages -------------------------------------------------------------------------

_IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


def image_url(data: object) -> str:
    """An Ollama image (bare base64) as the data URL llama-server reads."""
    if not isinstance(data, str) or not data:
        raise BadRequest("images must be base64-encoded strings")
    # Some clients already send a data URL; keep only the payload.
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    head = data[:32]
    try:
        raw = base64.b64decode(head + "=" * (-len(head) % 4))
    except (binascii.Error, ValueError):
        raise BadRequest("images must be base64-encoded strings") from None
    mime = "image/jpeg"  # Ollama's fallback too
    for magic, kind in _IMAGE_MAGIC:
        if raw.startswith(magic):
            mime = kind
            break
    else:
        if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
            mime = "image/webp"
    return f"data:{mime};base64,{data}"


def _content(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if not isinstance(content, str):
        raise BadRequest("message content must be a string")
    return content


def _call_arguments(arguments: object) -> str:
    # OpenAI wants a JSON string; Ollama sends an object. A string is kept as sent.
    if arguments is None:
        return "{}"
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, separators=(",", ":"))


def openai_messages(messages: object) -> list[dict[str, Any]]:
    """Ollama chat messages -> OpenAI messages for llama-server.

    Images become content parts with data URLs; assistant tool calls get string
    arguments; tool results get a ``tool_call_id`` (synthesised when missing, paired
    with the preceding assistant's calls by name, then in order) because some chat
    templates need one. ``thinking`` on history messages is dropped.
    """
    if not isinstance(messages, list):
        raise BadRequest("messages must be a list")
    out: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []  # (id, name) of calls not yet answered
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest("each message must be an object")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise BadRequest("each message needs a 'role'")
        role = role.lower()
        content = _content(message)
        msg: dict[str, Any] = {"role": role, "content": content}
        images = message.get("images")
        if images:
            if not isinstance(images, list):
                raise BadRequest("images must be a list of base64 strings")
            parts: list[dict[str, Any]] = [{"type": "text", "text": content}] if content else []
            parts += [{"type": "image_url", "image_url": {"url": image_url(im)}} for im in images]
            msg["content"] = parts
        calls = message.get("tool_calls")
        if role == "assistant" and calls:
            if not isinstance(calls, list):
                raise BadRequest("tool_calls must be a list")
            msg["tool_calls"] = []
            for k, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise BadRequest("each tool call needs function.name")
                call_id = call.get("id") or f"call_{i}_{k}"
                index = fn.get("index", k)
                msg["tool_calls"].append({
                    "id": call_id,
                    "type": "function",
                    "index": index if isinstance(index, int) else k,
                    "function": {
                        "name": fn["name"],
                        "arguments": _call_arguments(fn.get("arguments")),
                    },
                })
                pending.append((call_id, fn["name"]))
        if role == "tool":
            name = message.get("tool_name") or message.get("name")
            call_id = message.get("tool_call_id")
            if not call_id:
                match = next((p for p in pending if p[1] == name), pending[0] if pending else None)
                call_id = match[0] if match else f"call_{i}"
            pending = [p for p in pending if p[0] != call_id]
            msg["tool_call_id"] = call_id
            if isinstance(name, str) and name:
                msg["name"] = name
        out.append(msg)
    return out


def _tools(tools: object) -> list[Any] | None:
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise BadRequest("tools must be a list")
    return tools


def _logprobs(req: Mapping[str, Any]) -> dict[str, Any]:
    top = req.get("top_logprobs")
    valid = isinstance(top, int) and not isinstance(top, bool) and 0 <= top <= 20
    if top is not None and not valid:
        raise BadRequest("top_logprobs must be between 0 and 20")
    if not req.get("logprobs") and not top:
        return {}
    out: dict[str, Any] = {"logprobs": True}
    if top:
        out["top_logprobs"] = top
    return out


def _common(req: Mapping[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "stream": True,  # always: one loop serves streamed and whole answers
        "stream_options": {"include_usage": True},
        "cache_prompt": True,
        **sampler_params(req.get("options")),
        **_logprobs(req),
    }
    if body.get("n_predict", -1) >= 0:
        # llama-server reads n_predict first; a remote vLLM/SGLang/Ollama upstream only
        # knows max_tokens and would otherwise generate without a limit.
        body["max_tokens"] = body["n_predict"]
    kwargs = template_kwargs(parse_think(req.get("think")))
    if kwargs is not None:
        body["chat_template_kwargs"] = kwargs
    return body


def chat_body(req: Mapping[str, Any], model: str) -> dict[str, Any]:
    """An Ollama /api/chat request -> llama-server /v1/chat/completions body."""
    body = {"model": model, "messages": openai_messages(req.get("messages")), **_common(req)}
    tools = _tools(req.get("tools"))
    if tools is not None:
        body["tools"] = tools
    rf = response_format(req.get("format"))
    if rf is not None:
        body["response_format"] = rf
    return body


def generate_call(req: Mapping[str, Any], model: str) -> tuple[str, dict[str, Any]]:
    """An Ollama /api/generate request -> (llama-server path, body).

    ``raw`` prompts go to /v1/completions untouched; ``suffix`` (fill-in-the-middle)
    goes to /infill; anything else becomes a chat with an optional system message,
    so that llama-server applies the model's template. ``template`` (a Go template)
    cannot be honoured and ``context`` is deprecated: both are ignored.
    """
    prompt = req.get("prompt") or ""
    system = req.get("system")
    if not isinstance(prompt, str) or (system is not None and not isinstance(system, str)):
        raise BadRequest("prompt and system must be strings")
    images = req.get("images") or []
    if req.get("raw"):
        if req.get("template") or system or req.get("context"):
            raise BadRequest("raw mode does not support template, system, or context")
        if images:
            raise BadRequest("raw mode does not support images on this server")
        body = {"model": model, "prompt": prompt, **_common(req)}
        body.pop("chat_template_kwargs", None)
        body.update(completion_format(req.get("format")) or {})
        return "/v1/completions", body
    suffix = req.get("suffix")
    if suffix:
        if not isinstance(suffix, str):
            raise BadRequest("suffix must be a string")
        body = {"model": model, "input_prefix": prompt, "input_suffix": suffix, **_common(req)}
        body.pop("stream_options")
        body.pop("chat_template_kwargs", None)
        return "/infill", body
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt, "images": images})
    return "/v1/chat/completions", chat_body({**req, "messages": messages, "tools": None}, model)


# --- embeddings -----------------------------------------------------------------------


def embed_inputs(value: object) -> list[str]:
    """/api/embed ``input``: a string or a list of strings."""
    if value is None or value == "":
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise BadRequest("invalid input type")
    return items


def truncate_dims(vector: Sequence[float], dimensions: int | None) -> list[float]:
    """Ollama's ``dimensions``: keep the first n values and re-normalise (L2)."""
    if dimensions is None or dimensions >= len(vector):
        return list(vector)
    if dimensions < 1:
        raise BadRequest("dimensions must be a positive integer")
    head = list(vector[:dimensions])
    norm = math.sqrt(sum(x * x for x in head))
    return [x / norm for x in head] if norm > 0 else head


def embeddings_of(body: Mapping[str, Any]) -> tuple[list[list[float]], int]:
    """Vectors (in input order) and prompt tokens from a /v1/embeddings answer."""
    data = body.get("data")
    if not isinstance(data, list):
        raise UpstreamFailed("llama-server answered /v1/embeddings without 'data'")
    ordered = sorted(data, key=lambda d: d.get("index", 0) if isinstance(d, dict) else 0)
    vectors = [d["embedding"] for d in ordered if isinstance(d, dict) and "embedding" in d]
    usage = body.get("usage")
    tokens = usage.get("prompt_tokens", 0) if isinstance(usage, dict) else 0
    return vectors, tokens if isinstance(tokens, int) else 0


# --- errors from llama-server ---------------------------------------------------------


def upstream_error(payload: object, status: int = 502) -> CorralError:
    """llama-server's ``{"error": {"code", "message", "type"}}`` (or a bare string) as
    a CorralError with llama-server's status, so the client sees its 4xx as a 4xx."""
    err = payload.get("error", payload) if isinstance(payload, dict) else payload
    if isinstance(err, dict):
        message = str(err.get("message") or err)
        code = err.get("code")
        if isinstance(code, int) and 400 <= code < 600:
            status = code
    else:
        message = str(err)
    if status == 404:
        # A missing route upstream (an old build, a remote without /infill) is the
        # gateway's failure. Passed on as 404 it would read as "model not found",
        # which several clients answer by trying to pull the model.
        status = 502
    out = CorralError(message)
    out.status = status
    out.code = "upstream_error"
    out.type = "invalid_request_error" if status < 500 else "upstream_error"
    return out


def upstream_error_body(status: int, raw: bytes) -> CorralError:
    try:
        payload: object = json.loads(raw)
    except ValueError:
        payload = raw.decode("utf-8", "replace").strip() or f"llama-server answered {status}"
    return upstream_error(payload, status)


# --- metrics --------------------------------------------------------------------------


def _num(d: Mapping[str, Any] | None, key: str) -> float:
    value = d.get(key) if d else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def durations(
    timings: Mapping[str, Any] | None, usage: Mapping[str, Any] | None
) -> dict[str, int]:
    """llama-server timings/usage -> Ollama's counts and integer nanoseconds.

    Zero values are left out, as Go's omitempty does. eval_duration stays >= 1 ns
    whenever tokens were generated: clients divide by it for tokens per second.
    """
    if timings:
        prompt_count = int(_num(timings, "cache_n") + _num(timings, "prompt_n"))
        eval_count = int(_num(timings, "predicted_n"))
    else:
        prompt_count = int(_num(usage, "prompt_tokens"))
        eval_count = int(_num(usage, "completion_tokens"))
    out = {
        "prompt_eval_count": prompt_count,
        "prompt_eval_duration": round(_num(timings, "prompt_ms") * 1e6),
        "eval_count": eval_count,
        "eval_duration": round(_num(timings, "predicted_ms") * 1e6),
    }
    if eval_count > 0:
        out["eval_duration"] = max(1, out["eval_duration"])
    return {k: v for k, v in out.items() if v}


def done_reason(finish_reason: str | None) -> str:
    # "tool_calls" is "stop" in Ollama: the model stopped to let the client call.
    return "length" if finish_reason == "length" else "stop"


# llama-server's native stop_type, and OpenAI finish_reason, -> LM Studio stop_reason.
_STOP_REASONS = {
    "eos": "eosFound",
    "word": "stopStringFound",
    "limit": "maxPredictedTokensReached",
    "length": "maxPredictedTokensReached",
    "tool_calls": "toolCalls",
    "stop": "eosFound",
}


def lmstudio_stop_reason(finish_reason: str | None, stop_type: str | None = None) -> str:
    """OpenAI's "stop" does not say whether an EOS token or a stop string ended the
    answer; the native ``stop_type`` does, and wins when it is known."""
    for key in (stop_type, finish_reason):
        if key is not None and key in _STOP_REASONS:
            return _STOP_REASONS[key]
    return "eosFound"


def lmstudio_stats(
    timings: Mapping[str, Any] | None, finish_reason: str | None, stop_type: str | None = None
) -> dict[str, Any]:
    """LM Studio's /api/v0 ``stats`` from llama-server's timings."""
    return {
        "tokens_per_second": _num(timings, "predicted_per_second"),
        "time_to_first_token": _num(timings, "prompt_ms") / 1000.0,
        "generation_time": _num(timings, "predicted_ms") / 1000.0,
        "stop_reason": lmstudio_stop_reason(finish_reason, stop_type),
    }


# --- llama-server SSE -> Ollama lines -------------------------------------------------


def probe_line(kind: str, model: str, reason: str) -> dict[str, Any]:
    """The answer to a load/unload probe (empty messages or prompt)."""
    line: dict[str, Any] = {"model": model, "created_at": rfc3339()}
    if kind == "chat":
        line["message"] = {"role": "assistant", "content": ""}
    else:
        line["response"] = ""
    line.update({"done": True, "done_reason": reason})
    return line


@dataclass
class _ToolCall:
    id: str = ""
    name: str = ""
    arguments: str = ""


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


@dataclass
class OllamaStream:
    """Turns llama-server stream events into Ollama chat or generate lines.

    Feed every event (OpenAI chat or completion chunks, or native /infill events);
    ``feed`` returns a line to send, or None. Usage and timings are stashed from any
    chunk, since they ride on the last one, which may have no choices. Tool-call
    fragments are accumulated by index and sent whole at the end (Ollama's arguments
    are objects, which cannot be streamed in pieces). ``tail`` gives the closing
    lines; ``whole`` the single object of a non-streamed answer.
    """

    kind: Literal["chat", "generate"]
    model: str
    # False: the client asked for no reasoning; drop any that still arrives.
    show_thinking: bool = True
    now: Callable[[], str] = rfc3339
    content: list[str] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    calls: dict[int, _ToolCall] = field(default_factory=dict)
    finish_reason: str | None = None
    stop_type: str | None = None
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def feed(self, event: Mapping[str, Any]) -> dict[str, Any] | None:
        if "error" in event:
            raise upstream_error(event)
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        if isinstance(event.get("timings"), dict):
            self.timings = event["timings"]
        choices = event.get("choices")
        if isinstance(choices, list):
            if not choices or not isinstance(choices[0], dict):
                return None
            choice = choices[0]
            delta = choice.get("delta")
            if isinstance(delta, dict):
                text = _text(delta.get("content"))
                thought = _text(delta.get("reasoning_content") or delta.get("reasoning"))
                self._tool_fragments(delta.get("tool_calls"))
            else:
                text, thought = _text(choice.get("text")), ""
            lp = choice.get("logprobs")
            tokens = lp.get("content") if isinstance(lp, dict) else None
            if isinstance(choice.get("finish_reason"), str):
                self.finish_reason = choice["finish_reason"]
        else:  # native /infill event
            text, thought, tokens = _text(event.get("content")), "", None
            if event.get("stop"):
                self.stop_type = _text(event.get("stop_type")) or None
                self.finish_reason = "length" if self.stop_type == "limit" else "stop"
        if not self.show_thinking:
            thought = ""
        if not (text or thought or tokens):
            return None
        self.content.append(text)
        if thought:
            self.thinking.append(thought)
        line = self._line(text, thought)
        if isinstance(tokens, list) and tokens:
            self.logprobs.extend(tokens)
            line["logprobs"] = tokens
        return line

    def _tool_fragments(self, fragments: object) -> None:
        if not isinstance(fragments, list):
            return
        for k, frag in enumerate(fragments):
            if not isinstance(frag, dict):
                continue
            index = frag.get("index", k)
            call = self.calls.setdefault(index if isinstance(index, int) else k, _ToolCall())
            call.id += _text(frag.get("id"))
            fn = frag.get("function")
            if isinstance(fn, dict):
                call.name = call.name or _text(fn.get("name"))
                call.arguments += _text(fn.get("arguments"))

    def _line(self, text: str, thought: str, done: bool = False) -> dict[str, Any]:
        line: dict[str, Any] = {"model": self.model, "created_at": self.now()}
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thought:
                message["thinking"] = thought
            line["message"] = message
        else:
            line["response"] = text
            if thought:
                line["thinking"] = thought
        line["done"] = done
        return line

    def tool_calls(self) -> list[dict[str, Any]]:
        """The accumulated calls with object arguments, in index order."""
        out = []
        for index in sorted(self.calls):
            call = self.calls[index]
            try:
                arguments = json.loads(call.arguments) if call.arguments.strip() else {}
            except ValueError:
                arguments = None
            if not isinstance(arguments, dict):
                raise UpstreamFailed(
                    f"the model produced invalid arguments for tool {call.name!r}: "
                    f"{call.arguments[:200]!r}"
                )
            out.append({
                "id": call.id or f"call_{secrets.token_hex(4)}",
                "function": {"index": index, "name": call.name, "arguments": arguments},
            })
        return out

    def _done(self, line: dict[str, Any], total_ns: int, load_ns: int) -> dict[str, Any]:
        line["done"] = True
        line["done_reason"] = done_reason(self.finish_reason)
        metrics = {"total_duration": max(1, total_ns), "load_duration": load_ns,
                   **durations(self.timings, self.usage)}
        line.update({k: v for k, v in metrics.items() if v})
        return line

    def _check_finished(self) -> None:
        if not self.finished:
            raise UpstreamFailed("llama-server ended the stream before the answer was finished")

    def tail(self, total_ns: int, load_ns: int) -> list[dict[str, Any]]:
        """The closing lines: the tool calls (if any), then the done line."""
        self._check_finished()
        out = []
        calls = self.tool_calls() if self.kind == "chat" else []
        if calls:
            line = self._line("", "")
            line["message"]["tool_calls"] = calls
            out.append(line)
        out.append(self._done(self._line("", ""), total_ns, load_ns))
        return out

    def whole(self, total_ns: int, load_ns: int) -> dict[str, Any]:
        """The one object answering a request with ``stream: false``."""
        self._check_finished()
        line = self._line("".join(self.content), "".join(self.thinking))
        calls = self.tool_calls() if self.kind == "chat" else []
        if calls:
            line["message"]["tool_calls"] = calls
        if self.logprobs:
            line["logprobs"] = self.logprobs
        return self._done(line, total_ns, load_ns)
