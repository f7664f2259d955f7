"""Captures, pure parts: the ring's byte bound, the disk tier's pruning, a streamed
answer assembled per family, token counts, the curl export's quoting and redaction."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.calls.capture import REDACTED, Captures, redact_headers
from proxy.ops import capture_view
from scheduler.config.root import CaptureConfig


def sse(*events: object) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + \
        b"data: [DONE]\n\n"


def test_chat_stream_assembled_with_reasoning_and_tokens() -> None:
    body = sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
        {"choices": [{"index": 0, "delta": {"reasoning_content": "think "}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}}],
         "usage": {"prompt_tokens": 7, "completion_tokens": 2}},
    )
    assert capture_view.assemble("text/event-stream", body) == {
        "text": "Hello", "reasoning": "think "}
    assert capture_view.tokens(body) == {"prompt": 7, "completion": 2}


def test_other_families_assembled() -> None:
    anthropic = b"event: content_block_delta\n" + sse(
        {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "A"}},
        {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "B"}},
        {"type": "message_delta", "usage": {"input_tokens": 3, "output_tokens": 2}})
    assert capture_view.assemble("text/event-stream", anthropic)["text"] == "AB"  # type: ignore[index]
    assert capture_view.tokens(anthropic) == {"prompt": 3, "completion": 2}
    responses = sse({"type": "response.output_text.delta", "delta": "x"},
                    {"type": "response.output_text.delta", "delta": "y"})
    assert capture_view.assemble("text/event-stream", responses)["text"] == "xy"  # type: ignore[index]
    native = sse({"content": "n1", "stop": False},
                 {"content": "n2", "stop": True, "timings": {"prompt_n": 4, "predicted_n": 2}})
    assert capture_view.assemble("text/event-stream", native)["text"] == "n1n2"  # type: ignore[index]
    assert capture_view.tokens(native) == {"prompt": 4, "completion": 2}
    completions = sse({"choices": [{"index": 0, "text": "c"}]})
    assert capture_view.assemble("text/event-stream", completions)["text"] == "c"  # type: ignore[index]
    # An answer in one piece is not assembled; garbage lines are skipped.
    assert capture_view.assemble("application/json", b"{}") is None
    assert capture_view.assemble("text/event-stream", b"data: {not json\n\n") == {
        "text": "", "reasoning": ""}


def test_headers_redacted_and_curl_quoted() -> None:
    headers = redact_headers([("Authorization", "Bearer sk-secret"), ("X-Api-Key", "sk-2"),
                              ("Cookie", "a=b"), ("X-Tenant", "t-1"),
                              ("Content-Type", "application/json"),
                              ("anthropic-version", "2023-06-01")], frozenset({"x-tenant"}))
    assert [v for _, v in headers][:4] == [REDACTED] * 4
    body = """{"model": "m", "messages": [{"role": "user", "content": "it's $(rm -rf /) `x`"}]}"""
    view = {"path": "/v1/messages", "request": {
        "method": "POST", "url_path": "/v1/messages", "query": "beta=true",
        "host": "127.0.0.1:8080", "headers": headers, "body": body, "body_cut_bytes": 0}}
    curl = capture_view.curl(view)
    words = shlex.split(curl)
    assert words[words.index("--data-binary") + 1] == body  # exactly the body, nothing run
    assert "http://127.0.0.1:8080/v1/messages?beta=true" in words
    assert "anthropic-version: 2023-06-01" in words
    assert "Authorization: Bearer $CORRAL_API_KEY" in words
    for secret in ("sk-secret", "sk-2", "a=b", "t-1"):
        assert secret not in curl
    assert capture_view.kept_headers(view) == {"Content-Type": "application/json",
                                               "anthropic-version": "2023-06-01"}
    cut = capture_view.curl({**view, "request": {**view["request"], "body_cut_bytes": 9}})
    assert cut.startswith("# the body was cut")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40_000), st.lists(st.integers(0, 9_000), max_size=6),
                          st.booleans()), min_size=1, max_size=40))
def test_the_ring_never_holds_more_than_its_cap(
    calls: list[tuple[int, list[int], bool]]
) -> None:
    store = Captures(CaptureConfig(memory=64 << 10, body_limit=16 << 10))
    running = []
    for i, (received, chunks, ends) in enumerate(calls):
        rec = store.open(f"r{i}", 0.0, {}, b"x" * received)
        for n in chunks:
            rec.read(b"y" * n)
            assert store.bytes <= store.config.memory
        if ends:
            rec.finish(None)
        else:
            running.append(rec)
        assert store.bytes == sum(r.size for r in store.records.values())
        assert store.bytes <= store.config.memory
        assert len(rec.received) <= store.body_limit and len(rec.answer) <= store.body_limit
    for rec in running:
        rec.finish(None)
    assert store.bytes <= store.config.memory


def test_the_disk_tier_deletes_the_oldest_first(tmp_path: Path) -> None:
    folder = tmp_path / "captures"
    folder.mkdir()
    for i in range(5):  # left by an earlier run, oldest first
        p = folder / f"old-{i}.json"
        p.write_bytes(b"x" * 1000)
        ts = 1_000_000 + i
        os.utime(p, (ts, ts))
    store = Captures(CaptureConfig(memory=1 << 20, dir=folder, dir_max=3000))
    store._scan()
    assert sorted(p.name for p in folder.iterdir()) == ["old-2.json", "old-3.json", "old-4.json"]
    store._write(folder / "new.json", b"y" * 1500)
    assert sorted(p.name for p in folder.iterdir()) == ["new.json", "old-4.json"]
    assert store.path_of("../etc/passwd") is None and store.path_of("a b") is None
