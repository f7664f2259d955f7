"""The ``anthropic`` and ``openai`` (Responses) clients against a chat-only upstream:
fake llama-servers that refuse /v1/messages and /v1/responses (404, like an old vLLM),
declared ``api = ["chat"]``. Streamed and not, a tool-use round trip each, token
counting, errors in each family's envelope; and the pass-through left untouched for
an upstream that speaks the family."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from tests.conftest import make_config

REFUSING = {"FAKE_REFUSE": "messages,responses", "FAKE_TOOL_CALLS": "1"}
MODELS = [
    # Declared vision-capable: Corral refuses images to a model without a projector.
    {"name": "chat-only", "api": ["chat"], "env": REFUSING,
     "capabilities": ["chat", "completion", "tools", "vision"]},
    # The same server, not declared: Corral learns from its 404s.
    {"name": "undeclared", "env": REFUSING},
    {"name": "native"},
    {"name": "stops", "api": ["chat"], "env": {"FAKE_STOP_AFTER": "2"}},
    {"name": "emb-only", "api": ["embeddings"], "embedding": True,
     "capabilities": ["chat"]},
]
TOOLS = [{"name": "add", "description": "Add two numbers", "input_schema": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}]
FN_TOOLS = [{"type": "function", "name": "add", "description": "Add two numbers",
             "parameters": TOOLS[0]["input_schema"]}]


@pytest.fixture
async def ports(corral_ports: Any, tmp_path: Path) -> Any:
    return await corral_ports(make_config(tmp_path, MODELS))


@pytest.fixture
async def clients() -> AsyncIterator[list[Any]]:
    """SDK clients made by a test, closed after it (their pools hold sockets)."""
    made: list[Any] = []
    yield made
    for client in made:
        await client.close()


@pytest.fixture
def claude(clients: list[Any]) -> Callable[[Any], anthropic.AsyncAnthropic]:
    def make(c: Any) -> anthropic.AsyncAnthropic:
        client = anthropic.AsyncAnthropic(base_url=str(c.make_url("")), api_key="x",
                                          max_retries=0)
        clients.append(client)
        return client

    return make


@pytest.fixture
def oai(clients: list[Any]) -> Callable[[Any], openai.AsyncOpenAI]:
    def make(c: Any) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=str(c.make_url("/v1")), api_key="x",
                                    max_retries=0)
        clients.append(client)
        return client

    return make


async def seen(ports: Any, model: str) -> list[dict[str, Any]]:
    """What the fake serving ``model`` received, as /fake/requests lists it."""
    from proxy.keys import SCHEDULER

    scheduler = ports.openai.app[SCHEDULER]
    out: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as s:
        for inst in scheduler.loaded(model):
            async with s.get(inst.base_url + "/fake/requests") as r:
                out += await r.json()
    return out


async def test_messages_translated_on_every_port(ports: Any, claude: Any) -> None:
    for name, c in (("main", ports.openai), ("ollama", ports.ollama),
                    ("lmstudio", ports.lmstudio)):
        client = claude(c)
        raw = await client.messages.with_raw_response.create(
            model="chat-only", max_tokens=3, system="be brief",
            messages=[{"role": "user", "content": "a b c"}])
        assert raw.headers["X-Corral-Translated"] == "chat", name
        assert raw.headers["X-Corral-Model"] == "chat-only"
        msg = await raw.parse()
        assert msg.type == "message" and msg.role == "assistant", name
        assert msg.content[0].type == "text" and msg.content[0].text == "a b c"
        assert msg.stop_reason == "max_tokens" and msg.model == "chat-only"
        assert msg.usage.output_tokens == 3 and msg.usage.input_tokens > 0
    # Counted as translated: one series per port's dialect, one call each.
    text = await (await ports.openai.get("/metrics")).text()
    translated = [line for line in text.splitlines()
                  if line.startswith("corral_translated_requests_total{")]
    assert len(translated) == 3 and all(
        'model="chat-only"' in line and 'endpoint="/v1/messages"' in line
        and line.endswith(" 1.0") for line in translated), translated
    calls = await seen(ports, "chat-only")
    assert {c["path"] for c in calls} == {"/v1/chat/completions"}
    assert calls[-1]["body"]["messages"] == [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": "a b c"}]
    assert calls[-1]["body"]["max_tokens"] == 3
    # Anthropic's headers stay with Anthropic's body: the chat call has none.
    assert "anthropic-version" not in {k.lower() for k in calls[-1]["headers"]}


async def test_messages_streamed(ports: Any, claude: Any) -> None:
    client = claude(ports.openai)
    async with client.messages.stream(model="chat-only", max_tokens=4,
                                      messages=[{"role": "user", "content": "x y"}]) as s:
        text = "".join([t async for t in s.text_stream])
        final = await s.get_final_message()
    assert text == "x y x y"
    assert final.content[0].text == text  # type: ignore[union-attr]
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 4
    assert final.usage.input_tokens > 0
    body = (await seen(ports, "chat-only"))[-1]["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    # The raw event order a client without the SDK reads.
    r = await ports.openai.post("/v1/messages", json={
        "model": "chat-only", "max_tokens": 2, "stream": True,
        "messages": [{"role": "user", "content": "q"}]})
    assert r.headers["Content-Type"].startswith("text/event-stream")
    events = [line[7:] for line in (await r.text()).splitlines() if line.startswith("event: ")]
    assert events == ["message_start", "ping", "content_block_start", "content_block_delta",
                      "content_block_delta", "content_block_stop", "message_delta",
                      "message_stop"]


async def test_tool_use_round_trip(ports: Any, claude: Any) -> None:
    client = claude(ports.openai)
    ask: list[Any] = [{"role": "user", "content": "add 2 and 3"}]
    msg = await client.messages.create(model="chat-only", max_tokens=16, tools=TOOLS,  # type: ignore[arg-type]
                                       tool_choice={"type": "any"}, messages=ask)
    assert msg.stop_reason == "tool_use"
    [use] = [b for b in msg.content if b.type == "tool_use"]
    assert use.name == "add" and use.input == {"a": 2, "b": 3}
    sent = (await seen(ports, "chat-only"))[-1]["body"]
    assert sent["tools"][0]["function"]["name"] == "add" and sent["tool_choice"] == "required"
    # The same call streamed: the input arrives as input_json_delta and assembles.
    async with client.messages.stream(model="chat-only", max_tokens=16, tools=TOOLS,  # type: ignore[arg-type]
                                      messages=ask) as s:
        streamed = await s.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert [b.input for b in streamed.content if b.type == "tool_use"] == [{"a": 2, "b": 3}]
    # The result goes back; the model answers in text.
    follow = await client.messages.create(
        model="chat-only", max_tokens=2, tools=TOOLS,  # type: ignore[arg-type]
        messages=[*ask, {"role": "assistant", "content": msg.content},  # type: ignore[list-item]
                  {"role": "user", "content": [
                      {"type": "tool_result", "tool_use_id": use.id, "content": "five"}]}])
    assert follow.stop_reason == "max_tokens" and follow.content[0].type == "text"
    sent = (await seen(ports, "chat-only"))[-1]["body"]["messages"]
    assert sent[1]["tool_calls"][0]["id"] == use.id
    assert json.loads(sent[1]["tool_calls"][0]["function"]["arguments"]) == {"a": 2, "b": 3}
    assert sent[2] == {"role": "tool", "tool_call_id": use.id, "content": "five"}


async def test_images_become_image_url_parts(ports: Any, claude: Any) -> None:
    client = claude(ports.openai)
    await client.messages.create(model="chat-only", max_tokens=1, messages=[
        {"role": "user", "content": [
            {"type": "text", "text": "what"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBORw0KGgo="}}]}])
    parts = (await seen(ports, "chat-only"))[-1]["body"]["messages"][0]["content"]
    assert parts[1] == {"type": "image_url",
                        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


async def test_count_tokens_through_the_chat_path(ports: Any, claude: Any) -> None:
    client = claude(ports.openai)
    count = await client.messages.count_tokens(
        model="chat-only", messages=[{"role": "user", "content": "one two three"}])
    # The fake counts a word a token plus 4 per message: what its chat usage says.
    assert count.input_tokens == 7
    sent = (await seen(ports, "chat-only"))[-1]
    assert sent["path"] == "/v1/chat/completions" and sent["body"]["max_tokens"] == 1
    r = await ports.openai.post("/v1/responses/input_tokens", json={
        "model": "chat-only", "input": "one two three"})
    assert r.status == 200
    assert await r.json() == {"object": "response.input_tokens", "input_tokens": 7}


async def test_errors_in_anthropics_envelope(ports: Any, claude: Any) -> None:
    client = claude(ports.openai)
    # Refused by the translation: chat has no place for a document block.
    with pytest.raises(anthropic.BadRequestError) as e:
        await client.messages.create(
            model="chat-only", max_tokens=4, messages=[{"role": "user", "content": [
                {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                                "data": "x"}}]}])
    assert e.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "block type 'document'" in e.value.body["error"]["message"]  # type: ignore[index]
    # Refused before a lease: nothing was launched for it.
    from proxy.keys import SCHEDULER

    assert not ports.openai.app[SCHEDULER].loaded("chat-only")
    # Refused by the upstream (no messages): its 400 comes back in Anthropic's shape.
    with pytest.raises(anthropic.BadRequestError) as e:
        await client.messages.create(model="chat-only", max_tokens=4, messages=[])
    assert e.value.body["type"] == "error"  # type: ignore[index]
    assert "'messages' is required" in e.value.body["error"]["message"]  # type: ignore[index]
    # Malformed JSON never reaches the upstream.
    r = await ports.openai.post("/v1/messages", data=b'{"model": "chat-only", "max_tokens": ',
                                headers={"Content-Type": "application/json"})
    assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error"
    # An upstream that speaks neither the family nor chat.
    r = await ports.openai.post("/v1/messages", json={
        "model": "emb-only", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]})
    assert r.status == 400
    assert "neither Anthropic Messages nor chat completions" in (
        await r.json())["error"]["message"]
    assert not ports.openai.app[SCHEDULER].loaded("emb-only")  # refused before a lease


async def test_responses_translated(ports: Any, oai: Any) -> None:
    client = oai(ports.lmstudio)
    raw = await client.responses.with_raw_response.create(
        model="chat-only", input="hello world", instructions="be brief")
    assert raw.headers["X-Corral-Translated"] == "chat"
    resp = raw.parse()
    assert resp.status == "completed" and resp.output_text.startswith("hello world")
    assert resp.usage is not None and resp.usage.output_tokens == 8
    short = await client.responses.create(model="chat-only", input="a b", max_output_tokens=3)
    assert short.status == "incomplete" and short.output_text == "a b a"
    assert short.incomplete_details is not None
    assert short.incomplete_details.reason == "max_output_tokens"
    sent = (await seen(ports, "chat-only"))[-1]
    assert sent["path"] == "/v1/chat/completions" and sent["body"]["max_tokens"] == 3


async def test_responses_streamed(ports: Any, oai: Any) -> None:
    client = oai(ports.openai)
    async with client.responses.stream(model="chat-only", input="p q") as s:
        deltas = [e.delta async for e in s if e.type == "response.output_text.delta"]
        final = await s.get_final_response()
    assert "".join(deltas) == "p q p q p q p q" == final.output_text
    assert final.status == "completed" and final.usage is not None
    assert final.usage.input_tokens > 0 and final.usage.output_tokens == 8
    stream = await client.responses.create(model="chat-only", input="p", stream=True,
                                           max_output_tokens=2)
    kinds = [e.type async for e in stream]
    assert kinds[0] == "response.created" and kinds[-1] == "response.incomplete"


async def test_responses_function_call_round_trip(ports: Any, oai: Any) -> None:
    client = oai(ports.openai)
    resp = await client.responses.create(model="chat-only", input="add 2 and 3",
                                         tools=FN_TOOLS)  # type: ignore[arg-type]
    [call] = [o for o in resp.output if o.type == "function_call"]
    assert call.name == "add" and json.loads(call.arguments) == {"a": 2, "b": 3}
    async with client.responses.stream(model="chat-only", input="add 2 and 3",
                                       tools=FN_TOOLS) as s:  # type: ignore[arg-type]
        streamed = await s.get_final_response()
    [scall] = [o for o in streamed.output if o.type == "function_call"]
    assert json.loads(scall.arguments) == {"a": 2, "b": 3} and scall.call_id == call.call_id
    follow = await client.responses.create(model="chat-only", tools=FN_TOOLS,  # type: ignore[arg-type]
                                           max_output_tokens=2, input=[
        {"role": "user", "content": "add 2 and 3"},
        {"type": "function_call", "call_id": call.call_id, "name": "add",
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "5"}])
    assert follow.output_text == "add 2"
    sent = (await seen(ports, "chat-only"))[-1]["body"]["messages"]
    assert sent[-1] == {"role": "tool", "tool_call_id": call.call_id, "content": "5"}
    assert sent[-2]["tool_calls"][0]["id"] == call.call_id


async def test_previous_response_id_continues_a_kept_conversation(ports: Any,
                                                                   oai: Any) -> None:
    client = oai(ports.openai)
    first = await client.responses.create(model="chat-only", input="one two",
                                          instructions="be brief", max_output_tokens=2)
    # Kept on every port: the next turn may come through another.
    second = await oai(ports.lmstudio).responses.create(
        model="chat-only", input="three", previous_response_id=first.id, max_output_tokens=1)
    assert second.output_text == "three"
    sent = (await seen(ports, "chat-only"))[-1]["body"]["messages"]
    # The earlier turn and its answer, without the earlier instructions.
    assert sent == [{"role": "user", "content": "one two"},
                    {"role": "assistant", "content": "one two"},
                    {"role": "user", "content": "three"}]
    # A streamed answer is kept too, whole.
    async with client.responses.stream(model="chat-only", input="four",
                                       previous_response_id=second.id) as s:
        streamed = await s.get_final_response()
    third = await client.responses.create(model="chat-only", input="five",
                                          previous_response_id=streamed.id,
                                          max_output_tokens=1)
    assert third.output_text == "five"
    sent = (await seen(ports, "chat-only"))[-1]["body"]["messages"]
    assert [m["content"] for m in sent] == ["one two", "one two", "three", "three", "four",
                                            " ".join(["four"] * 8), "five"]
    # store: false keeps nothing.
    unkept = await client.responses.create(model="chat-only", input="x", store=False,
                                           max_output_tokens=1)
    with pytest.raises(openai.BadRequestError):
        await client.responses.create(model="chat-only", input="y",
                                      previous_response_id=unkept.id)


async def test_responses_errors(ports: Any, oai: Any) -> None:
    client = oai(ports.openai)
    with pytest.raises(openai.BadRequestError) as e:
        await client.responses.create(model="chat-only", input="x",
                                      previous_response_id="resp_1")
    assert "previous response 'resp_1' not found" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        await client.responses.create(model="chat-only", input=[])
    assert "'messages' is required" in str(e.value)


async def test_a_family_the_upstream_speaks_stays_the_pass_through(ports: Any) -> None:
    body = {"model": "native", "max_tokens": 2, "messages": [{"role": "user", "content": "a"}]}
    r = await ports.openai.post("/v1/messages", json=body)
    assert r.status == 200 and "X-Corral-Translated" not in r.headers
    calls = await seen(ports, "native")
    # As it came, but for the slot the slot cache chose for it.
    assert [c["path"] for c in calls] == ["/v1/messages"]
    assert calls[-1]["body"] == {"id_slot": 0, **body}
    r = await ports.openai.post("/v1/responses", json={"model": "native", "input": "a",
                                                       "store": False})
    assert r.status == 200 and "X-Corral-Translated" not in r.headers
    assert (await seen(ports, "native"))[-1]["path"] == "/v1/responses"


async def test_responses_to_keep_go_through_corrals_store_on_an_undeclared_upstream(
    ports: Any, oai: Any
) -> None:
    """llama-server keeps no Responses: with ``api`` undeclared, a call to be kept (no
    ``store: false``, as the OpenAI SDK sends by default) is translated and kept by
    Corral, so that a later ``previous_response_id`` works, streamed or not."""
    client = oai(ports.openai)
    first = await client.responses.create(model="native", input="a b")
    assert first.output_text.startswith("a b")  # the fake echoes the prompt
    calls = await seen(ports, "native")
    assert calls[-1]["path"] == "/v1/chat/completions"
    # The follow-up carries the first exchange before its own input.
    stream = await client.responses.create(model="native", input="c d",
                                           previous_response_id=first.id, stream=True)
    kinds = [event.type async for event in stream]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    sent = (await seen(ports, "native"))[-1]
    assert sent["path"] == "/v1/chat/completions"
    assert [(m["role"], m["content"]) for m in sent["body"]["messages"]] == [
        ("user", "a b"), ("assistant", first.output_text), ("user", "c d")]
    # An id Corral never made: the 400 says so (not the upstream's).
    r = await ports.openai.post("/v1/responses", json={
        "model": "native", "input": "e", "previous_response_id": "resp_nope"})
    assert r.status == 400 and "resp_nope" in (await r.json())["error"]["message"]


async def test_an_undeclared_upstream_is_probed_once(
    ports: Any, claude: Any, oai: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """No ``api`` in its config: the first call finds the route missing (404), learns
    it and is sent again translated; the next ones go translated at once."""
    caplog.set_level(logging.INFO, logger="proxy.calls.upstream")
    client = claude(ports.openai)
    for _ in range(2):
        msg = await client.messages.create(model="undeclared", max_tokens=2,
                                           messages=[{"role": "user", "content": "a b"}])
        assert msg.content[0].text == "a b"  # type: ignore[union-attr]
    resp = await oai(ports.ollama).responses.create(model="undeclared", input="c",
                                                    max_output_tokens=1, store=False)
    assert resp.output_text == "c"
    # The refused calls never reach a handler of the fake, which lists only the others.
    paths = [c["path"] for c in await seen(ports, "undeclared")]
    assert paths == ["/v1/chat/completions"] * 3
    probes = [r.getMessage() for r in caplog.records if "sending again" in r.getMessage()]
    assert len(probes) == 2, probes
    assert "no Anthropic Messages route (404)" in probes[0]
    assert "no OpenAI Responses route (404)" in probes[1]
    # Learning a missing route is not a failure: the upstream stays in rotation.
    from proxy.keys import SCHEDULER

    [inst] = ports.openai.app[SCHEDULER].loaded("undeclared")
    assert inst.state.name == "READY"

def sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of a raw SSE body; ':' comments as (':', {})."""
    out: list[tuple[str, dict[str, Any]]] = []
    event = ""
    for line in text.splitlines():
        if line.startswith(":"):
            out.append((":", {}))
        elif line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            out.append((event, json.loads(line[6:])))
    return out


