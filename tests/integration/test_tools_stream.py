"""A tool loop's model turns reach a streaming client token by token, in every family:
the fake llama-server paces its scripted answer (FAKE_TOKEN_DELAY, a word a chunk), and
the client sees more than one text delta, the first while the upstream is still
generating that turn (the fake's ``in_flight`` count, read when it arrives). A turn
that breaks after its text began ends the stream with an error, never sent again."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.keys import SCHEDULER
from scheduler.process.instance import State
from tests.conftest import make_config
from tests.fakes import mcp_proc

MODEL = "m"
ASK = 'call: echo {"text": "one two three four five six"}'
ANSWER = "tool said: one two three four five six"


def _sse_data(line: str) -> dict[str, Any] | None:
    if not line.startswith("data: {"):
        return None
    value = json.loads(line[6:])
    return value if isinstance(value, dict) else None


def _responses(line: str) -> str | None:
    d = _sse_data(line)
    return d.get("delta") if d and d.get("type") == "response.output_text.delta" else None


def _anthropic(line: str) -> str | None:
    d = _sse_data(line)
    delta = (d or {}).get("delta") or {}
    return delta.get("text") if delta.get("type") == "text_delta" else None


def _chat(line: str) -> str | None:
    d = _sse_data(line)
    choices = (d or {}).get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content") or None


def _ollama(line: str) -> str | None:
    d = json.loads(line) if line.startswith("{") else {}
    return None if "mcp" in d else (d.get("message") or {}).get("content") or None


def _lmstudio(line: str) -> str | None:
    d = _sse_data(line)
    return d.get("content") if d and d.get("type") == "message.delta" else None


Case = tuple[str, str, dict[str, Any], Callable[[str], str | None]]
CASES: dict[str, Case] = {
    "responses": ("openai", "/v1/responses", {
        "input": ASK, "tools": [{"type": "mcp", "server_label": "local"}]}, _responses),
    "anthropic": ("openai", "/v1/messages", {
        "max_tokens": 64, "messages": [{"role": "user", "content": ASK}],
        "mcp_servers": [{"type": "url", "name": "local"}]}, _anthropic),
    "chat": ("openai", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": ASK}], "mcp_servers": ["local"]}, _chat),
    "ollama": ("ollama", "/api/chat", {
        "messages": [{"role": "user", "content": ASK}], "mcp_servers": ["local"]}, _ollama),
    "lmstudio": ("lmstudio", "/api/v1/chat", {
        "input": ASK, "integrations": ["mcp/local"]}, _lmstudio),
}


@pytest.fixture
async def ports(corral_ports: Any, tmp_path: Path) -> Any:
    servers = [{"name": "local", "command": list(mcp_proc.STDIO), "env": mcp_proc.env()}]
    cfg = make_config(tmp_path, [{"name": MODEL, "env": {"FAKE_TOKEN_DELAY": "0.1"}}],
                      mcp_servers=servers, mcp={"max_steps": 3})
    return await corral_ports(cfg)


async def _in_flight(ports: Any) -> int:
    inst = next(i for i in ports.openai.app[SCHEDULER].loaded(MODEL) if i.state is State.READY)
    async with aiohttp.ClientSession() as s, s.get(inst.base_url + "/fake/stats") as r:
        return int((await r.json())["in_flight"])


@pytest.mark.parametrize("family", list(CASES))
async def test_the_final_answer_streams_token_by_token(ports: Any, family: str) -> None:
    port, path, body, text_of = CASES[family]
    r = await getattr(ports, port).post(path, json={"model": MODEL, "stream": True, **body})
    assert r.status == 200, await r.text()
    deltas: list[str] = []
    busy_at_first = -1
    async for raw in r.content:  # a line at a time, as it arrives
        piece = text_of(raw.decode().strip())
        if piece is None:
            continue
        if not deltas:
            busy_at_first = await _in_flight(ports)
        deltas.append(piece)
    assert "".join(deltas) == ANSWER
    assert len(deltas) > 1
    # The first token reached the client while the model still generated the rest.
    assert busy_at_first == 1


async def test_a_turn_that_breaks_after_its_text_began_is_not_sent_again(
        corral_ports: Any, tmp_path: Path) -> None:
    servers = [{"name": "local", "command": list(mcp_proc.STDIO), "env": mcp_proc.env()}]
    env = {"FAKE_TOKEN_DELAY": "0.01", "FAKE_CRASH_AFTER_CHUNKS": "2"}
    ports = await corral_ports(make_config(tmp_path, [{"name": MODEL, "env": env}],
                                           mcp_servers=servers, mcp={"max_steps": 3}))
    _, path, body, text_of = CASES["chat"]
    r = await ports.openai.post(path, json={"model": MODEL, "stream": True, **body})
    assert r.status == 200
    lines = (await r.text()).splitlines()
    # Two words, then the fake died: the client saw them once, then the error.
    assert "".join(p for p in map(text_of, lines) if p is not None) == "tool said: "
    assert any(line.startswith("data: {\"error\"") for line in lines), lines
