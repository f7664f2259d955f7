"""The fast path of translated streams: a plain content chunk read into structs and
written from bytes must give the very bytes the general path (a dict parse, ``feed``
and ``encode``) gives, in every state of the stream machines."""

from __future__ import annotations

import itertools
from typing import Any

import msgspec
import pytest

from proxy.dialects.families import anthropic_chat as ac
from proxy.dialects.families import responses_chat as rc
from proxy.dialects.families.bridge import encode
from proxy.dialects.families.chunks import plain_text


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None,
          **extra: Any) -> bytes:
    body: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "model": "m",
                            "choices": [{"index": 0, "delta": delta or {},
                                         "finish_reason": finish}], **extra}
    return msgspec.json.encode(body)


TEXT = chunk({"content": "tok é \"q\"\n"})
CALL = chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                              "function": {"name": "add", "arguments": "{\"a\":"}}]})
CALL_MORE = chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]})

# Streams that open, leave and reopen text blocks around reasoning and tool calls.
STREAMS: list[list[bytes]] = [
    [chunk({"role": "assistant", "content": None}), TEXT, TEXT, chunk({"content": ""}),
     TEXT, chunk({}, "stop"), chunk(usage={"prompt_tokens": 3, "completion_tokens": 4},
                                    choices=[])],
    [TEXT, TEXT, chunk({"reasoning_content": "hm"}), TEXT, TEXT, CALL, CALL_MORE, TEXT,
     chunk({"content": "end"}, "tool_calls")],
    [chunk({"content": "a", "tool_calls": None, "reasoning_content": None}, usage=None),
     chunk({"content": "b"}, usage={"prompt_tokens": 1, "completion_tokens": 2}),
     chunk({"content": "c"}), b'{"choices":[{"delta":{"content":7}}]}', TEXT],
]


def test_plain_text_reads_only_a_lone_content_delta() -> None:
    assert plain_text(TEXT) == "tok é \"q\"\n"
    assert plain_text(chunk({"content": ""})) == ""
    assert plain_text(chunk({"content": "x", "tool_calls": None}, usage=None)) == "x"
    for other in (chunk({"content": "x"}, "stop"), chunk({"content": None}), CALL,
                  chunk({"content": "x", "reasoning_content": "r"}),
                  chunk({"content": "x"}, usage={"prompt_tokens": 1}),
                  chunk({"content": "x"}, error={"message": "no"}),
                  chunk({"content": "x"}, error=None),
                  b'{"choices":[]}', b'{"choices":[{"delta":{"content":7}}]}',
                  b'[1]', b'{"choices":', b'{}'):
        assert plain_text(other) is None, other


def _general(machine: Any, chunks: list[bytes]) -> bytes:
    events = machine.start(msgspec.json.decode(chunks[0]))
    for data in chunks:
        events += machine.feed(msgspec.json.decode(data))
    return encode(events + machine.finish())


def _fast(machine: Any, chunks: list[bytes]) -> tuple[bytes, int]:
    """As the bridge streams; also how many chunks took the fast path."""
    out = encode(machine.start(msgspec.json.decode(chunks[0])))
    fast = 0
    for data in chunks:
        text = plain_text(data)
        frame = machine.text_frame(text) if text is not None else None
        if frame is not None:
            out += frame
            fast += 1
        else:
            out += encode(machine.feed(msgspec.json.decode(data)))
    return out + encode(machine.finish()), fast


@pytest.mark.parametrize("chunks", STREAMS)
@pytest.mark.parametrize("thinking", [False, True])
def test_anthropic_fast_path_writes_the_same_bytes(chunks: list[bytes],
                                                   thinking: bool) -> None:
    def machine() -> ac.Stream:
        return ac.Stream(ac.Asked(model="m", stream=True, thinking=thinking))

    fast, taken = _fast(machine(), chunks)
    assert fast == _general(machine(), chunks)
    assert taken > 0


@pytest.mark.parametrize("chunks", STREAMS)
def test_responses_fast_path_writes_the_same_bytes(chunks: list[bytes],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def machine() -> rc.Stream:
        # Ids are random: both machines draw the same sequence.
        counter = itertools.count()
        monkeypatch.setattr(rc, "new_id", lambda prefix: f"{prefix}{next(counter)}")
        return rc.Stream(rc.asked({"model": "m", "input": "x", "stream": True}))

    general_machine = machine()
    general = _general(general_machine, chunks)
    fast_machine = machine()
    fast, taken = _fast(fast_machine, chunks)
    assert fast == general
    assert taken > 0
    # What a later previous_response_id continues from is the same too.
    assert fast_machine.assistant() == general_machine.assistant()