async def test_a_stream_that_breaks_ends_with_the_familys_error_event(
    corral_ports: Any, tmp_path: Path
) -> None:
    ports = await corral_ports(make_config(tmp_path, [
        {"name": "crashy", "api": ["chat"], "env": {"FAKE_CRASH_AFTER_CHUNKS": "2"}}]))
    r = await ports.openai.post("/v1/messages", json={
        "model": "crashy", "max_tokens": 8, "stream": True,
        "messages": [{"role": "user", "content": "a b"}]})
    # Loading comments come first when the launch takes over a second: not the point.
    events = [e for e in sse(await r.text()) if e[0] != ":"]
    assert r.status == 200 and events[0][0] == "message_start"
    assert [d["delta"]["text"] for e, d in events if e == "content_block_delta"] == ["a", " b"]
    assert events[-1][0] == "error" and events[-1][1]["type"] == "error"
    assert "failed mid-stream" in events[-1][1]["error"]["message"]
    r = await ports.openai.post("/v1/responses", json={
        "model": "crashy", "input": "a b", "stream": True})
    events = [e for e in sse(await r.text()) if e[0] != ":"]
    assert events[0][0] == "response.created"
    assert events[-1][0] == "error" and "failed mid-stream" in events[-1][1]["message"]
    assert "response.completed" not in [e for e, _ in events]


