"""OpenAI Responses <-> chat completions, table by table: requests, answers, streams,
and the requests refused with a 400."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.dialects.families import responses_chat as rc
from scheduler.errors import BadRequest

FN = {"type": "function", "name": "add", "description": "Add", "strict": True,
      "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}
CHAT_FN = {"type": "function", "function": {
    "name": "add", "description": "Add", "parameters": FN["parameters"], "strict": True}}

REQUESTS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("a string input", {"input": "hi", "max_output_tokens": 5},
     {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}),
    ("instructions and roles", {
        "instructions": "be brief",
        "input": [{"role": "developer", "content": "dev"},
                  {"type": "message", "role": "user",
                   "content": [{"type": "input_text", "text": "q"}]},
                  {"role": "assistant", "content": [{"type": "output_text", "text": "a"}]}]},
     {"messages": [{"role": "system", "content": "be brief"},
                   {"role": "system", "content": "dev"},
                   {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a"}]}),
    ("an image", {"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "what"},
        {"type": "input_image", "image_url": "data:image/png;base64,QQ==", "detail": "low"}]}]},
     {"messages": [{"role": "user", "content": [
         {"type": "text", "text": "what"},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,QQ==",
                                             "detail": "low"}}]}]}),
    ("function calls and outputs", {"tools": [FN], "tool_choice": "auto", "input": [
        {"role": "user", "content": "add"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "call_id": "call_1", "name": "add", "arguments": '{"a":1}'},
        {"type": "function_call", "call_id": "call_2", "name": "add", "arguments": '{"a":2}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "1"},
        {"type": "function_call_output", "call_id": "call_2",
         "output": [{"type": "input_text", "text": "2"}]}]},
     {"tools": [CHAT_FN], "tool_choice": "auto", "messages": [
         {"role": "user", "content": "add"},
         {"role": "assistant", "content": None, "tool_calls": [
             {"id": "call_1", "type": "function",
              "function": {"name": "add", "arguments": '{"a":1}'}},
             {"id": "call_2", "type": "function",
              "function": {"name": "add", "arguments": '{"a":2}'}}]},
         {"role": "tool", "tool_call_id": "call_1", "content": "1"},
         {"role": "tool", "tool_call_id": "call_2", "content": "2"}]}),
    ("a call after the assistant's text joins its turn", {"input": [
        {"role": "assistant", "content": "let me see"},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]},
     {"messages": [{"role": "assistant", "content": "let me see", "tool_calls": [
         {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}),
    ("named tool choice, json schema, effort, sampling", {
        "input": "x", "tools": [FN], "tool_choice": {"type": "function", "name": "add"},
        "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"},
                            "strict": True}},
        "reasoning": {"effort": "low"}, "temperature": 0.5, "top_p": 0.8,
        "parallel_tool_calls": False, "store": False, "metadata": {"k": "v"}},
     {"messages": [{"role": "user", "content": "x"}], "tools": [CHAT_FN],
      "tool_choice": "required",
      "response_format": {"type": "json_schema", "json_schema": {
          "name": "s", "schema": {"type": "object"}, "strict": True}},
      "reasoning_effort": "low", "temperature": 0.5, "top_p": 0.8,
      "parallel_tool_calls": False}),
    ("built-in tools are left out (Codex sends web_search)", {
        "input": "x", "tools": [FN, {"type": "web_search", "external_web_access": False},
                                {"type": "custom", "name": "apply_patch"}],
        "tool_choice": {"type": "web_search"}},
     {"messages": [{"role": "user", "content": "x"}], "tools": [CHAT_FN],
      "tool_choice": "auto"}),
    ("only built-in tools: no tools at all", {
        "input": "x", "tools": [{"type": "file_search"}], "tool_choice": "required",
        "parallel_tool_calls": True},
     {"messages": [{"role": "user", "content": "x"}]}),
    ("namespace tools go flat, their calls joined", {"input": [
        {"type": "function_call", "call_id": "c", "namespace": "crm", "name": "find",
         "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": "none"}],
        "tools": [{"type": "namespace", "name": "crm", "description": "CRM", "tools": [
            {"type": "function", "name": "find", "parameters": {"type": "object"}},
            {"type": "custom", "name": "free"}]}],
        "tool_choice": {"type": "function", "namespace": "crm", "name": "find"}},
     {"messages": [
         {"role": "assistant", "content": None, "tool_calls": [
             {"id": "c", "type": "function",
              "function": {"name": "crm__find", "arguments": "{}"}}]},
         {"role": "tool", "tool_call_id": "c", "content": "none"}],
      "tools": [{"type": "function", "function": {
          "name": "crm__find", "parameters": {"type": "object"}}}],
      "tool_choice": "required"}),
    ("json object, stream", {"input": "x", "text": {"format": {"type": "json_object"}},
                             "stream": True},
     {"messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_object"}, "stream": True,
      "stream_options": {"include_usage": True}}),
]


@pytest.mark.parametrize(("name", "given", "expected"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_request(name: str, given: dict[str, Any], expected: dict[str, Any]) -> None:
    assert rc.request({"model": "m", **given}) == {"model": "m", **expected}


BAD: list[tuple[dict[str, Any], str]] = [
    ({"model": "m"}, "'input' is required"),
    ({"model": "m", "input": "x", "previous_response_id": "resp_1"},
     "previous response 'resp_1' not found"),
    ({"model": "m", "input": [{"type": "item_reference", "id": "x"}]},
     "input[0]: item type 'item_reference'"),
    ({"model": "m", "input": [{"role": "tool", "content": "x"}]}, "input[0]: 'role'"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_file"}]}]},
     "input[0].content[0]: part type 'input_file'"),
    ({"model": "m", "input": "x", "tool_choice": 3}, "'tool_choice'"),
    ({"model": "m", "input": "x", "tools": "web_search"}, "'tools' must be a list"),
]


@pytest.mark.parametrize(("body", "message"), BAD)
def test_bad_request(body: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest) as e:
        rc.request(body)
    assert message in e.value.message


def test_count_request() -> None:
    chat = rc.count_request({"model": "m", "input": "hello there", "tools": [FN]})
    assert chat["max_tokens"] == 1 and chat["tool_choice"] == "none"
    assert rc.count_response({"usage": {"prompt_tokens": 9}}) == {
        "object": "response.input_tokens", "input_tokens": 9}


ASK = rc.asked({"model": "m", "input": "x", "max_output_tokens": 4})


def chat_answer(message: dict[str, Any], finish: str) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "model": "up", "choices": [
        {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 4,
                  "prompt_tokens_details": {"cached_tokens": 3}}}


def test_response_text() -> None:
    r = rc.response(chat_answer({"content": "hello"}, "stop"), ASK)
    assert r["id"].startswith("resp_") and r["object"] == "response"
    # Ours, unique: kept conversations are found by it.
    assert r["id"] != rc.response(chat_answer({"content": "hello"}, "stop"), ASK)["id"]
    assert r["status"] == "completed" and r["incomplete_details"] is None
    assert r["model"] == "m" and r["max_output_tokens"] == 4 and r["tools"] == []
    [item] = r["output"]
    assert item["type"] == "message" and item["role"] == "assistant"
    assert item["content"][0]["type"] == "output_text" and item["content"][0]["text"] == "hello"
    assert r["usage"] == {"input_tokens": 10, "output_tokens": 4, "total_tokens": 14,
                          "input_tokens_details": {"cached_tokens": 3},
                          "output_tokens_details": {"reasoning_tokens": 0}}


def test_response_length_is_incomplete() -> None:
    r = rc.response(chat_answer({"content": "hel"}, "length"), ASK)
    assert r["status"] == "incomplete"
    assert r["incomplete_details"] == {"reason": "max_output_tokens"}


def test_response_reasoning_and_calls() -> None:
    r = rc.response(chat_answer({"content": None, "reasoning_content": "why", "tool_calls": [
        {"id": "call_5", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
        "tool_calls"), ASK)
    assert [o["type"] for o in r["output"]] == ["reasoning", "function_call"]
    assert r["output"][0]["content"] == [{"type": "reasoning_text", "text": "why"}]
    assert r["output"][1] == {"type": "function_call", "id": "fc_call_5", "call_id": "call_5",
                              "name": "add", "arguments": "{}", "status": "completed"}


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None,
          usage: dict[str, int] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": "chatcmpl-7", "model": "up",
                           "choices": [] if delta is None else [
                               {"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        out["usage"] = usage
    return out


def run_stream(chunks: list[dict[str, Any]]) -> list[tuple[Any, Any]]:
    s = rc.Stream(rc.asked({"model": "m", "input": "x", "stream": True}))
    events = s.start(chunks[0])
    for c in chunks:
        events += s.feed(c)
    return events + s.finish()


def test_stream_text() -> None:
    events = run_stream([chunk({"role": "assistant"}), chunk({"content": "Hel"}),
                         chunk({"content": "lo"}), chunk({}, "stop"),
                         chunk(usage={"prompt_tokens": 3, "completion_tokens": 2})])
    assert [e for e, _ in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    # Every event names itself and counts up.
    assert all(d["type"] == e for e, d in events)
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    created = events[0][1]["response"]
    assert created["status"] == "in_progress" and created["id"].startswith("resp_")
    item_id = events[2][1]["item"]["id"]
    assert all(d["item_id"] == item_id for e, d in events if "output_text" in e)
    assert events[6][1]["text"] == "Hello"
    final = events[-1][1]["response"]
    assert final["status"] == "completed" and final["id"] == created["id"]
    assert final["output"][0]["content"][0]["text"] == "Hello"
    assert final["usage"]["total_tokens"] == 5


def test_stream_calls_and_length() -> None:
    events = run_stream([
        chunk({"content": "ok"}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "add", "arguments": '{"a"'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}),
        chunk({}, "length"),
    ])
    kinds = [e for e, _ in events]
    assert kinds[-1] == "response.incomplete"
    added = [d["item"] for e, d in events if e == "response.output_item.added"]
    assert [i["type"] for i in added] == ["message", "function_call"]
    assert added[1]["call_id"] == "call_a" and added[1]["status"] == "in_progress"
    deltas = [d["delta"] for e, d in events if e == "response.function_call_arguments.delta"]
    assert deltas == ['{"a"', ": 1}"]
    done = [d for e, d in events if e == "response.function_call_arguments.done"]
    assert done[0]["arguments"] == '{"a": 1}' and done[0]["output_index"] == 1
    final = events[-1][1]["response"]
    assert final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [o["type"] for o in final["output"]] == ["message", "function_call"]


def test_previous_conversation_goes_before_the_new_input() -> None:
    earlier = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    body = {"model": "m", "instructions": "now", "previous_response_id": "resp_x",
            "input": "q2"}
    chat = rc.request(body, earlier)
    assert chat["messages"] == [{"role": "system", "content": "now"}, *earlier,
                                {"role": "user", "content": "q2"}]
    reply = rc.assistant(chat_answer({"content": "a2"}, "stop"))
    assert reply == {"role": "assistant", "content": "a2"}
    # Kept without this call's instructions: a later call brings its own.
    assert rc.history(body, chat, reply) == [*earlier, {"role": "user", "content": "q2"},
                                             reply]
    assert rc.history({**body, "store": False}, chat, reply) is None
    assert rc.count_request(body, earlier)["messages"] == chat["messages"]


def test_stream_assistant_message() -> None:
    s = rc.Stream(rc.asked({"model": "m", "input": "x", "stream": True}))
    s.start({})
    s.feed(chunk({"content": "let me"}))
    s.feed(chunk({"tool_calls": [{"index": 0, "id": "call_q", "type": "function",
                                  "function": {"name": "f", "arguments": "{}"}}]}))
    s.feed(chunk({}, "tool_calls"))
    s.finish()
    assert s.assistant() == {"role": "assistant", "content": "let me", "tool_calls": [
        {"id": "call_q", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    assert rc.assistant(chat_answer({"content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        "tool_calls"))["content"] is None


def test_namespace_calls_come_back_split() -> None:
    ask = rc.asked({"model": "m", "input": "x", "tools": [
        {"type": "namespace", "name": "crm", "tools": [{"type": "function", "name": "find"}]}]})
    assert ask.namespaces == {"crm"}
    r = rc.response(chat_answer({"content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "crm__find", "arguments": "{}"}},
        {"id": "c2", "type": "function", "function": {"name": "x__y", "arguments": "{}"}}]},
        "tool_calls"), ask)
    assert [(o["name"], o.get("namespace")) for o in r["output"]] == [
        ("find", "crm"), ("x__y", None)]
    s = rc.Stream(ask)
    s.start({})
    s.feed(chunk({"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                  "function": {"name": "crm__find", "arguments": "{}"}}]}))
    events = s.finish()
    done = [d["item"] for e, d in events if e == "response.output_item.done"]
    assert done[0]["name"] == "find" and done[0]["namespace"] == "crm"
    # Kept for previous_response_id under the name the model used.
    assert s.assistant()["tool_calls"][0]["function"]["name"] == "crm__find"
