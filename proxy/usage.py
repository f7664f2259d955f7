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

# Bytes of an answer's end that are searched.
TAIL = 4096

_FIELD = re.compile(
    rb'"(prompt_tokens|completion_tokens|prompt_n|cache_n|predicted_n|input_tokens|'
    rb'output_tokens)"\s*:\s*(\d+)'
)


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
