"""A capture as the admin API shows it, and its curl command. Pure: no I/O.

The answer is kept as the upstream sent it; a streamed one is assembled here, when
an operator looks, not while the call runs: the text and reasoning of OpenAI chat
and completions chunks (llama-server's own ``/completion`` too), Anthropic Messages
deltas and Responses text deltas. Token counts are read off the answer the same way.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

import msgspec

from proxy.calls.capture import REDACTED, Record

_decode = msgspec.json.Decoder().decode
_TOKENS = re.compile(
    rb'"(prompt_tokens|completion_tokens|prompt_n|predicted_n|input_tokens|output_tokens)"'
    rb'\s*:\s*(\d+)')
# Request headers a replayed or exported call needs besides its body.
_KEPT_HEADERS = ("content-type", "anthropic-version", "anthropic-beta", "x-corral-loading")


def text(data: bytes, cut: int) -> str:
    out = data.decode("utf-8", "replace")
    return out + f"\n…[{cut} more bytes not kept]" if cut else out


def _events(body: bytes) -> list[Any]:
    """The JSON objects of an SSE stream (``data:`` lines) or of NDJSON lines."""
    out = []
    for line in body.split(b"\n"):
        line = line.strip()
        if line.startswith(b"data:"):
            line = line[5:].strip()
        if not line.startswith(b"{"):
            continue
        try:
            out.append(_decode(line))
        except (msgspec.DecodeError, RecursionError):
            continue
    return out


def assemble(content_type: str, body: bytes) -> dict[str, str] | None:
    """A streamed answer's text and reasoning, joined; None for an answer in one piece."""
    if content_type not in ("text/event-stream", "application/x-ndjson"):
        return None
    said: list[str] = []
    thought: list[str] = []
    for ev in _events(body):
        if not isinstance(ev, dict):
            continue
        for choice in ev.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") or {}
            if isinstance(delta, dict):
                said.append(str(delta.get("content") or ""))
                thought.append(str(delta.get("reasoning_content") or ""))
            said.append(str(choice.get("text") or ""))
        kind = ev.get("type")
        if kind == "content_block_delta" and isinstance(ev.get("delta"), dict):
            said.append(str(ev["delta"].get("text") or ""))
            thought.append(str(ev["delta"].get("thinking") or ""))
        elif kind == "response.output_text.delta":
            said.append(str(ev.get("delta") or ""))
        elif kind is None and isinstance(ev.get("content"), str):
            said.append(ev["content"])  # llama-server's /completion stream
    return {"text": "".join(said), "reasoning": "".join(thought)}


def tokens(body: bytes) -> dict[str, int]:
    """Prompt and completion tokens the answer reports (the last figure of each wins)."""
    found: dict[bytes, int] = {}
    for m in _TOKENS.finditer(body):
        found[m.group(1)] = int(m.group(2))
    prompt = found.get(b"prompt_tokens", found.get(b"prompt_n", found.get(b"input_tokens")))
    done = found.get(b"completion_tokens",
                     found.get(b"predicted_n", found.get(b"output_tokens")))
    return {k: v for k, v in (("prompt", prompt), ("completion", done)) if v is not None}


def render(rec: Record) -> dict[str, Any]:
    answer = bytes(rec.answer)
    return {
        **rec.summary(),
        "error": rec.error,
        "request": {**{k: rec.meta.get(k) for k in ("method", "url_path", "query", "host",
                                                    "headers")},
                    "body": text(rec.received, rec.received_cut),
                    "body_cut_bytes": rec.received_cut},
        "upstream": {**rec.upstream, "path": rec.sent_path,
                     "body": text(rec.sent, rec.sent_cut), "body_cut_bytes": rec.sent_cut},
        "answer": {"status": rec.status, "content_type": rec.content_type,
                   "body": text(answer, rec.answer_cut), "body_cut_bytes": rec.answer_cut,
                   "assembled": assemble(rec.content_type, answer)},
        "timings": rec.timings(),
        "tokens": tokens(answer[-8192:]),
        "tools": list(rec.tools or ()),
    }


def curl(view: dict[str, Any]) -> str:
    """The captured call as a shell command: the caller's key as ``$CORRAL_API_KEY``
    (never the key itself), other secret headers left out."""
    req = view.get("request") or {}
    host = str(req.get("host") or "127.0.0.1:8080")
    url = f"http://{host}{req.get('url_path') or view.get('path')}"
    if req.get("query"):
        url += "?" + str(req["query"])
    parts = ["curl", "-sS", "-X", str(req.get("method") or "POST"), shlex.quote(url),
             '-H "Authorization: Bearer $CORRAL_API_KEY"']
    for name, value in req.get("headers") or ():
        if str(name).lower() in _KEPT_HEADERS and value != REDACTED:
            parts.append("-H " + shlex.quote(f"{name}: {value}"))
    body = str(req.get("body") or "")
    out = " ".join(parts)
    if body:
        out += " --data-binary " + shlex.quote(body)
    if req.get("body_cut_bytes"):
        out = f"# the body was cut when captured: this sends only its start\n{out}"
    return out + "\n"


def kept_headers(view: dict[str, Any]) -> dict[str, str]:
    """The captured request headers a replay sends again."""
    return {str(k): str(v) for k, v in (view.get("request") or {}).get("headers") or ()
            if str(k).lower() in _KEPT_HEADERS and v != REDACTED}
