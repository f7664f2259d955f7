"""The tool loop against the real llama-server and Gemma 3 270M: a stdio MCP server
written with the ``mcp`` SDK, its tool forced on the model's first turn
(``tool_choice: "required"``, which llama-server turns into a grammar), so even the
small model completes one loop; seen through the Responses, Anthropic, Ollama and
LM Studio families, each in its own events. Corral's own /mcp loads the model from the
``mcp`` client."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from openai.types.responses.response_output_item import McpCall

from tests.e2e.conftest import CorralProc, model_toml, reaped, wait_until
from tests.fakes import mcp_proc

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

TEMPLATE = Path(__file__).parent / "data" / "gemma-tools.jinja"
ASK = "Use the tool to add 2 and 3."


@pytest.fixture
def served(corral: Callable[..., CorralProc], gemma: Path) -> CorralProc:
    command = json.dumps(list(mcp_proc.STDIO))
    servers = (f'[[mcp_servers]]\nname = "notes"\ncommand = {command}\n'
               f'allowed_tools = ["add"]\nenv = {{ PYTHONPATH = "{mcp_proc.ROOT}" }}\n\n'
               f"[mcp]\nmax_steps = 2\n\n")
    return corral(servers + model_toml("gemma", gemma, chat_template=str(TEMPLATE),
                                       ctx_size=2048))


def test_responses_one_loop_with_the_real_model(served: CorralProc) -> None:
    with openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0,
                       timeout=300) as client:
        resp = client.responses.create(
            model="gemma", input=ASK, tool_choice="required", temperature=0,
            max_output_tokens=64,
            tools=[{"type": "mcp", "server_label": "notes", "require_approval": "never"}])
    calls = [o for o in resp.output if isinstance(o, McpCall)]
    assert resp.output[0].type == "mcp_list_tools"
    assert calls and calls[0].name == "add" and calls[0].server_label == "notes"
    # The tool ran: it answered the sum of whatever integers the model chose.
    args = json.loads(calls[0].arguments)
    assert calls[0].error is None and calls[0].output == str(args["a"] + args["b"])
    # The MCP server is Corral's child, as llama-server is: both die with Corral.
    kids = served.children()
    assert len(kids) == 2
    served.proc.kill()
    wait_until(lambda: all(reaped(pid) for pid in kids))


def test_anthropic_ollama_and_lmstudio_each_see_their_own_events(
        served: CorralProc) -> None:
    with anthropic.Anthropic(base_url=served.url, api_key="x", max_retries=0,
                             timeout=300) as claude:
        msg = claude.beta.messages.create(
            model="gemma", max_tokens=64, betas=["mcp-client-2025-04-04"],
            # Greedy, as the other two calls: sampled, the 270M model broke off its forced
            # tool call's JSON often enough that llama-server answered 500 (fresh clones).
            extra_body={"temperature": 0},
            tool_choice={"type": "any"},
            mcp_servers=[{"type": "url", "name": "notes"}],  # type: ignore[typeddict-item]
            messages=[{"role": "user", "content": ASK}])
    assert [b.type for b in msg.content][:2] == ["mcp_tool_use", "mcp_tool_result"]
    ollama_port = f"http://127.0.0.1:{served.ollama_port}"
    r = httpx.post(ollama_port + "/api/chat", timeout=300, json={
        "model": "gemma", "stream": False, "mcp_servers": ["notes"], "tool_choice": "required",
        "options": {"temperature": 0, "num_predict": 64},
        "messages": [{"role": "user", "content": ASK}]})
    assert r.status_code == 200, r.text
    assert [c["name"] for c in r.json()["mcp_calls"]][:1] == ["add"]
    lmstudio = f"http://127.0.0.1:{served.lmstudio_port}"
    r = httpx.post(lmstudio + "/api/v1/chat", timeout=300, json={
        "model": "gemma", "input": ASK, "integrations": ["mcp/notes"], "stream": True,
        "tool_choice": "required", "max_output_tokens": 64, "temperature": 0})
    events = [line.removeprefix("event: ") for line in r.text.splitlines()
              if line.startswith("event: ")]
    assert events[:4] == ["chat.start", "tool_call.start", "tool_call.arguments",
                          "tool_call.result"]
    assert events[-1] == "chat.end"


async def test_the_mcp_client_loads_a_model_through_corral_s_own_mcp(
        served: CorralProc) -> None:
    async with create_mcp_http_client() as http, \
            streamable_http_client(served.url + "/mcp", http_client=http) as (read, write), \
            ClientSession(read, write) as s:
        await s.initialize()
        names = {t.name for t in (await s.list_tools()).tools}
        assert {"list_models", "load_model"} <= names
        loaded = await s.call_tool("load_model", {"model": "gemma"})
        assert not loaded.is_error, loaded.content
        models = json.loads((await s.call_tool("list_models", {})).content[0].text)
        assert models[0]["name"] == "gemma" and models[0]["instances"]



def _stream(served: CorralProc, choice: str, **narrow: Any
            ) -> tuple[list[str], list[str], Any]:
    """The event types, the text deltas and the final response of a streamed loop."""
    with openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0,
                       timeout=300) as client:
        stream = client.responses.create(
            model="gemma", input=ASK, tool_choice=choice,  # type: ignore[arg-type]
            temperature=0, max_output_tokens=64, stream=True,
            tools=[{"type": "mcp", "server_label": "notes", "require_approval": "never",
                    **narrow}])
        kinds: list[str] = []
        deltas: list[str] = []
        final = None
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            elif event.type in ("response.completed", "response.incomplete"):
                final = event.response
    assert final is not None
    return kinds, deltas, final


def test_a_streaming_client_sees_tool_calls_and_text_token_by_token(
        served: CorralProc) -> None:
    # Each turn streams upstream: the tool call is gathered from llama-server's deltas.
    # (Gemma 270M goes on calling the tool until max_steps, so no answer text here.)
    kinds, _, final = _stream(served, "required")
    calls = [o for o in final.output if isinstance(o, McpCall)]
    assert calls and calls[0].name == "add" and calls[0].error is None
    args = json.loads(calls[0].arguments)
    assert calls[0].output == str(args["a"] + args["b"])
    assert "response.mcp_call.completed" in kinds
    # A turn that answers in text reaches the client a token or so at a time (the
    # server's tools narrowed to none, which Gemma 270M would call whatever it is told).
    kinds, deltas, final = _stream(served, "auto", allowed_tools=[])
    assert final.output[0].type == "mcp_list_tools"
    assert len(deltas) > 1
    assert "".join(deltas) == final.output_text
