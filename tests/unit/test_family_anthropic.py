"""Anthropic Messages <-> chat completions, table by table: requests, answers, streams,
and the requests refused with a 400."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.dialects.families import anthropic_chat as ac
from scheduler.errors import BadRequest

BASE = {"model": "m", "max_tokens": 16}
TOOL = {"name": "add", "description": "Add two numbers",
        "input_schema": {"type": "object", "properties": {"a": {"type": "number"}}}}
CHAT_TOOL = {"type": "function", "function": {
    "name": "add", "parameters": TOOL["input_schema"], "description": "Add two numbers"}}

REQUESTS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("plain string", {"messages": [{"role": "user", "content": "hi"}]},
     {"messages": [{"role": "user", "content": "hi"}]}),
    ("system string and blocks", {
        "system": [{"type": "text", "text": "be brief"}, {"type": "text", "text": "be kind"}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                  {"type": "text", "text": "b"}]}]},
     {"messages": [{"role": "system", "content": "be brief\nbe kind"},
                   {"role": "user", "content": "a\nb"}]}),
    ("image base64 and url", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is it"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                     "data": "QUJD"}},
        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]},
     {"messages": [{"role": "user", "content": [
         {"type": "text", "text": "what is it"},
         {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QUJD"}},
         {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}),
    ("tool use round trip", {"tools": [TOOL], "messages": [
        {"role": "user", "content": "add 2 and 3"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "text", "text": "calling"},
            {"type": "tool_use", "id": "toolu_1", "name": "add", "input": {"a": 2}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "5"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
             "content": [{"type": "text", "text": "boom"}]},
            {"type": "text", "text": "thanks"}]}]},
     {"tools": [CHAT_TOOL], "messages": [
         {"role": "user", "content": "add 2 and 3"},
         {"role": "assistant", "content": "calling", "tool_calls": [
             {"id": "toolu_1", "type": "function",
              "function": {"name": "add", "arguments": '{"a": 2}'}}]},
         {"role": "tool", "tool_call_id": "toolu_1", "content": "5"},
         {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: boom"},
         {"role": "user", "content": "thanks"}]}),
    ("an assistant turn of only thinking keeps a string content", {"messages": [
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "t",
                                           "signature": "s"}]}]},
     {"messages": [{"role": "assistant", "content": ""}]}),
    ("a system turn among the messages (Claude Code)", {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "system", "content": [{"type": "text", "text": "# Environment",
                                        "cache_control": {"type": "ephemeral"}}]}]},
     {"messages": [{"role": "user", "content": "hi"},
                   {"role": "system", "content": "# Environment"}]}),
    ("sampling, stops, metadata", {
        "temperature": 0.2, "top_p": 0.9, "top_k": 5, "stop_sequences": ["END"],
        "metadata": {"user_id": "u1"}, "thinking": {"type": "enabled", "budget_tokens": 9},
        "messages": [{"role": "user", "content": "x"}]},
     {"temperature": 0.2, "top_p": 0.9, "top_k": 5, "stop": ["END"], "user": "u1",
      "messages": [{"role": "user", "content": "x"}]}),
    ("tool choice any, no parallel", {
        "tools": [TOOL], "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "messages": [{"role": "user", "content": "x"}]},
     {"tools": [CHAT_TOOL], "tool_choice": "required", "parallel_tool_calls": False,
      "messages": [{"role": "user", "content": "x"}]}),
    ("tool choice by name: that tool, required", {
        "tools": [{**TOOL, "name": "sub"}, TOOL], "tool_choice": {"type": "tool", "name": "add"},
        "messages": [{"role": "user", "content": "x"}]},
     {"tools": [CHAT_TOOL], "tool_choice": "required",
      "messages": [{"role": "user", "content": "x"}]}),
    ("tool choice naming no tool", {
        "tools": [TOOL], "tool_choice": {"type": "tool", "name": "nope"},
        "messages": [{"role": "user", "content": "x"}]},
     {"tools": [CHAT_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}},
      "messages": [{"role": "user", "content": "x"}]}),
    ("server tools are left out, their tool choice with them", {
        "tools": [{"type": "web_search_20250305", "name": "web_search"},
                  {"type": "bash_20250124", "name": "bash"}],
        "tool_choice": {"type": "any"}, "messages": [{"role": "user", "content": "x"}]},
     {"messages": [{"role": "user", "content": "x"}]}),
    ("stream asks for usage", {"stream": True, "messages": [{"role": "user", "content": "x"}]},
     {"stream": True, "stream_options": {"include_usage": True},
      "messages": [{"role": "user", "content": "x"}]}),
]


@pytest.mark.parametrize(("name", "given", "expected"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_request(name: str, given: dict[str, Any], expected: dict[str, Any]) -> None:
    assert ac.request({**BASE, **given}) == {**BASE, **expected}


BAD: list[tuple[dict[str, Any], str]] = [
    ({"model": "m", "messages": []}, "'max_tokens' is required"),
    ({"model": "m", "max_tokens": 0, "messages": []}, "'max_tokens' is required"),
    ({**BASE}, "'messages' is required"),
    ({**BASE, "messages": [{"role": "tool", "content": "x"}]}, "messages[0]: 'role'"),
    ({**BASE, "messages": [{"role": "user", "content": 3}]}, "messages[0]: 'content'"),
    ({**BASE, "messages": [{"role": "user", "content": [{"type": "document"}]}]},
     "messages[0].content[0]: block type 'document'"),
    ({**BASE, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "file", "file_id": "f"}}]}]},
     "an image's 'source' must be base64 or url"),
    ({**BASE, "messages": [], "system": 7}, "'system' must be a string"),
    ({**BASE, "messages": [], "tools": {"name": "x"}}, "'tools' must be a list"),
    ({**BASE, "messages": [], "tools": [{"description": "no name"}]}, "each tool needs a 'name'"),
]


@pytest.mark.parametrize(("body", "message"), BAD)
def test_bad_request(body: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest) as e:
        ac.request(body)
    assert message in e.value.message


def test_count_request_is_a_one_token_call_without_tool_calls() -> None:
    chat = ac.count_request({"model": "m", "messages": [{"role": "user", "content": "x"}],
                             "tools": [TOOL], "stream": True})
    assert chat["max_tokens"] == 1 and "stream" not in chat
    assert chat["tool_choice"] == "none" and chat["tools"] == [CHAT_TOOL]
    assert ac.count_response({"usage": {"prompt_tokens": 12}}) == {"input_tokens": 12}


ASK = ac.Asked(model="m", stream=False, thinking=False, stop_sequences=("END",))


def chat_answer(message: dict[str, Any], finish: str, **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "model": "up", "choices": [
        {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish,
         **extra}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 4,
                  "prompt_tokens_details": {"cached_tokens": 3}}}


ANSWERS: list[tuple[str, dict[str, Any], Any, str, str | None]] = [
    ("text, end of turn", chat_answer({"content": "hello"}, "stop"),
     [{"type": "text", "text": "hello"}], "end_turn", None),
    ("length", chat_answer({"content": "hel"}, "length"),
     [{"type": "text", "text": "hel"}], "max_tokens", None),
    ("a named stop sequence (vLLM)", chat_answer({"content": "a"}, "stop", stop_reason="END"),
     [{"type": "text", "text": "a"}], "stop_sequence", "END"),
    ("tool calls", chat_answer({"content": None, "tool_calls": [
        {"id": "call_9", "type": "function",
         "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}},
        {"id": "call_10", "type": "function", "function": {"name": "add", "arguments": "{oops"}},
    ]}, "tool_calls"),
     [{"type": "tool_use", "id": "call_9", "name": "add", "input": {"a": 2, "b": 3}},
      {"type": "tool_use", "id": "call_10", "name": "add", "input": {"arguments": "{oops"}}],
     "tool_use", None),
    ("a tool call finished with stop", chat_answer({"content": "", "tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": ""}}]}, "stop"),
     [{"type": "tool_use", "id": "c", "name": "f", "input": {}}], "tool_use", None),
    ("reasoning dropped when thinking was not asked",
     chat_answer({"content": "x", "reasoning_content": "because"}, "stop"),
     [{"type": "text", "text": "x"}], "end_turn", None),
]


@pytest.mark.parametrize(("name", "answer", "content", "stop", "sequence"), ANSWERS,
                         ids=[a[0] for a in ANSWERS])
def test_response(name: str, answer: dict[str, Any], content: Any, stop: str,
                  sequence: str | None) -> None:
    msg = ac.response(answer, ASK)
    assert msg["content"] == content
    assert (msg["stop_reason"], msg["stop_sequence"]) == (stop, sequence)
    assert msg["type"] == "message" and msg["role"] == "assistant" and msg["model"] == "m"
    assert msg["id"] == "msg_chatcmpl-1"
    assert msg["usage"] == {"input_tokens": 7, "output_tokens": 4, "cache_read_input_tokens": 3}


def test_thinking_block_when_asked() -> None:
    ask = ac.Asked(model="m", stream=False, thinking=True)
    msg = ac.response(chat_answer({"content": "x", "reasoning_content": "because"}, "stop"), ask)
    assert msg["content"][0] == {"type": "thinking", "thinking": "because", "signature": ""}


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None,
          usage: dict[str, int] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": "chatcmpl-7", "model": "up",
                           "choices": [] if delta is None else [
                               {"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        out["usage"] = usage
    return out


def run_stream(chunks: list[dict[str, Any]], thinking: bool = False) -> list[tuple[Any, Any]]:
    s = ac.Stream(ac.Asked(model="m", stream=True, thinking=thinking))
    events = s.start(chunks[0])
    for c in chunks:
        events += s.feed(c)
    return events + s.finish()


def test_stream_text() -> None:
    events = run_stream([
        chunk({"role": "assistant", "content": None}),
        chunk({"content": "Hel"}), chunk({"content": "lo"}), chunk({}, "length"),
        chunk(usage={"prompt_tokens": 5, "completion_tokens": 2}),
    ])
    assert [e for e, _ in events] == [
        "message_start", "ping", "content_block_start", "content_block_delta",
        "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["id"] == "msg_chatcmpl-7" and start["model"] == "m" and start["content"] == []
    assert events[2][1] == {"type": "content_block_start", "index": 0,
                            "content_block": {"type": "text", "text": ""}}
    assert [d["delta"]["text"] for e, d in events if e == "content_block_delta"] == ["Hel", "lo"]
    assert events[6][1] == {"type": "message_delta",
                            "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                            "usage": {"input_tokens": 5, "output_tokens": 2}}


def test_stream_thinking_then_text_then_tools() -> None:
    events = run_stream([
        chunk({"reasoning_content": "think"}),
        chunk({"content": "ok"}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "add", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                               "function": {"name": "add", "arguments": "{}"}}]}),
        chunk({}, "tool_calls"),
    ], thinking=True)
    starts = [d["content_block"] for e, d in events if e == "content_block_start"]
    assert starts == [
        {"type": "thinking", "thinking": "", "signature": ""},
        {"type": "text", "text": ""},
        {"type": "tool_use", "id": "call_a", "name": "add", "input": {}},
        {"type": "tool_use", "id": "call_b", "name": "add", "input": {}},
    ]
    deltas = [(d["index"], d["delta"]) for e, d in events if e == "content_block_delta"]
    assert deltas == [
        (0, {"type": "thinking_delta", "thinking": "think"}),
        (1, {"type": "text_delta", "text": "ok"}),
        (2, {"type": "input_json_delta", "partial_json": '{"a":'}),
        (2, {"type": "input_json_delta", "partial_json": " 1}"}),
        (3, {"type": "input_json_delta", "partial_json": "{}"}),
    ]
    stops = [d["index"] for e, d in events if e == "content_block_stop"]
    assert stops == [0, 1, 2, 3]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    # The whole arguments assemble into valid JSON, as the SDK will parse them.
    assert json.loads('{"a":' + " 1}") == {"a": 1}


def test_empty_stream_still_closes_the_message() -> None:
    s = ac.Stream(ac.Asked(model="m", stream=True, thinking=False))
    events = s.start({}) + s.finish()
    assert [e for e, _ in events] == ["message_start", "ping", "message_delta", "message_stop"]
    assert events[2][1]["delta"]["stop_reason"] == "end_turn"


@pytest.mark.parametrize(("thinking", "shown"), [
    ({"type": "enabled", "budget_tokens": 1024}, True),
    ({"type": "adaptive"}, True),
    ({"type": "adaptive", "display": "omitted"}, False),
    ({"type": "disabled"}, False),
    (None, False),
])
def test_thinking_asked(thinking: Any, shown: bool) -> None:
    assert ac.asked({"model": "m", "thinking": thinking}).thinking is shown


# The shape of Claude Code 2.1.332's first call (captured against a stub server, texts
# cut short): system blocks with cache_control, a system turn among the messages,
# adaptive thinking, and fields a chat upstream has no use for.
CLAUDE_CODE = {
    "model": "cc", "max_tokens": 32000, "stream": True,
    "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332;"},
               {"type": "text", "text": "You are a Claude agent.",
                "cache_control": {"type": "ephemeral"}}],
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "<system-reminder>…"},
                                     {"type": "text", "text": "hello there",
                                      "cache_control": {"type": "ephemeral"}}]},
        {"role": "system", "content": [{"type": "text", "text": "# Environment"}]}],
    "tools": [{"name": "Read", "description": "Reads a file.", "input_schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
        "properties": {"file_path": {"type": "string"}}, "required": ["file_path"],
        "additionalProperties": False}}],
    "metadata": {"user_id": '{"session_id":"s"}'},
    "thinking": {"type": "adaptive", "display": "omitted"},
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "output_config": {"effort": "high"},
}


def test_claude_codes_request() -> None:
    chat = ac.request(CLAUDE_CODE)
    assert chat["messages"] == [
        {"role": "system", "content": "x-anthropic-billing-header: cc_version=2.1.332;\n"
                                      "You are a Claude agent."},
        {"role": "user", "content": "<system-reminder>…\nhello there"},
        {"role": "system", "content": "# Environment"}]
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "Read", "description": "Reads a file.",
        "parameters": CLAUDE_CODE["tools"][0]["input_schema"]}}]  # type: ignore[index]
    assert chat["max_tokens"] == 32000 and chat["user"] == '{"session_id":"s"}'
    assert not {"thinking", "context_management", "output_config", "metadata"} & set(chat)
    assert ac.asked(CLAUDE_CODE).thinking is False  # "display": "omitted"