async def test_a_cold_translated_stream_gets_loading_comments(
    corral_ports: Any, tmp_path: Path
) -> None:
    ports = await corral_ports(make_config(tmp_path, [
        {"name": "slow", "api": ["chat"], "env": {"FAKE_LOAD_DELAY": "1.6"}}]))
    r = await ports.openai.post("/v1/messages", json={
        "model": "slow", "max_tokens": 2, "stream": True,
        "messages": [{"role": "user", "content": "a"}]})
    events = sse(await r.text())
    kinds = [e for e, _ in events]
    assert kinds[0] == ":" and "message_start" in kinds and kinds[-1] == "message_stop"
    assert kinds.index("message_start") > max(i for i, k in enumerate(kinds) if k == ":")
    # Refused by the upstream after the comments began: the status line is gone, so
    # the refusal is the stream's one event, in Anthropic's shape.
    r = await ports.openai.post("/admin/models/slow/unload")
    assert r.status == 200
    r = await ports.openai.post("/v1/messages", json={
        "model": "slow", "max_tokens": 2, "stream": True, "messages": []})
    events = sse(await r.text())
    assert r.status == 200 and events[0][0] == ":"
    assert [e for e, _ in events if e != ":"] == ["error"]
    assert "'messages' is required" in events[-1][1]["error"]["message"]


