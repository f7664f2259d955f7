"""Tokens a call used, read from the tail of its answer, for per-key token limits.

Only the tail is read, with one regular expression and no JSON parse: llama-server
writes ``usage`` and ``timings`` last (its JSON keys are sorted, and in a stream they
ride on the last chunk), so the pass-through keeps its cost flat whatever the answer's
size. OpenAI's ``prompt_tokens``/``completion_tokens`` win, then llama-server's
``timings`` (``prompt_n + cache_n + predicted_n``), then the Anthropic and Responses
``input_tokens``/``output_tokens``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, Protocol

# Bytes of an answer's end that are searched.
TAIL = 4096

_FIELD = re.compile(
    rb'"(prompt_tokens|completion_tokens|prompt_n|cache_n|predicted_n|input_tokens|'
    rb'output_tokens)"\s*:\s*(\d+)'
)


class Counted(Protocol):
    tokens: int


# The call of a counted key whose answer is being read (``proxy.upstream`` sets it):
# the translating paths parse every event anyway, and note the usage they pass.
COUNTING: ContextVar[Counted | None] = ContextVar("corral_counting", default=None)


def tokens_of(usage: object, timings: object) -> int:
    """Prompt + completion tokens from parsed ``usage`` or ``timings`` objects."""
    def num(m: Mapping[str, Any], *names: str) -> int:
        return sum(int(v) for n in names if isinstance(v := m.get(n), int | float))

    if isinstance(usage, Mapping):
        n = num(usage, "prompt_tokens", "completion_tokens") or num(
            usage, "input_tokens", "output_tokens")
        if n:
            return n
    if isinstance(timings, Mapping):
        return num(timings, "prompt_n", "cache_n", "predicted_n")
    return 0


def note_event(event: Mapping[str, Any]) -> None:
    """A parsed stream event: if it reports usage, that is the call's count so far."""
    call = COUNTING.get()
    if call is not None and ("usage" in event or "timings" in event):
        n = tokens_of(event.get("usage"), event.get("timings"))
        if n:
            call.tokens = n


def tokens_in(tail: bytes | bytearray | memoryview) -> int:
    """Prompt + completion tokens named in the end of an answer; 0 if none."""
    found: dict[bytes, int] = {}
    for m in _FIELD.finditer(bytes(tail[-TAIL:])):
        found[m.group(1)] = int(m.group(2))  # the last one of a name wins
    for names in ((b"prompt_tokens", b"completion_tokens"),
                  (b"prompt_n", b"cache_n", b"predicted_n"),
                  (b"input_tokens", b"output_tokens")):
        if any(n in found for n in names):
            return sum(found.get(n, 0) for n in names)
    return 0
