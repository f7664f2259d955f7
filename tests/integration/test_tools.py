"""The tool loop (proxy/tools/) against fake llama-servers scripted to call tools and
MCP servers written with the ``mcp`` SDK (stdio and streamable HTTP): every family,
streamed and not, a failing tool, the step bound, a server that hangs, unknown and
out-of-scope server names refused in the family's dialect, approval, metrics."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anthropic
import ollama
import openai
import pytest
from anthropic.types.beta import BetaMCPToolResultBlock, BetaMCPToolUseBlock
from openai.types.responses.response_output_item import McpCall, McpListTools

from tests.conftest import make_config
from tests.fakes import mcp_proc

MODEL = "m"


@pytest.fixture(scope="module")
def http_url() -> Iterator[str]:
    with mcp_proc.http_server() as url:
        yield url


def tools_config(tmp_path: Path, url: str, **sections: Any) -> Any:
    servers = [
        {"name": "local", "command": list(mcp_proc.STDIO),
         "env": {**mcp_proc.env(), "TOOL_GREETING": "hello from env"}},
        {"name": "hangs", "command": list(mcp_proc.STDIO), "env": mcp_proc.env(),
         "call_timeout": 1.0},
        {"name": "remote", "url": url},
        {"name": "asks", "command": list(mcp_proc.STDIO), "env": mcp_proc.env(),
         "require_approval": "always"},
        {"name": "other-model", "url": url, "models": ["nobody"]},
    ]
    return make_config(tmp_path, [{"name": MODEL}], mcp_servers=servers,
                       mcp={"max_steps": 3, **sections.pop("mcp", {})}, **sections)


@pytest.fixture
async def ports(corral_ports: Any, tmp_path: Path, http_url: str) -> Any:
    return await corral_ports(tools_config(tmp_path, http_url))


@pytest.fixture
async def oai(ports: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=str(ports.openai.make_url("/v1")), api_key="x",
                                max_retries=0)
    yield client
    await client.close()


def mcp_tool(server: str, **extra: Any) -> Any:
    return {"type": "mcp", "server_label": server, **extra}


# --- Responses ---------------------------------------------------------------------------


async def test_responses_calls_a_stdio_tool_and_the_openai_client_parses_the_items(
        oai: openai.AsyncOpenAI) -> None:
    resp = await oai.responses.create(model=MODEL, input='call: echo {"text": "hi there"}',
                                      tools=[mcp_tool("local")])
    kinds = [o.type for o in resp.output]
    assert kinds == ["mcp_list_tools", "mcp_call", "message"]
    listed, call = resp.output[0], resp.output[1]
    assert isinstance(listed, McpListTools) and isinstance(call, McpCall)
    assert listed.server_label == "local"
    assert {"echo", "add", "fail", "hang"} <= {t.name for t in listed.tools}
    assert (call.name, call.output, call.status) == ("echo", "hi there", "completed")
    assert json.loads(call.arguments) == {"text": "hi there"}
    assert resp.output_text == "tool said: hi there"
    # Two model turns, their tokens summed.
    assert resp.usage is not None and resp.usage.output_tokens == 10


async def test_responses_stream_shows_each_mcp_event_as_it_happens(
        oai: openai.AsyncOpenAI) -> None:
    stream = await oai.responses.create(model=MODEL, input="call: add {\"a\": 2, \"b\": 40}",
                                        tools=[mcp_tool("remote")], stream=True)
    kinds, final = [], None
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.completed":
            final = event.response
    assert kinds[:2] == ["response.created", "response.in_progress"]
    for kind in ("response.mcp_list_tools.in_progress", "response.mcp_list_tools.completed",
                 "response.mcp_call.in_progress", "response.mcp_call_arguments.delta",
                 "response.mcp_call_arguments.done", "response.mcp_call.completed"):
        assert kind in kinds
    assert kinds.index("response.mcp_call.completed") < kinds.index(
        "response.output_text.delta")
    assert final is not None and final.output_text == "tool said: 42"
    assert [o.type for o in final.output] == ["mcp_list_tools", "mcp_call", "message"]


async def test_a_failing_tool_is_a_failed_call_the_model_reads_not_a_5xx(
        oai: openai.AsyncOpenAI) -> None:
    resp = await oai.responses.create(model=MODEL, input='call: fail {"reason": "no disk"}',
                                      tools=[mcp_tool("local")])
    call = resp.output[1]
    assert isinstance(call, McpCall) and call.status == "failed"
    assert call.error is not None and "no disk" in json.dumps(call.error.model_dump())
    assert "no disk" in resp.output_text


async def test_a_hanging_tool_times_out_into_a_failed_result(
        oai: openai.AsyncOpenAI) -> None:
    resp = await oai.responses.create(model=MODEL, input="call: hang {}",
                                      tools=[mcp_tool("hangs")])
    call = resp.output[1]
    assert isinstance(call, McpCall) and call.status == "failed"
    assert "timed out" in resp.output_text


async def test_the_step_bound_ends_a_model_that_never_stops_calling(
        oai: openai.AsyncOpenAI) -> None:
    resp = await oai.responses.create(model=MODEL, input='call-always: echo {"text": "x"}',
                                      tools=[mcp_tool("local")])
    assert [o.type for o in resp.output].count("mcp_call") == 3  # [mcp] max_steps
    assert resp.status == "incomplete"


async def test_allowed_tools_narrows_what_the_model_sees(oai: openai.AsyncOpenAI) -> None:
    resp = await oai.responses.create(
        model=MODEL, input='call: echo {"text": "a"}',
        tools=[mcp_tool("local", allowed_tools=["add"])])
    listed = resp.output[0]
    assert isinstance(listed, McpListTools) and [t.name for t in listed.tools] == ["add"]
    # echo is not offered: the fake calls the name it was told, which is not an MCP
    # tool, so the call goes back to the client as its own function call.
    assert [o.type for o in resp.output] == ["mcp_list_tools", "function_call"]


async def test_approval_ends_the_call_and_the_next_call_resumes_it(
        oai: openai.AsyncOpenAI) -> None:
    first = await oai.responses.create(model=MODEL, input='call: echo {"text": "ok?"}',
                                       tools=[mcp_tool("asks")])
    kinds = [o.type for o in first.output]
    assert kinds == ["mcp_list_tools", "mcp_approval_request"]
    request = first.output[1]
    second = await oai.responses.create(
        model=MODEL, previous_response_id=first.id, tools=[mcp_tool("asks")],
        input=[{"type": "mcp_approval_response", "approval_request_id": request.id,
                "approve": True}])
    assert [o.type for o in second.output] == ["mcp_list_tools", "mcp_call", "message"]
    assert second.output_text == "tool said: ok?"


@pytest.mark.parametrize("tool, words", [
    (mcp_tool("nowhere"), "no MCP server named 'nowhere'"),
    (mcp_tool("remote", server_url="http://127.0.0.1:9/mcp"), "only the MCP servers"),
    (mcp_tool("other-model"), "not offered to model"),
])
async def test_servers_outside_the_config_are_refused_in_openai_s_envelope(
        ports: Any, tool: Any, words: str) -> None:
    r = await ports.openai.post("/v1/responses", json={"model": MODEL, "input": "hi",
                                                       "tools": [tool]})
    assert r.status == 400
    body = await r.json()
    assert words in body["error"]["message"]


# --- OpenAI chat (Corral's extension) ----------------------------------------------------


async def test_chat_extension_runs_the_loop_whole(ports: Any) -> None:
    r = await ports.openai.post("/v1/chat/completions", json={
        "model": MODEL, "mcp_servers": ["local"],
        "messages": [{"role": "user", "content": 'call: env {"name": "TOOL_GREETING"}'}]})
    assert r.status == 200, await r.text()
    body = await r.json()
    assert body["choices"][0]["message"]["content"] == "tool said: hello from env"
    assert [c["name"] for c in body["mcp_calls"]] == ["env"]
    assert body["mcp_list_tools"][0]["server_label"] == "local"


async def test_chat_extension_streams_items_then_the_answer(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model=MODEL, stream=True, extra_body={"mcp_servers": [{"name": "remote"}]},
        messages=[{"role": "user", "content": 'call: echo {"text": "streamed"}'}])
    items, text = [], ""
    async for chunk in stream:
        extra = chunk.model_extra or {}
        if "mcp" in extra:
            items.append((extra["mcp"]["type"], extra["mcp"].get("status")))
        for c in chunk.choices:
            text += c.delta.content or ""
    assert items == [("mcp_list_tools", None), ("mcp_call", "in_progress"),
                     ("mcp_call", "completed")]
    assert text == "tool said: streamed"


async def test_unknown_server_in_chat_is_a_400(ports: Any) -> None:
    r = await ports.openai.post("/v1/chat/completions", json={
        "model": MODEL, "mcp_servers": ["nope"],
        "messages": [{"role": "user", "content": "hi"}]})
    assert r.status == 400
    assert "no MCP server named 'nope'" in (await r.json())["error"]["message"]


async def test_tool_calls_are_counted_in_metrics(ports: Any) -> None:
    r = await ports.openai.post("/v1/chat/completions", json={
        "model": MODEL, "mcp_servers": ["local"],
        "messages": [{"role": "user", "content": 'call: add {"a": 1, "b": 1}'}]})
    assert r.status == 200
    text = await (await ports.openai.get("/metrics")).text()
    assert 'corral_mcp_tool_calls_total{outcome="ok",server="local",tool="add"} 1.0' in text
    assert 'corral_mcp_tool_call_duration_seconds_count{server="local"} 1.0' in text


async def test_a_key_scoped_to_other_servers_is_refused(
        corral_ports: Any, tmp_path: Path, http_url: str) -> None:
    keys = [{"name": "narrow", "key": "narrow-key-123", "mcp_servers": ["remote"]}]
    p = await corral_ports(tools_config(tmp_path, http_url, keys=keys))
    headers = {"Authorization": "Bearer narrow-key-123"}
    body: dict[str, Any] = {"model": MODEL, "messages": [
        {"role": "user", "content": 'call: echo {"text": "k"}'}]}
    r = await p.openai.post("/v1/chat/completions", headers=headers,
                            json={**body, "mcp_servers": ["local"]})
    assert r.status == 400
    assert "configured: ['remote']" in (await r.json())["error"]["message"]
    r = await p.openai.post("/v1/chat/completions", headers=headers,
                            json={**body, "mcp_servers": ["remote"]})
    assert r.status == 200



# --- Anthropic Messages ------------------------------------------------------------------


@pytest.fixture
async def claude(ports: Any) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(base_url=str(ports.openai.make_url("")), api_key="x",
                                      max_retries=0)
    yield client
    await client.close()


BETA = ["mcp-client-2025-04-04"]


async def test_anthropic_connector_shape_and_the_client_parses_mcp_blocks(
        claude: anthropic.AsyncAnthropic, http_url: str) -> None:
    msg = await claude.beta.messages.create(
        model=MODEL, max_tokens=64, betas=BETA,
        mcp_servers=[{"type": "url", "url": http_url, "name": "remote"}],
        messages=[{"role": "user", "content": 'call: echo {"text": "from claude"}'}])
    use, result, text = msg.content
    assert isinstance(use, BetaMCPToolUseBlock) and isinstance(result, BetaMCPToolResultBlock)
    assert (use.name, use.server_name, use.input) == ("echo", "remote",
                                                       {"text": "from claude"})
    assert result.tool_use_id == use.id and not result.is_error
    assert text.type == "text" and text.text == "tool said: from claude"
    assert msg.stop_reason == "end_turn"


async def test_anthropic_stream_shows_blocks_as_they_happen(
        claude: anthropic.AsyncAnthropic) -> None:
    stream = await claude.beta.messages.create(
        model=MODEL, max_tokens=64, betas=BETA, stream=True,
        mcp_servers=[{"type": "url", "name": "local"}],  # type: ignore[typeddict-item]
        messages=[{"role": "user", "content": 'call: fail {"reason": "nope"}'}])
    starts, text = [], ""
    async for event in stream:
        if event.type == "content_block_start":
            starts.append((event.index, event.content_block.type))
        elif event.type == "content_block_delta" and event.delta.type == "text_delta":
            text += event.delta.text
    assert starts == [(0, "mcp_tool_use"), (1, "mcp_tool_result"), (2, "text")]
    assert "nope" in text


async def test_anthropic_unknown_server_is_refused_in_its_envelope(ports: Any) -> None:
    r = await ports.openai.post("/v1/messages", json={
        "model": MODEL, "max_tokens": 8, "mcp_servers": [{"type": "url", "name": "nope"}],
        "messages": [{"role": "user", "content": "hi"}]})
    assert r.status == 400
    body = await r.json()
    assert body["type"] == "error" and "no MCP server named 'nope'" in body["error"]["message"]


async def test_anthropic_follow_up_drops_the_mcp_blocks_it_sends_back(
        claude: anthropic.AsyncAnthropic) -> None:
    first = await claude.beta.messages.create(
        model=MODEL, max_tokens=64, betas=BETA,
        tools=[{"type": "mcp_toolset", "mcp_server_name": "local"}],  # type: ignore[list-item]
        messages=[{"role": "user", "content": 'call: add {"a": 1, "b": 2}'}])
    assert first.content[-1].type == "text"
    second = await claude.beta.messages.create(
        model=MODEL, max_tokens=64, betas=BETA,
        mcp_servers=[{"type": "url", "name": "local"}],  # type: ignore[typeddict-item]
        messages=[{"role": "user", "content": 'call: add {"a": 1, "b": 2}'},
                  {"role": "assistant", "content": [b.model_dump() for b in first.content]},
                  {"role": "user", "content": 'call: add {"a": 5, "b": 5}'}])
    assert second.content[-1].type == "text" and second.content[-1].text == "tool said: 10"


# --- Ollama /api/chat (Corral's extension) -------------------------------------------------


async def test_ollama_chat_streams_mcp_lines_the_ollama_client_reads(ports: Any) -> None:
    r = await ports.ollama.post("/api/chat", json={
        "model": MODEL, "mcp_servers": ["local"],
        "messages": [{"role": "user", "content": 'call: echo {"text": "llama"}'}]})
    assert r.status == 200
    lines = [json.loads(x) for x in (await r.text()).splitlines() if x.strip()]
    parsed = [ollama.ChatResponse.model_validate(x) for x in lines]
    mcp = [(x["mcp"]["type"], x["mcp"].get("status")) for x in lines if "mcp" in x]
    assert mcp == [("mcp_list_tools", None), ("mcp_call", "in_progress"),
                   ("mcp_call", "completed")]
    text = "".join(p.message.content or "" for p in parsed)
    assert text == "tool said: llama"
    assert parsed[-1].done and parsed[-1].done_reason == "stop"


async def test_ollama_chat_whole_answer_and_an_unknown_server(ports: Any) -> None:
    r = await ports.ollama.post("/api/chat", json={
        "model": MODEL, "mcp_servers": ["remote"], "stream": False,
        "messages": [{"role": "user", "content": 'call: add {"a": 3, "b": 4}'}]})
    whole = await r.json()
    assert whole["message"]["content"] == "tool said: 7"
    assert [c["name"] for c in whole["mcp_calls"]] == ["add"]
    r = await ports.ollama.post("/api/chat", json={
        "model": MODEL, "mcp_servers": ["nope"], "stream": False,
        "messages": [{"role": "user", "content": "hi"}]})
    assert r.status == 400
    assert "no MCP server named 'nope'" in (await r.json())["error"]


# --- LM Studio REST v1 chat (integrations) --------------------------------------------------


async def test_lmstudio_integrations_stream_tool_call_events(ports: Any) -> None:
    r = await ports.lmstudio.post("/api/v1/chat", json={
        "model": MODEL, "stream": True, "integrations": ["mcp/local"],
        "input": 'call: echo {"text": "studio"}'})
    assert r.status == 200
    events = [line.removeprefix("event: ") for line in (await r.text()).splitlines()
              if line.startswith("event: ")]
    # The answer streams a delta per token (the fake's word): several in a row.
    deltas = events.count("message.delta")
    assert deltas > 1
    assert events == ["chat.start", "tool_call.start", "tool_call.arguments",
                      "tool_call.result", "message.start", *["message.delta"] * deltas,
                      "message.end", "chat.end"]


async def test_lmstudio_integrations_whole_answer_and_refusals(ports: Any) -> None:
    r = await ports.lmstudio.post("/api/v1/chat", json={
        "model": MODEL, "input": 'call: add {"a": 20, "b": 22}',
        "integrations": [{"type": "ephemeral_mcp", "server_label": "remote"}]})
    result = await r.json()
    call, message = result["output"]
    assert call["type"] == "tool_call" and call["tool"] == "add" and call["output"] == "42"
    assert call["provider_info"] == {"type": "ephemeral_mcp", "server_label": "remote"}
    assert message == {"type": "message", "content": "tool said: 42"}
    r = await ports.lmstudio.post("/api/v1/chat", json={
        "model": MODEL, "input": "hi", "integrations": [{
            "type": "ephemeral_mcp", "server_label": "hf", "server_url": "https://hf.co/mcp"}]})
    assert r.status == 400
    assert "only the MCP servers of its config" in json.dumps(await r.json())


# --- bounds and conversations ------------------------------------------------------------


async def test_a_follow_up_finds_the_previous_response(oai: openai.AsyncOpenAI) -> None:
    first = await oai.responses.create(model=MODEL, input='call: echo {"text": "one"}',
                                       tools=[mcp_tool("local")])
    second = await oai.responses.create(model=MODEL, previous_response_id=first.id,
                                        input='call: echo {"text": "two"}',
                                        tools=[mcp_tool("local")])
    assert second.output_text == "tool said: two"


async def test_the_time_bound_ends_the_loop_inside_a_hanging_call(
        corral_ports: Any, tmp_path: Path, http_url: str) -> None:
    p = await corral_ports(tools_config(tmp_path, http_url, mcp={"max_seconds": 1.0}))
    r = await p.openai.post("/v1/chat/completions", json={
        "model": MODEL, "mcp_servers": ["remote"],
        "messages": [{"role": "user", "content": "call: hang {}"}]})
    assert r.status == 200
    body = await r.json()
    assert body["mcp_stopped"] == "max_seconds"
    assert body["mcp_calls"][0]["status"] == "failed"
    assert "timed out" in body["mcp_calls"][0]["error"]["message"]


async def test_a_streamed_approval_request_ends_the_stream(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.responses.create(model=MODEL, input='call: echo {"text": "s"}',
                                        tools=[mcp_tool("asks")], stream=True)
    final, kinds = None, []
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.completed":
            final = event.response
    assert "response.mcp_call.in_progress" not in kinds  # nothing ran
    assert final is not None
    assert [o.type for o in final.output] == ["mcp_list_tools", "mcp_approval_request"]
