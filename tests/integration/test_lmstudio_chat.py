"""LM Studio's REST v1 chat (POST /api/v1/chat) against fake llama-servers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.dialects.chat_store import ChatStore
from proxy.keys import CHAT_STORE, SCHEDULER
from tests.conftest import make_config


async def named_events(resp: aiohttp.ClientResponse) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    name = ""
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            assert data["type"] == name
            out.append((name, data))
    return out


@pytest.fixture
async def ports(corral_ports: Any, tmp_path: Path) -> Any:
    cfg = make_config(tmp_path, [{"name": "m", "env": {"FAKE_LOAD_DELAY": "1.5"}}])
    return await corral_ports(cfg)


async def test_streamed_chat_with_a_load(ports: Any) -> None:
    r = await ports.lmstudio.post("/api/v1/chat", json={
        "model": "m", "input": "hello there", "stream": True, "max_output_tokens": 3,
        "temperature": 0.1, "system_prompt": "be brief"})
    assert r.status == 200 and r.content_type == "text/event-stream"
    events = await named_events(r)
    names = [n for n, _ in events]
    assert names[:2] == ["chat.start", "model_load.start"]
    assert "model_load.progress" in names
    i = names.index("model_load.end")
    assert names[i + 1:i + 3] == ["prompt_processing.start", "prompt_processing.end"]
    assert names[i + 3] == "message.start" and names[-2:] == ["message.end", "chat.end"]
    text = "".join(d["content"] for n, d in events if n == "message.delta")
    assert text == "hello there hello"
    result = events[-1][1]["result"]
    assert result["output"] == [{"type": "message", "content": text}]
    assert result["model_instance_id"] == "m"
    assert result["stats"]["total_output_tokens"] == 3
    assert result["stats"]["model_load_time_seconds"] >= 1.0
    assert result["response_id"].startswith("resp_")


async def test_stateful_chat_and_plain_answer(ports: Any) -> None:
    c = ports.lmstudio
    first = await (await c.post("/api/v1/chat", json={
        "model": "m", "input": "one two", "max_output_tokens": 2})).json()
    assert first["output"] == [{"type": "message", "content": "one two"}]
    assert "model_load_time_seconds" in first["stats"]
    second = await (await c.post("/api/v1/chat", json={
        "model": "m", "input": [{"type": "message", "content": "three"}],
        "previous_response_id": first["response_id"], "max_output_tokens": 1,
        "store": False})).json()
    assert "response_id" not in second and "model_load_time_seconds" not in second["stats"]
    base = ports.openai.app[SCHEDULER].loaded("m")[0].base_url
    async with aiohttp.ClientSession() as s, s.get(base + "/fake/requests") as r:
        sent = [x["body"] for x in await r.json() if x["path"] == "/v1/chat/completions"]
    assert sent[-1]["messages"] == [{"role": "user", "content": "one two"},
                                    {"role": "assistant", "content": "one two"},
                                    {"role": "user", "content": "three"}]
    assert sent[-1]["max_tokens"] == 1


async def test_bad_requests(ports: Any) -> None:
    c = ports.lmstudio
    for body, status in [
        ({"model": "nope", "input": "x"}, 404),
        ({"model": "m"}, 400),
        ({"model": "m", "input": "x", "previous_response_id": "resp_gone"}, 400),
        ({"model": "m", "input": "x", "integrations": ["mcp/x"]}, 400),
        ({"model": "m", "input": "x", "temperature": "hot"}, 400),
    ]:
        r = await c.post("/api/v1/chat", json=body)
        assert r.status == status, body
        assert (await r.json())["error"]["message"]


def test_chat_store_is_bounded_lru() -> None:
    store = ChatStore(limit=2)
    a, b = store.put([{"n": 1}]), store.put([{"n": 2}])
    assert store.get(a) == [{"n": 1}]  # a is now the most recent
    c = store.put([{"n": 3}])
    assert store.get(b) is None and store.get(a) is not None and store.get(c) is not None
    assert len(store) == 2


async def test_store_lives_on_the_port_app(ports: Any) -> None:
    assert isinstance(ports.lmstudio.app[CHAT_STORE], ChatStore)
