"""Pure translation between the Ollama API and llama-server's OpenAI-compatible API:
the pieces every translating path shares.

Names and times, keep_alive, think, format and sampling options, embeddings, and
llama-server's errors. Request bodies are built in ``ollama_request.py``, streamed
answers turned into lines in ``stream_translate.py``; each mapping of
docs/compatibility.md (and of reference/compat.md part C, which mirrors Ollama's own
``llm/llama_server.go``) is a function without I/O, tested by a table. The handlers in
``ollama.py`` and ``lmstudio.py`` only read requests, call these, and write what they
return.

Errors in a client's request raise ``BadRequest`` (400); errors that llama-server
reports are turned into ``CorralError`` values carrying llama-server's status, so the
dialect's error middleware renders both.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, cast

from proxy.edge.errors import UPSTREAM_CODE
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
    if isinstance(value, int) and abs(value) > MAX_KEEP_ALIVE:
        # float() of a 400-digit integer raises OverflowError (it was a 500 on every
        # Ollama route); beyond the limit it is forever whatever its size.
        seconds = math.inf if value > 0 else -math.inf
    elif isinstance(value, int | float):
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

# Accepted and ignored here. num_ctx is a lease hint (num_ctx() below): a call gets an
# instance with that much context. Other load-time options would need a restart with
# other flags, and a shared instance cannot change per call (set n_gpu_layers, threads
# in the model's config instead). The rest are legacy keys old clients still send.
IGNORED_OPTIONS = frozenset({
    "num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread",
    "draft_num_predict", "numa", "low_vram", "f16_kv", "logits_all", "vocab_only",
    "use_mlock", "embedding_only", "tfs_z", "penalize_newline",
})


# Ollama's integer options are Go int64s.
_INT64 = (-(2**63), 2**63 - 1)


def _number(key: str, value: object, kind: type) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"option {key!r} must be a number, not {json.dumps(value)}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise BadRequest(f"option {key!r} must be an integer, not {value}")
        if not _INT64[0] <= value <= _INT64[1]:
            raise BadRequest(f"option {key!r} is out of range (a 64-bit integer)")
        return int(value)
    try:
        return float(value)
    except OverflowError:  # an integer with hundreds of digits
        raise BadRequest(f"option {key!r} is out of range") from None


def num_ctx(options: object) -> int:
    """The context an Ollama call asks for (``options.num_ctx``); 0: none."""
    value = options.get("num_ctx") if isinstance(options, dict) else None
    if value is None:
        return 0
    return max(0, int(_number("num_ctx", value, int)))


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
    out.code = UPSTREAM_CODE
    out.type = "invalid_request_error" if status < 500 else "upstream_error"
    return out


def upstream_error_body(status: int, raw: bytes) -> CorralError:
    try:
        payload: object = json.loads(raw)
    except (ValueError, RecursionError):
        payload = raw.decode("utf-8", "replace").strip() or f"llama-server answered {status}"
    return upstream_error(payload, status)


