"""Every Ollama <-> llama-server mapping (compat.md part C), table by table."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.calls.streaming import ndjson_line, sse_event_batches, sse_events
from proxy.dialects import ollama_request as rq
from proxy.dialects import stream_translate as st
from proxy.dialects import translate as t
from scheduler.errors import BadRequest, CorralError, UpstreamFailed

# --- options -> sampler fields -----------------------------------------------------------

DEFAULT_SAMPLER = {
    "n_keep": 4,
    "n_predict": -1,
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


@pytest.mark.parametrize(
    ("options", "changed"),
    [
        (None, {}),
        ({}, {}),
        ({"temperature": 0.2}, {"temperature": 0.2}),
        ({"temperature": 1}, {"temperature": 1.0}),
        ({"num_predict": 16}, {"n_predict": 16}),
        ({"num_predict": 16.0}, {"n_predict": 16}),
        ({"num_predict": -2}, {"n_predict": -2}),
        ({"num_keep": 0}, {"n_keep": 0}),
        ({"top_k": 1, "top_p": 0.5, "min_p": 0.1}, {"top_k": 1, "top_p": 0.5, "min_p": 0.1}),
        ({"typical_p": 0.7}, {"typical_p": 0.7}),
        ({"repeat_penalty": 1.1, "repeat_last_n": 32},
         {"repeat_penalty": 1.1, "repeat_last_n": 32}),
        ({"presence_penalty": 0.5, "frequency_penalty": 0.25},
         {"presence_penalty": 0.5, "frequency_penalty": 0.25}),
        ({"seed": 42}, {"seed": 42}),
        ({"seed": -1}, {}),  # random: llama-server's default, not 2**32-1
        ({"stop": ["\n", "User:"]}, {"stop": ["\n", "User:"]}),
        ({"stop": "END"}, {"stop": ["END"]}),  # a bare string is wrapped in a list
        ({"stop": []}, {}),
        ({"mirostat": 2, "mirostat_tau": 5, "mirostat_eta": 0.1},
         {"mirostat": 2, "mirostat_tau": 5.0, "mirostat_eta": 0.1}),
        # load-time and legacy options are accepted and ignored
        ({"num_ctx": 8192, "num_gpu": 99, "num_thread": 4, "num_batch": 512, "use_mmap": False,
          "main_gpu": 0, "numa": True, "low_vram": True, "f16_kv": True, "use_mlock": False,
          "tfs_z": 1.0, "penalize_newline": True}, {}),
        ({"no_such_option": 1}, {}),
        ({"temperature": None}, {"temperature": 0.8}),
    ],
)
def test_sampler_params(options: Any, changed: dict[str, Any]) -> None:
    assert t.sampler_params(options) == {**DEFAULT_SAMPLER, **changed}


@pytest.mark.parametrize(
    "options",
    [
        "fast",
        [1, 2],
        {"temperature": "hot"},
        {"temperature": True},
        {"num_predict": 1.5},
        {"top_k": [1]},
        {"stop": 3},
        {"stop": ["a", 1]},
        # Integers past a float or an int64 (issue 25: OverflowError, a 500).
        {"temperature": 10**400},
        {"seed": 10**400},
        {"num_predict": 2**63},
        {"top_k": -(10**30)},
    ],
)
def test_sampler_params_rejects_wrong_types(options: Any) -> None:
    with pytest.raises(BadRequest):
        t.sampler_params(options)


def test_defaults_differ_from_llama_server_where_it_matters() -> None:
    # llama-server would use top_p 0.95 and min_p 0.05: both must be sent.
    assert t.sampler_params({})["top_p"] == 0.9
    assert t.sampler_params({})["min_p"] == 0.0


# --- keep_alive ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        (0, 0.0),
        (0.0, 0.0),
        ("0", 0.0),
        ("0s", 0.0),
        (300, 300.0),
        (1.5, 1.5),
        ("300", 300.0),  # a 400 in Ollama; read leniently as seconds
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("300ms", 0.3),
        ("2m30s", 150.0),
        ("-1m", -1.0),
        ("-1", -1.0),
        (-5, -1.0),
        (-1, -1.0),
        # Beyond ~292 years is forever, however many digits (a 500 in issue 25).
        (10**400, -1.0),
        (-(10**400), -1.0),
        ("9" * 400, -1.0),
        ("9" * 400 + "s", -1.0),
    ],
)
def test_keep_alive_seconds(value: Any, seconds: float | None) -> None:
    got = t.keep_alive_seconds(value)
    assert got == (pytest.approx(seconds) if seconds is not None else None)


@pytest.mark.parametrize("value", ["soon", "5x", "m5", "", True, [], {"s": 1}, "1h 30m"])
def test_keep_alive_rejects(value: Any) -> None:
    with pytest.raises(BadRequest):
        t.keep_alive_seconds(value)


# --- think and format -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("think", "kwargs"),
    [
        (None, None),
        (True, {"enable_thinking": True}),
        (False, {"enable_thinking": False}),
        ("low", {"enable_thinking": True, "reasoning_effort": "low"}),
        ("medium", {"enable_thinking": True, "reasoning_effort": "medium"}),
        ("high", {"enable_thinking": True, "reasoning_effort": "high"}),
        ("max", {"enable_thinking": True, "reasoning_effort": "max"}),
    ],
)
def test_think(think: Any, kwargs: dict[str, Any] | None) -> None:
    assert t.template_kwargs(t.parse_think(think)) == kwargs


@pytest.mark.parametrize("think", ["yes", 1, "HIGH", {}])
def test_think_rejects(think: Any) -> None:
    with pytest.raises(BadRequest):
        t.parse_think(think)


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize(
    ("fmt", "chat", "completion"),
    [
        (None, None, None),
        ("", None, None),
        ("json", {"type": "json_object"}, {"json_schema": {}}),
        (SCHEMA, {"type": "json_schema", "json_schema": {"name": "schema", "schema": SCHEMA}},
         {"json_schema": SCHEMA}),
    ],
)
def test_format(fmt: Any, chat: Any, completion: Any) -> None:
    assert t.response_format(fmt) == chat
    assert t.completion_format(fmt) == completion


@pytest.mark.parametrize("fmt", ["xml", 3, ["json"], True])
def test_format_rejects(fmt: Any) -> None:
    with pytest.raises(BadRequest, match="invalid format"):
        t.response_format(fmt)


# --- images and messages ------------------------------------------------------------------


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


PNG = b64(b"\x89PNG\r\n\x1a\n" + bytes(24))
JPEG = b64(b"\xff\xd8\xff\xe0" + bytes(24))


@pytest.mark.parametrize(
    ("data", "url"),
    [
        (PNG, f"data:image/png;base64,{PNG}"),
        (JPEG, f"data:image/jpeg;base64,{JPEG}"),
        (b64(b"GIF89a" + bytes(10)), f"data:image/gif;base64,{b64(b'GIF89a' + bytes(10))}"),
        (b64(b"RIFF\0\0\0\0WEBPVP8 " + bytes(8)),
         f"data:image/webp;base64,{b64(b'RIFF' + bytes(4) + b'WEBPVP8 ' + bytes(8))}"),
        (b64(b"something else"), f"data:image/jpeg;base64,{b64(b'something else')}"),
        (f"data:image/png;base64,{PNG}", f"data:image/png;base64,{PNG}"),  # prefix kept once
    ],
)
def test_image_url(data: str, url: str) -> None:
    assert rq.image_url(data) == url


@pytest.mark.parametrize("data", ["", 3, None, "!!!notbase64"])
def test_image_url_rejects(data: Any) -> None:
    with pytest.raises(BadRequest):
        rq.image_url(data)


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([], []),
        ([{"role": "User", "content": "hi"}], [{"role": "user", "content": "hi"}]),
        ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
         [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]),
        # thinking on history is dropped; missing content is ""
        ([{"role": "assistant", "thinking": "hmm", "content": None}],
         [{"role": "assistant", "content": ""}]),
        # images become content parts with data URLs
        ([{"role": "user", "content": "what is this?", "images": [PNG]}],
         [{"role": "user", "content": [
             {"type": "text", "text": "what is this?"},
             {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]}]),
        ([{"role": "user", "content": "", "images": [JPEG]}],
         [{"role": "user", "content": [
             {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{JPEG}"}}]}]),
        # tool calls: object arguments become a JSON string; ids are synthesised when
        # missing; the tool result is paired with the call by name
        ([{"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}]},
          {"role": "tool", "content": "11 degrees", "tool_name": "get_weather"}],
         [{"role": "assistant", "content": "", "tool_calls": [
             {"id": "call_0_0", "type": "function", "index": 0,
              "function": {"name": "get_weather", "arguments": '{"city":"Tokyo"}'}}]},
          {"role": "tool", "content": "11 degrees", "tool_call_id": "call_0_0",
           "name": "get_weather"}]),
        # ids as given are kept; results pair by name, then in order
        ([{"role": "assistant", "content": "", "tool_calls": [
            {"id": "a", "function": {"index": 0, "name": "f", "arguments": {}}},
            {"id": "b", "function": {"index": 1, "name": "g", "arguments": '{"x":1}'}}]},
          {"role": "tool", "content": "G", "tool_name": "g"},
          {"role": "tool", "content": "F"}],
         [{"role": "assistant", "content": "", "tool_calls": [
             {"id": "a", "type": "function", "index": 0,
              "function": {"name": "f", "arguments": "{}"}},
             {"id": "b", "type": "function", "index": 1,
              "function": {"name": "g", "arguments": '{"x":1}'}}]},
          {"role": "tool", "content": "G", "tool_call_id": "b", "name": "g"},
          {"role": "tool", "content": "F", "tool_call_id": "a"}]),
        # an explicit tool_call_id (Open WebUI sends one) wins
        ([{"role": "tool", "content": "x", "tool_call_id": "call_9", "tool_name": "f"}],
         [{"role": "tool", "content": "x", "tool_call_id": "call_9", "name": "f"}]),
    ],
)
def test_openai_messages(messages: Any, expected: Any) -> None:
    assert rq.openai_messages(messages) == expected


@pytest.mark.parametrize(
    "messages",
    [
        "hi",
        ["hi"],
        [{"content": "no role"}],
        [{"role": "user", "content": 3}],
        [{"role": "user", "content": "x", "images": "abc"}],
        [{"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}],
        [{"role": "assistant", "tool_calls": "f"}],
    ],
)
def test_openai_messages_rejects(messages: Any) -> None:
    with pytest.raises(BadRequest):
        rq.openai_messages(messages)


# --- request bodies -------------------------------------------------------------------------


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def test_chat_body() -> None:
    body = rq.chat_body(
        {"model": "m:latest", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
         "format": "json", "think": False, "options": {"temperature": 0, "num_ctx": 4096},
         "keep_alive": "5m", "stream": False, "logprobs": True, "top_logprobs": 3},
        "m",
    )
    assert body == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        # always streamed upstream: the same loop serves streamed and whole answers
        "stream": True,
        "stream_options": {"include_usage": True},
        "cache_prompt": True,
        **DEFAULT_SAMPLER,
        "temperature": 0.0,
        "logprobs": True,
        "top_logprobs": 3,
        "chat_template_kwargs": {"enable_thinking": False},
        "tools": TOOLS,
        "response_format": {"type": "json_object"},
    }


@pytest.mark.parametrize(("num_predict", "max_tokens"), [(None, None), (-1, None), (0, 0),
                                                          (16, 16)])
def test_num_predict_is_mirrored_as_max_tokens_for_remote_upstreams(
    num_predict: int | None, max_tokens: int | None
) -> None:
    body = rq.chat_body({"messages": [], "options": {"num_predict": num_predict}}, "m")
    assert body.get("max_tokens") == max_tokens


@pytest.mark.parametrize("top", [21, -1, True, "3"])
def test_top_logprobs_bounds(top: Any) -> None:
    with pytest.raises(BadRequest):
        rq.chat_body({"messages": [], "top_logprobs": top}, "m")


@pytest.mark.parametrize(
    ("req", "path", "expected"),
    [
        ({"prompt": "hi"}, "/v1/chat/completions",
         {"messages": [{"role": "user", "content": "hi"}]}),
        ({"prompt": "hi", "system": "be brief"}, "/v1/chat/completions",
         {"messages": [{"role": "system", "content": "be brief"},
                       {"role": "user", "content": "hi"}]}),
        ({"prompt": "hi", "images": [PNG]}, "/v1/chat/completions",
         {"messages": [{"role": "user", "content": [
             {"type": "text", "text": "hi"},
             {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]}]}),
        ({"prompt": "hi", "think": True, "template": "{{ .Prompt }}", "context": [1, 2]},
         "/v1/chat/completions",
         {"messages": [{"role": "user", "content": "hi"}],
          "chat_template_kwargs": {"enable_thinking": True}}),
        ({"prompt": "Once", "raw": True, "format": SCHEMA}, "/v1/completions",
         {"prompt": "Once", "json_schema": SCHEMA}),
        ({"prompt": "def f(", "suffix": "return x"}, "/infill",
         {"input_prefix": "def f(", "input_suffix": "return x"}),
    ],
)
def test_generate_call(req: dict[str, Any], path: str, expected: dict[str, Any]) -> None:
    got_path, body = rq.generate_call(req, "m")
    assert got_path == path
    for key, value in expected.items():
        assert body[key] == value
    assert body["model"] == "m"
    assert body["stream"] is True
    assert body["top_p"] == 0.9
    if path == "/infill":
        assert "stream_options" not in body


@pytest.mark.parametrize(
    "req",
    [
        {"prompt": "x", "raw": True, "system": "s"},
        {"prompt": "x", "raw": True, "template": "t"},
        {"prompt": "x", "raw": True, "context": [1]},
        {"prompt": 3},
        {"prompt": "x", "suffix": 3},
        {"prompt": "x", "format": "yaml"},
    ],
)
def test_generate_call_rejects(req: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        rq.generate_call(req, "m")


# --- embeddings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, []), ("", []), ("a", ["a"]), (["a", "b"], ["a", "b"]), ([], [])],
)
def test_embed_inputs(value: Any, expected: list[str]) -> None:
    assert t.embed_inputs(value) == expected


@pytest.mark.parametrize("value", [3, ["a", 1], {"a": 1}])
def test_embed_inputs_rejects(value: Any) -> None:
    with pytest.raises(BadRequest, match="invalid input type"):
        t.embed_inputs(value)


@pytest.mark.parametrize(
    ("vector", "dims", "expected"),
    [
        ([0.6, 0.8], None, [0.6, 0.8]),
        ([0.6, 0.8], 5, [0.6, 0.8]),
        ([0.6, 0.8, 0.0], 1, [1.0]),
        ([3.0, 4.0, 12.0], 2, [0.6, 0.8]),
        ([0.0, 0.0, 1.0], 2, [0.0, 0.0]),
    ],
)
def test_truncate_dims(vector: list[float], dims: int | None, expected: list[float]) -> None:
    got = t.truncate_dims(vector, dims)
    assert got == pytest.approx(expected)
    if any(got):
        assert math.isclose(math.sqrt(sum(x * x for x in got)), 1.0)


def test_embeddings_of_orders_by_index() -> None:
    body = {"data": [{"index": 1, "embedding": [2.0]}, {"index": 0, "embedding": [1.0]}],
            "usage": {"prompt_tokens": 7}}
    assert t.embeddings_of(body) == ([[1.0], [2.0]], 7)


# --- metrics --------------------------------------------------------------------------------

TIMINGS = {"cache_n": 3, "prompt_n": 22, "prompt_ms": 226.982, "predicted_n": 5,
           "predicted_ms": 88.8925, "predicted_per_second": 56.25}


@pytest.mark.parametrize(
    ("timings", "usage", "expected"),
    [
        (TIMINGS, None, {"prompt_eval_count": 25, "prompt_eval_duration": 226_982_000,
                         "eval_count": 5, "eval_duration": 88_892_500}),
        # usage alone (a remote without timings): counts, no durations
        (None, {"prompt_tokens": 9, "completion_tokens": 4},
         {"prompt_eval_count": 9, "eval_count": 4, "eval_duration": 1}),
        # zeros are left out (omitempty); eval_duration >= 1 ns with tokens
        ({"prompt_n": 0, "prompt_ms": 0, "predicted_n": 2, "predicted_ms": 0.0000001},
         None, {"eval_count": 2, "eval_duration": 1}),
        (None, None, {}),
    ],
)
def test_durations(timings: Any, usage: Any, expected: dict[str, int]) -> None:
    got = st.durations(timings, usage)
    assert got == expected
    assert all(isinstance(v, int) for v in got.values())


@pytest.mark.parametrize(
    ("finish", "reason"),
    [("stop", "stop"), ("length", "length"), ("tool_calls", "stop"), (None, "stop")],
)
def test_done_reason(finish: str | None, reason: str) -> None:
    assert st.done_reason(finish) == reason


@pytest.mark.parametrize(
    ("finish", "stop_type", "reason"),
    [
        ("stop", None, "eosFound"),
        ("length", None, "maxPredictedTokensReached"),
        ("tool_calls", None, "toolCalls"),
        ("stop", "eos", "eosFound"),
        ("stop", "word", "stopStringFound"),
        ("length", "limit", "maxPredictedTokensReached"),
        (None, None, "eosFound"),
    ],
)
def test_lmstudio_stop_reason(finish: str | None, stop_type: str | None, reason: str) -> None:
    assert st.lmstudio_stop_reason(finish, stop_type) == reason


def test_lmstudio_stats() -> None:
    assert st.lmstudio_stats(TIMINGS, "length") == {
        "tokens_per_second": 56.25,
        "time_to_first_token": pytest.approx(0.226982),
        "generation_time": pytest.approx(0.0888925),
        "stop_reason": "maxPredictedTokensReached",
    }


# --- names, times, errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "tag"),
    [("gemma", "gemma:latest"), ("gemma:270m", "gemma:270m"), ("a/b", "a/b:latest"),
     ("host:5000/a", "host:5000/a:latest"), ("x:latest", "x:latest")],
)
def test_tagged(name: str, tag: str) -> None:
    assert t.tagged(name) == tag


@pytest.mark.parametrize(
    ("name", "candidates"),
    [("gemma", ["gemma"]), ("gemma:latest", ["gemma:latest", "gemma"]), ("g:2b", ["g:2b"])],
)
def test_name_candidates(name: str, candidates: list[str]) -> None:
    assert t.name_candidates(name) == candidates


@pytest.mark.parametrize(
    ("n", "text"),
    [(8_000_000_000, "8B"), (7_615_616_512, "7.6B"), (137_000_000, "137M"),
     (22_566_000, "22.57M"), (268_098_176, "268.10M"), (500_000, "500K"), (999, "999")],
)
def test_human_number(n: int, text: str) -> None:
    assert t.human_number(n) == text


def test_rfc3339() -> None:
    assert t.rfc3339(1726175849.110811) == "2024-09-12T21:17:29.110811Z"


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        ({"error": {"code": 400, "message": "too long", "type": "exceed_context_size_error"}},
         400, "too long"),
        ({"error": {"code": 501, "message": "no infill"}}, 501, "no infill"),
        ({"error": {"message": "boom"}}, 502, "boom"),
        ("plain text", 502, "plain text"),
    ],
)
def test_upstream_error(payload: Any, status: int, message: str) -> None:
    err = t.upstream_error(payload)
    assert (err.status, err.message) == (status, message)


def test_upstream_error_body_keeps_status() -> None:
    err = t.upstream_error_body(500, b"not json")
    assert (err.status, err.message) == (500, "not json")


# --- the stream: llama-server SSE -> Ollama NDJSON ------------------------------------------


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None,
          **extra: Any) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"object": "chat.completion.chunk", "choices": choices, **extra}


def stream(kind: str = "chat", **kw: Any) -> st.OllamaStream:
    return st.OllamaStream(kind, "m:latest", now=lambda: "T", **kw)  # type: ignore[arg-type]


def run(state: st.OllamaStream, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    lines = [line for e in events if (line := state.feed(e)) is not None]
    return lines + state.tail(total_ns=1000, load_ns=10)


def test_stream_content_usage_and_done() -> None:
    events = [
        chunk({"role": "assistant", "content": None}),
        chunk({"content": "Hel"}),
        chunk({"content": "lo"}),
        chunk({}, "stop"),
        chunk(None, usage={"prompt_tokens": 25, "completion_tokens": 2}, timings=TIMINGS),
    ]
    assert run(stream(), events) == [
        {"model": "m:latest", "created_at": "T",
         "message": {"role": "assistant", "content": "Hel"}, "done": False},
        {"model": "m:latest", "created_at": "T",
         "message": {"role": "assistant", "content": "lo"}, "done": False},
        {"model": "m:latest", "created_at": "T", "message": {"role": "assistant", "content": ""},
         "done": True, "done_reason": "stop", "total_duration": 1000, "load_duration": 10,
         "prompt_eval_count": 25, "prompt_eval_duration": 226_982_000, "eval_count": 5,
         "eval_duration": 88_892_500},
    ]


def test_stream_thinking_goes_to_its_own_field() -> None:
    events = [chunk({"reasoning_content": "hmm"}), chunk({"reasoning": " ok"}),
              chunk({"content": "4"}), chunk({}, "length")]
    lines = run(stream(), events)
    assert [line["message"] for line in lines[:3]] == [
        {"role": "assistant", "content": "", "thinking": "hmm"},
        {"role": "assistant", "content": "", "thinking": " ok"},
        {"role": "assistant", "content": "4"},
    ]
    assert lines[-1]["done_reason"] == "length"


def test_stream_drops_thinking_when_think_is_false() -> None:
    lines = run(stream(show_thinking=False),
                [chunk({"reasoning_content": "hmm"}), chunk({"content": "4"}), chunk({}, "stop")])
    assert [line["message"] for line in lines] == [
        {"role": "assistant", "content": "4"}, {"role": "assistant", "content": ""}]


def test_stream_accumulates_tool_call_fragments() -> None:
    events = [
        chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty":"Tokyo"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_2",
                               "function": {"name": "now", "arguments": ""}}]}),
        chunk({}, "tool_calls"),
    ]
    lines = run(stream(), events)
    assert lines[0] == {
        "model": "m:latest", "created_at": "T", "done": False,
        "message": {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "function": {"index": 0, "name": "get_weather",
                                          "arguments": {"city": "Tokyo"}}},
            {"id": "call_2", "function": {"index": 1, "name": "now", "arguments": {}}},
        ]},
    }
    assert lines[1]["done"] is True
    assert lines[1]["done_reason"] == "stop"  # tool_calls is "stop" in Ollama


def test_stream_whole_answer_aggregates() -> None:
    state = stream()
    for e in [chunk({"reasoning_content": "a"}), chunk({"content": "b"}),
              chunk({"content": "c"}),
              chunk({"tool_calls": [{"index": 0, "id": "x",
                                     "function": {"name": "f", "arguments": '{"k":1}'}}]}),
              chunk({}, "stop", timings=TIMINGS)]:
        state.feed(e)
    whole = state.whole(total_ns=5, load_ns=0)
    assert whole["message"] == {
        "role": "assistant", "content": "bc", "thinking": "a",
        "tool_calls": [{"id": "x", "function": {"index": 0, "name": "f", "arguments": {"k": 1}}}],
    }
    assert whole["done"] is True
    assert "load_duration" not in whole  # omitempty
    assert whole["eval_count"] == 5


def test_stream_invalid_tool_arguments_is_an_error() -> None:
    state = stream()
    state.feed(chunk({"tool_calls": [{"index": 0, "function": {"name": "f",
                                                               "arguments": "{nope"}}]}))
    state.feed(chunk({}, "tool_calls"))
    with pytest.raises(UpstreamFailed, match="invalid arguments"):
        state.tail(1, 0)


def test_stream_error_event_raises_with_upstream_status() -> None:
    with pytest.raises(CorralError) as info:
        stream().feed({"error": {"code": 400, "message": "context exceeded"}})
    assert info.value.status == 400


def test_stream_that_never_finished_is_an_error() -> None:
    state = stream()
    state.feed(chunk({"content": "partial"}))
    with pytest.raises(UpstreamFailed, match="before the answer was finished"):
        state.tail(1, 0)


def test_generate_stream_reads_completion_chunks() -> None:
    events = [
        {"choices": [{"text": "Once", "index": 0, "finish_reason": None}]},
        {"choices": [{"text": " upon", "index": 0, "finish_reason": None}]},
        {"choices": [{"text": "", "index": 0, "finish_reason": "length"}], "timings": TIMINGS},
    ]
    lines = run(stream("generate"), events)
    assert [line["response"] for line in lines] == ["Once", " upon", ""]
    assert lines[-1]["done_reason"] == "length"
    assert "message" not in lines[0]


def test_generate_stream_reads_native_infill_events() -> None:
    events = [{"content": "x", "stop": False},
              {"content": "", "stop": True, "stop_type": "limit", "timings": TIMINGS}]
    lines = run(stream("generate"), events)
    assert lines[0]["response"] == "x"
    assert lines[-1]["done_reason"] == "length"
    assert lines[-1]["eval_count"] == 5


def test_stream_passes_logprobs() -> None:
    lp = [{"token": "a", "logprob": -0.1, "bytes": [97], "top_logprobs": []}]
    state = stream()
    line = state.feed({"choices": [{"delta": {"content": "a"}, "logprobs": {"content": lp},
                                    "finish_reason": None}]})
    assert line is not None and line["logprobs"] == lp
    state.feed(chunk({}, "stop"))
    assert state.whole(1, 0)["logprobs"] == lp


def test_probe_lines() -> None:
    chat = st.probe_line("chat", "m:latest", "load")
    assert chat["message"] == {"role": "assistant", "content": ""}
    assert (chat["done"], chat["done_reason"]) == (True, "load")
    gen = st.probe_line("generate", "m:latest", "unload")
    assert (gen["response"], gen["done_reason"]) == ("", "unload")


class _Content:
    """Network reads of ``size`` bytes: lines arrive split across reads."""

    def __init__(self, raw: bytes, size: int) -> None:
        self.reads = [raw[i : i + size] for i in range(0, len(raw), size)]

    async def iter_any(self) -> AsyncIterator[bytes]:
        for chunk in self.reads:
            yield chunk

    async def readany(self) -> bytes:
        return self.reads.pop(0) if self.reads else b""


class _Resp:
    def __init__(self, raw: bytes, size: int) -> None:
        self.content = _Content(raw, size)


async def ndjson_of(raw: bytes, size: int) -> bytes:
    state = stream()
    out = b""
    async for event in sse_events(_Resp(raw, size)):  # type: ignore[arg-type]
        line = state.feed(event)
        if line is not None:
            out += ndjson_line(line)
    for line in state.tail(1, 0):
        out += ndjson_line(line)
    return out


@pytest.mark.parametrize("size", [1, 7, 1 << 20])
async def test_sse_to_ndjson_skips_pings_and_blank_lines(size: int) -> None:
    raw = (
        b": ping\n\n"
        b'data: {"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}\n\n'
        b"\n"
        b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
        b"data: [DONE]\n\n"
        b'data: {"choices":[{"index":0,"delta":{"content":"after done"}}]}\n\n'
    )
    out = await ndjson_of(raw, size)
    lines = out.split(b"\n")
    assert lines[-1] == b""  # every line ends with \n, and there are no blank lines
    parsed = [json.loads(line) for line in lines[:-1]]
    assert [p["message"]["content"] for p in parsed] == ["a", ""]
    assert parsed[-1]["done"] is True


@pytest.mark.parametrize(
    "error_line",
    [b'data: {"error":{"code":500,"message":"boom","type":"server_error"}}\n\n',
     b'error: {"code":500,"message":"boom","type":"server_error"}\n\n'],
)
async def test_sse_error_shapes_become_errors(error_line: bytes) -> None:
    raw = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n' + error_line
    with pytest.raises(CorralError, match="boom") as info:
        await ndjson_of(raw, 5)
    assert info.value.status == 500


async def test_sse_batches_follow_network_reads() -> None:
    one = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
    raw = one * 3 + b"data: [DONE]\n\n"
    batches = [b async for b in sse_event_batches(_Resp(raw, len(one) * 2))]  # type: ignore[arg-type]
    assert [len(b) for b in batches] == [2, 1]


async def test_sse_last_line_without_newline() -> None:
    raw = b'data: {"choices":[],"usage":{"prompt_tokens":1}}'
    events = [e async for e in sse_events(_Resp(raw, 4))]  # type: ignore[arg-type]
    assert events == [{"choices": [], "usage": {"prompt_tokens": 1}}]