async def test_a_missing_model_is_not_a_missing_route_and_whole_answers_stream(
    corral_ports: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    """A remote defined here: its 404s name the model (not learned, relayed), and its
    chat route answers whole although asked to stream (the stream is made from it)."""
    from aiohttp import web

    hits: list[str] = []

    async def missing_model(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"object": "error", "message": "The model `m` does not exist.",
                                  "type": "NotFoundError", "code": 404}, status=404)

    async def chat(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"id": "chatcmpl-w", "model": "m", "choices": [{
            "index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": "ok", "tool_calls": [{
                    "id": "call_w", "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 1}'}}]}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2}})

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/messages", missing_model)
    app.router.add_post("/v1/responses", missing_model)
    app.router.add_post("/v1/chat/completions", chat)
    server = await aiohttp_server(app)
    url = str(server.make_url("")).rstrip("/")
    ports = await corral_ports(make_config(tmp_path, [
        {"name": "undeclared", "remotes": [url]},
        {"name": "whole", "remotes": [url], "api": ["chat"]}]))
    body = {"model": "undeclared", "max_tokens": 2, "messages": [{"role": "user", "content": "a"}]}
    for _ in range(2):
        r = await ports.openai.post("/v1/messages", json=body)
        # Relayed in Anthropic's envelope (a 404 upstream reads as 502, as everywhere).
        assert r.status == 502 and "does not exist" in (await r.json())["error"]["message"]
    r = await ports.openai.post("/v1/responses", json={"model": "undeclared", "input": "a",
                                                       "store": False})
    assert r.status == 404 and (await r.json())["message"] == "The model `m` does not exist."
    assert hits == ["/v1/messages", "/v1/messages", "/v1/responses"]
    r = await ports.openai.post("/v1/messages", json={**body, "model": "whole", "stream": True})
    events = [e for e in sse(await r.text()) if e[0] != ":"]
    assert [e for e, _ in events] == [
        "message_start", "ping", "content_block_start", "content_block_delta",
        "content_block_stop", "content_block_start", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop"]
    assert events[6][1]["delta"] == {"type": "input_json_delta", "partial_json": '{"a": 1}'}
    assert events[8][1]["delta"]["stop_reason"] == "tool_use"
    assert events[8][1]["usage"] == {"input_tokens": 5, "output_tokens": 2}


async def test_send_again_is_bounded_and_not_a_failure(ports: Any) -> None:
    """A consumer that keeps asking to be sent again (a replica after replica lacking a
    family) is answered UpstreamFailed after SEND_AGAIN resends; the upstream is not
    reported failing for it."""
    from proxy.calls import upstream
    from proxy.keys import SCHEDULER
    from scheduler.errors import UpstreamFailed

    seen_by: list[str] = []

    async def consume(up: Any, resp: Any, client: Any) -> None:
        seen_by.append(up.instance_id)
        raise upstream.SendAgain("learned something")

    spec = upstream.Call(model="native", path="/v1/chat/completions",
                         payload={"model": "native", "messages": [
                             {"role": "user", "content": "x"}]})
    with pytest.raises(UpstreamFailed) as e:
        await upstream.call_app(ports.openai.app, spec, consume)
    assert "learned something" in e.value.message
    assert len(seen_by) == 1 + upstream.SEND_AGAIN
    [inst] = ports.openai.app[SCHEDULER].loaded("native")
    assert inst.state.name == "READY"


async def test_a_stalled_translated_stream_ends_with_an_error_event(
    corral_ports: Any, tmp_path: Path
) -> None:
    ports = await corral_ports(make_config(tmp_path, [
        {"name": "stally", "api": ["chat"], "stall_timeout": 0.3,
         "env": {"FAKE_TOKEN_DELAY": "2"}}]))
    r = await ports.openai.post("/v1/messages", json={
        "model": "stally", "max_tokens": 3, "stream": True,
        "messages": [{"role": "user", "content": "a"}]})
    events = [e for e in sse(await r.text()) if e[0] != ":"]
    assert events[0][0] == "message_start" and events[-1][0] == "error"
    assert "failed mid-stream" in events[-1][1]["error"]["message"]


async def test_other_families_the_model_does_not_speak_are_refused(ports: Any) -> None:
    """Declared chat-only: completions, embeddings and llama-server's native routes are
    a 400 that says so, not a 404 from the upstream read as a 502."""
    c = ports.openai
    for path, body in (
        ("/v1/completions", {"prompt": "a"}),
        ("/tokenize", {"content": "a"}),
        ("/v1/chat/completions/input_tokens", {"messages": [{"role": "user", "content": "a"}]}),
    ):
        r = await c.post(path, json={"model": "chat-only", **body})
        assert r.status == 400, path
        message = (await r.json())["error"]["message"]
        assert "model 'chat-only' is served by an upstream that does not speak" in message
        assert "api = ['chat']" in message
    r = await c.post("/v1/chat/completions", json={
        "model": "chat-only", "max_tokens": 1, "messages": [{"role": "user", "content": "a"}]})
    assert r.status == 200


async def test_a_natural_stop_is_the_end_of_a_turn(ports: Any, claude: Any, oai: Any) -> None:
    msg = await claude(ports.openai).messages.create(
        model="stops", max_tokens=50, messages=[{"role": "user", "content": "p q r"}])
    assert msg.stop_reason == "end_turn" and msg.content[0].text == "p q"  # type: ignore[union-attr]
    async with oai(ports.openai).responses.stream(model="stops", input="p q r",
                                                  max_output_tokens=50) as s:
        final = await s.get_final_response()
    assert final.status == "completed" and final.output_text == "p q"


async def test_built_in_tools_are_left_out(ports: Any, claude: Any, oai: Any) -> None:
    """A server tool runs at Anthropic or OpenAI, not in a chat upstream: the call goes
    on without it (Claude Code and Codex send some), function tools kept."""
    msg = await claude(ports.openai).messages.create(
        model="chat-only", max_tokens=2, messages=[{"role": "user", "content": "a"}],
        tools=[{"type": "web_search_20250305", "name": "web_search"}])  # type: ignore[list-item]
    assert msg.content[0].text == "a a"  # type: ignore[union-attr]
    assert "tools" not in (await seen(ports, "chat-only"))[-1]["body"]
    resp = await oai(ports.openai).responses.create(
        model="chat-only", input="add", tools=[*FN_TOOLS, {"type": "web_search"}])  # type: ignore[list-item]
    assert [o.type for o in resp.output] == ["function_call"]
    sent = (await seen(ports, "chat-only"))[-1]["body"]
    assert [t["function"]["name"] for t in sent["tools"]] == ["add"]
