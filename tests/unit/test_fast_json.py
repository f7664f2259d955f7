"""The Ollama fast path writes the same bytes as the general one, for every event shape,
and the raw SSE reader splits what the parsing one does."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.calls.streaming import ndjson_line, sse_data_batches, sse_event_batches
from proxy.dialects import stream_translate as st
from scheduler.errors import CorralError
from tests.unit.test_translate import _Resp


def state(kind: str = "chat", **kw: Any) -> st.OllamaStream:
    stamps = iter(f"T{i}" for i in range(1000))
    return st.OllamaStream(kind, "m:latest", now=lambda: next(stamps), **kw)  # type: ignore[arg-type]


def general(kind: str, batches: list[list[dict[str, Any]]], **kw: Any) -> tuple[bytes, Any]:
    s = state(kind, **kw)
    out = b"".join(b"".join(map(ndjson_line, s.feed_batch(b))) for b in batches)
    return out, s


def fast(kind: str, batches: list[list[dict[str, Any]]], **kw: Any) -> tuple[bytes, Any]:
    s = state(kind, **kw)
    out = b"".join(s.feed_data_batch([json.dumps(e).encode() for e in b]) for b in batches)
    return out, s


def c(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"object": "chat.completion.chunk", "choices": choices, **extra}


CHAT_CASES = {
    "content": [[c({"role": "assistant", "content": None}), c({"content": "Hé"}),
                 c({"content": 'lo "x"\n'})], [c({}, "stop")],
                [c(None, usage={"prompt_tokens": 3, "completion_tokens": 2},
                   timings={"predicted_ms": 5.0, "predicted_n": 2})]],
    "reasoning": [[c({"reasoning_content": "hmm"}), c({"content": "ok"})], [c({}, "stop")]],
    "tools": [[c({"tool_calls": [{"index": 0, "id": "call_1", "function": {
        "name": "add", "arguments": '{"a":'}}]}),
        c({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]})],
        [c({}, "tool_calls")]],
    "logprobs": [[{"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None,
                                "logprobs": {"content": [{"token": "a", "logprob": -0.1}]}}]}],
                 [c({}, "length")]],
    "null fields": [[{"choices": [{"index": 0, "delta": {"content": "a", "tool_calls": None,
                                                         "reasoning_content": None},
                                   "logprobs": None, "finish_reason": None}]}],
                    [c({}, "stop")]],
    "odd types": [[{"choices": [{"index": 0, "delta": {"content": ["not", "text"]}}]},
                   c({"content": "b"})], [c({}, "stop")]],
}


@pytest.mark.parametrize("name", list(CHAT_CASES))
def test_fast_path_writes_what_the_general_path_writes(name: str) -> None:
    batches = CHAT_CASES[name]
    slow_out, slow = general("chat", batches)
    fast_out, quick = fast("chat", batches)
    assert fast_out == slow_out
    assert (quick.content, quick.thinking, quick.finish_reason, quick.usage, quick.timings) == (
        slow.content, slow.thinking, slow.finish_reason, slow.usage, slow.timings)
    assert quick.tail(10, 1) == slow.tail(10, 1)


def test_fast_path_hides_thinking_when_asked() -> None:
    batches = CHAT_CASES["reasoning"]
    assert fast("chat", batches, show_thinking=False)[0] == general(
        "chat", batches, show_thinking=False)[0]


def test_fast_path_generate_and_infill() -> None:
    completion = [[{"choices": [{"index": 0, "text": "one", "finish_reason": None}]},
                   {"choices": [{"index": 0, "text": " two", "finish_reason": "length"}]}]]
    assert fast("generate", completion)[0] == general("generate", completion)[0]
    assert b'"response":"one"' in fast("generate", completion)[0]
    infill = [[{"content": "x", "stop": False}, {"content": "", "stop": True,
                                                  "stop_type": "eos"}]]
    out, s = fast("generate", infill)
    assert out == general("generate", infill)[0] and s.finish_reason == "stop"


def test_one_timestamp_per_batch() -> None:
    out, _ = fast("chat", [[c({"content": "a"}), c({"content": "b"})], [c({"content": "c"})]])
    stamps = [json.loads(line)["created_at"] for line in out.splitlines()]
    assert stamps == ["T0", "T0", "T1"]


def test_fast_path_errors_and_garbage() -> None:
    s = state()
    assert s.feed_data_batch([b"{not json", b"[1, 2]"]) == b""
    with pytest.raises(CorralError, match="boom"):
        s.feed_data_batch([b'{"error":{"code":500,"message":"boom"}}'])


@pytest.mark.parametrize("size", [1, 7, 1 << 20])
async def test_raw_reader_splits_like_the_parsing_one(size: int) -> None:
    raw = (b": ping\n\n"
           b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
           b'error: {"code":500,"message":"boom"}\n\n'
           b'data:{"choices":[]}\n\n'
           b"data: [DONE]\n\n"
           b'data: {"after":"done"}\n\n')
    datas = [d async for b in sse_data_batches(_Resp(raw, size)) for d in b]  # type: ignore[arg-type]
    assert [json.loads(d) for d in datas] == [
        {"choices": [{"index": 0, "delta": {"content": "a"}}]},
        {"error": {"code": 500, "message": "boom"}},
        {"choices": []},
    ]
    events = [e async for b in sse_event_batches(_Resp(raw, size)) for e in b]  # type: ignore[arg-type]
    assert [json.loads(d) for d in datas][:2] == events
