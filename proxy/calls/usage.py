"""Tokens a call used, read from the tail of its answer, for per-key token limits.

One tap on the upstream response (``Tap``), set by ``proxy.calls.upstream`` for calls of a
counted key, so every dialect is covered the same way whatever reads the answer (the
relay, the SSE parsers, a whole-body read): the tap keeps the last two chunks read,
and the count is taken from them once the consumer is done.

Only that tail is searched, from its end and with no JSON parse:
llama-server writes ``usage`` and ``timings`` last (its JSON keys are sorted, and in
a stream they ride on the last event), so the cost is flat whatever the answer's
size. OpenAI's ``prompt_tokens``/``completion_tokens`` win, then llama-server's
``timings`` (``prompt_n + cache_n + predicted_n``), then the Anthropic and Responses
``input_tokens``/``output_tokens``.
"""

from __future__ import annotations

import re

import aiohttp

from proxy.calls.tap import ContentTap

# Bytes of an answer's end that are searched.
TAIL = 4096

# In the order they win: OpenAI's, llama-server's timings, Anthropic's and Responses'.
_GROUPS = tuple(
    tuple((b'"' + name + b'"', len(name) + 2) for name in group)
    for group in ((b"prompt_tokens", b"completion_tokens"),
                  (b"prompt_n", b"cache_n", b"predicted_n"),
                  (b"input_tokens", b"output_tokens"))
)
_VALUE = re.compile(rb"\s*:\s*(\d+)")


def tokens_in(tail: bytes | bytearray | memoryview) -> int:
    """Prompt + completion tokens named in the end of an answer; 0 if none.

    Each name's last occurrence with a number wins, searched from the end (``rfind``),
    and the first group that names any wins: one regular expression over the whole
    tail cost 4-30 µs a call, more than the rest of a key's bookkeeping.
    """
    data = bytes(tail[-TAIL:])
    match = _VALUE.match
    for group in _GROUPS:
        total = 0
        seen = False
        for quoted, skip in group:
            end = len(data)
            while (at := data.rfind(quoted, 0, end)) >= 0:
                m = match(data, at + skip)
                if m is not None:
                    total += int(m.group(1))
                    seen = True
                    break
                end = at
        if seen:
            return total
    return 0


class Tap(ContentTap):
    """Reads pass through; the last two chunks are kept for ``tokens()``."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        super().__init__(resp)
        self._prev = self._last = b""

    def _keep(self, data: bytes) -> bytes:
        if data:
            self._prev, self._last = self._last, data
        return data

    def tokens(self) -> int:
        return tokens_in(self._prev[-TAIL:] + self._last)

