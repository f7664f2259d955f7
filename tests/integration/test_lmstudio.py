"""The LM Studio port (1234) against fake llama-servers run as real child processes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.keys import SCHEDULER
from scheduler.process.instance import State
from tests.conftest import make_config, wait_for
from tests.integration.test_ollama import write_gguf


def chat(model: str = "m", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], **kw}


async def sse(resp: aiohttp.ClientResponse) -> tuple[list[dict[str, Any]], bool]:
    """The JSON events of an SSE answer, and whether it ended with [DONE]."""
    events, done = [], False
    async for raw in resp.content:
        line = raw.strip()
        if not line:
            continue
        assert line.startswith(b"data: ")
        if line == b"data: [DONE]":
            done = True
        else:
            events.append(json.loads(line[6:]))
    return events, done


def assert_openai_error(body: Any, message: str) -> None:
    assert set(body) == {"error"}
    assert message in body["error"]["message"]
    assert body["error"]["type"]


@pytest.fixture
async def ports(corral_ports: Any, tmp_path: Path) -> Any:
    cfg = make_config(tmp_path, [
        {"name": "m", "aliases": ["alias"], "path": str(write_gguf(tmp_path / "m.gguf"))},
        {"name": "emb", "embedding": True},
    ])
    return await corral_ports(cfg)


async def test_v1_is_the_openai_pass_through(ports: Any) -> None:
    c = ports.lmstudio
    r = await c.get("/v1/models")
    assert [m["id"] for m in (await r.json())["data"]] == ["m", "alias", "emb"]
    r = await c.post("/v1/chat/completions", json=chat(max_tokens=2))
    assert (await r.json())["choices"][0]["message"]["content"] == "hello there"
    r = await c.post("/v1/chat/completions", json=chat(max_tokens=2, stream=True))
    events, done = await sse(r)
    assert done and "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]
    ) == "hello there"
    r = await c.post("/v1/completions", json={"model": "m", "prompt": "a b", "max_tokens": 2})
    assert (await r.json())["choices"][0]["text"] == "a b"
    r = await c.post("/v1/embeddings", json={"model": "emb", "input": "x"})
    assert len((await r.json())["data"][0]["embedding"]) == 8


async def test_ttl_sets_the_idle_timeout(ports: Any) -> None:
    sched = ports.lmstudio.app[SCHEDULER]
    r = await ports.lmstudio.post("/v1/chat/completions", json=chat(max_tokens=1, ttl=900))
    assert r.status == 200
    assert sched.instances()[0].ttl_override == 900
    r = await ports.lmstudio.post("/api/v0/chat/completions", json=chat(max_tokens=1, ttl=0))
    assert r.status == 200
    await wait_for(lambda: sched.instances() == [])
    r = await ports.lmstudio.post("/v1/chat/completions", json=chat(ttl="soon"))
    assert r.status == 400
    assert_openai_error(await r.json(), "ttl")


async def test_unknown_model_is_an_openai_404_everywhere(ports: Any) -> None:
    c = ports.lmstudio
    for method, path, body in [
        ("POST", "/v1/chat/completions", chat("nope")),
        ("POST", "/api/v0/chat/completions", chat("nope")),
        ("POST", "/api/v0/completions", {"model": "nope", "prompt": "x"}),
        ("GET", "/api/v0/models/nope", None),
        ("POST", "/api/v1/models/load", {"model": "nope"}),
        ("POST", "/api/v1/models/unload", {"instance_id": "nope"}),
    ]:
        r = await c.request(method, path, json=body)
        assert r.status == 404, path
        assert_openai_error(await r.json(), "nope")


async def test_v0_models(ports: Any) -> None:
    c = ports.lmstudio
    data = (await (await c.get("/api/v0/models")).json())["data"]
    assert [m["id"] for m in data] == ["m", "alias", "emb"]
    m = data[0]
    assert m == {
        "id": "m", "object": "model", "type": "llm", "publisher": "corral", "arch": "llama",
        "compatibility_type": "gguf", "quantization": "Q4_K_M", "state": "not-loaded",
        "max_context_length": 2048, "capabilities": ["tool_use"],
    }
    assert data[2]["type"] == "embeddings"
    await c.post("/api/v1/models/load", json={"model": "m"})
    one = await (await c.get("/api/v0/models/alias")).json()
    assert one["state"] == "loaded"
    assert one["loaded_context_length"] == 2048


async def test_v0_chat_adds_stats_model_info_and_runtime(ports: Any) -> None:
    r = await ports.lmstudio.post("/api/v0/chat/completions", json=chat(max_tokens=3))
    assert r.status == 200
    body = await r.json()
    assert body["choices"][0]["message"]["content"] == "hello there hello"
    stats = body["stats"]
    assert stats["stop_reason"] == "maxPredictedTokensReached"
    assert stats["tokens_per_second"] > 0
    assert stats["time_to_first_token"] > 0 and stats["generation_time"] > 0
    assert body["model_info"] == {"arch": "llama", "quant": "Q4_K_M", "format": "gguf",
                                  "context_length": 2048}
    assert body["runtime"]["supported_formats"] == ["gguf"]
    assert body["runtime"]["version"].startswith("b")
    r = await ports.lmstudio.post("/api/v0/completions",
                                  json={"model": "m", "prompt": "a b"})
    body = await r.json()
    assert body["choices"][0]["text"]
    assert body["stats"]["stop_reason"] == "eosFound"


@pytest.mark.parametrize("usage", [False, True])
async def test_v0_stream_puts_the_extras_on_the_last_chunk(ports: Any, usage: bool) -> None:
    body = chat(max_tokens=2, stream=True)
    if usage:
        body["stream_options"] = {"include_usage": True}
    r = await ports.lmstudio.post("/api/v0/chat/completions", json=body)
    assert r.headers["Content-Type"].startswith("text/event-stream")
    events, done = await sse(r)
    assert done
    assert [e for e in events[:-1] if "stats" in e] == []
    last = events[-1]
    assert last["stats"]["stop_reason"] == "maxPredictedTokensReached"
    assert last["model_info"]["arch"] == "llama"
    assert last["runtime"]["name"].startswith("llama.cpp")
    assert ("usage" in last) is usage


async def test_v0_stream_crash_ends_with_an_error_event(corral_ports: Any,
                                                        tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "m", "env": {"FAKE_CRASH_AFTER_CHUNKS": "1"}}])
    ports = await corral_ports(cfg)
    r = await ports.lmstudio.post("/api/v0/chat/completions",
                                  json=chat(max_tokens=5, stream=True))
    events, done = await sse(r)
    assert not done
    assert "mid-stream" in events[-1]["error"]["message"]


async def test_v1_models_load_and_unload(ports: Any) -> None:
    c = ports.lmstudio
    sched = c.app[SCHEDULER]
    models = (await (await c.get("/api/v1/models")).json())["models"]
    assert [m["key"] for m in models] == ["m", "alias", "emb"]
    m = models[0]
    assert m["type"] == "llm" and m["format"] == "gguf"
    assert m["architecture"] == "llama" and m["display_name"] == "Tiny"
    assert m["quantization"] == {"name": "Q4_K_M", "bits_per_weight": 4}
    assert m["loaded_instances"] == [] and m["max_context_length"] == 2048
    assert m["capabilities"] == {"vision": False, "trained_for_tool_use": True}
    assert models[2]["type"] == "embedding"

    r = await c.post("/api/v1/models/load", json={"model": "m", "ttl": 60})
    body = await r.json()
    assert body["status"] == "loaded" and body["instance_id"] == "m" and body["type"] == "llm"
    assert [i.state for i in sched.instances()] == [State.READY]
    assert sched.instances()[0].ttl_override == 60
    models = (await (await c.get("/api/v1/models")).json())["models"]
    assert models[0]["loaded_instances"] == [
        {"id": "m", "config": {"context_length": 2048, "parallel": 1}}]

    r = await c.post("/api/v1/models/unload", json={"instance_id": "m"})
    assert await r.json() == {"instance_id": "m"}
    await wait_for(lambda: sched.instances() == [])
    r = await c.post("/api/v1/models/unload", json={"instance_id": "m"})
    assert r.status == 404


async def test_greeting_answers_the_sdk_probe(ports: Any) -> None:
    # The SDK protocol itself is tested in test_lmstudio_sdk.py.
    r = await ports.lmstudio.get("/lmstudio-greeting")
    assert r.status == 200
    assert await r.json() == {"lmstudio": True}


async def test_bad_requests_are_openai_shaped(ports: Any) -> None:
    r = await ports.lmstudio.post("/api/v0/chat/completions", data=b"{nope",
                                  headers={"Content-Type": "application/json"})
    assert r.status == 400
    assert_openai_error(await r.json(), "not valid JSON")
    r = await ports.lmstudio.get("/api/v9/whatever")
    assert r.status == 404
    assert set(await r.json()) == {"error"}
