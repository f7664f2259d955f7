"""The Ollama port (11434) against fake llama-servers run as real child processes."""

from __future__ import annotations

import asyncio
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import gguf
import numpy as np
import pytest

from proxy.keys import SCHEDULER
from scheduler.process.instance import State
from tests.conftest import make_config, wait_for

TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}{% if tools %}tools{% endif %}"


def write_gguf(path: Path, arch: str = "llama", context: int = 2048) -> Path:
    """A small but real GGUF header; the fake never reads it, /api/show does."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("Tiny")
    writer.add_size_label("1K")
    writer.add_context_length(context)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_head_count(4)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    writer.add_chat_template(TEMPLATE)
    writer.add_token_list([f"t{i}" for i in range(5000)])  # long: shown as null
    writer.add_tensor("w", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def chat(model: str = "m", content: str = "hello there", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **kw}


async def ndjson(resp: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    raw = await resp.read()
    assert raw.endswith(b"\n")
    lines = raw.split(b"\n")[:-1]
    assert all(lines), "no blank lines in NDJSON"
    return [json.loads(line) for line in lines]


async def upstream_requests(ports: Any) -> list[dict[str, Any]]:
    inst = ports.ollama.app[SCHEDULER].instances()[0]
    async with aiohttp.ClientSession() as s, s.get(inst.base_url + "/fake/requests") as r:
        return list(await r.json())


async def upstream_stats(ports: Any) -> dict[str, Any]:
    inst = ports.ollama.app[SCHEDULER].instances()[0]
    async with aiohttp.ClientSession() as s, s.get(inst.base_url + "/fake/stats") as r:
        return dict(await r.json())


@pytest.fixture
async def ports(corral_ports: Any, tmp_path: Path) -> Any:
    cfg = make_config(tmp_path, [
        {"name": "m", "aliases": ["alias"], "path": str(write_gguf(tmp_path / "m.gguf"))},
        {"name": "tagged:2b"},
        {"name": "emb", "embedding": True},
    ])
    return await corral_ports(cfg)


# --- plain routes -------------------------------------------------------------------------


async def test_root_version_and_unknown_routes(ports: Any) -> None:
    c = ports.ollama
    for method in ("GET", "HEAD"):
        r = await c.request(method, "/")
        assert r.status == 200
    assert await (await c.get("/")).text() == "Ollama is running"
    r = await c.get("/api/version")
    assert r.headers["Content-Type"] == "application/json; charset=utf-8"
    version = (await r.json())["version"]
    assert all(part.isdigit() for part in version.split("."))
    r = await c.get("/api/nope")
    assert (r.status, await r.text()) == (404, "404 page not found")
    r = await c.get("/api/chat")
    assert r.status == 405


async def test_tags_lists_every_name_with_a_tag_and_gguf_details(ports: Any) -> None:
    r = await ports.ollama.get("/api/tags")
    assert r.status == 200
    models = (await r.json())["models"]
    assert [m["name"] for m in models] == ["m:latest", "alias:latest", "tagged:2b", "emb:latest"]
    assert all(m["model"] == m["name"] for m in models)
    m = models[0]
    datetime.fromisoformat(m["modified_at"].replace("Z", "+00:00"))
    assert len(m["digest"]) == 64 and int(m["digest"], 16) >= 0
    assert m["size"] > 0
    assert m["details"] == {"parent_model": "", "format": "gguf", "family": "llama",
                            "families": ["llama"], "parameter_size": "32",
                            "quantization_level": "Q4_K_M"}
    # Listing launches nothing.
    assert ports.ollama.app[SCHEDULER].instances() == []


async def test_show_reads_the_gguf(ports: Any) -> None:
    r = await ports.ollama.post("/api/show", json={"model": "m:latest"})
    assert r.status == 200
    body = await r.json()
    info = body["model_info"]
    assert info["general.architecture"] == "llama"
    assert info["llama.context_length"] == 2048
    assert info["general.parameter_count"] == 32
    assert info["tokenizer.ggml.tokens"] is None
    assert body["template"] == TEMPLATE
    assert body["capabilities"] == ["completion", "tools"]
    assert body["details"]["family"] == "llama"
    # Legacy "name"; a model with a minimal header still gets every field.
    r = await ports.ollama.post("/api/show", json={"name": "tagged:2b"})
    body = await r.json()
    assert body["model_info"]["general.architecture"] == "fake"
    assert body["capabilities"] == ["completion", "tools"]
    assert body["template"] == ""
    r = await ports.ollama.post("/api/show", json={"model": "emb"})
    assert (await r.json())["capabilities"] == ["embedding"]


# --- chat and generate ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["m", "m:latest", "alias", "alias:latest", "tagged:2b"])
async def test_chat_whole_answer_with_or_without_latest(ports: Any, name: str) -> None:
    r = await ports.ollama.post("/api/chat", json=chat(name, stream=False))
    assert r.status == 200, await r.text()
    assert r.headers["Content-Type"] == "application/json; charset=utf-8"
    body = await r.json()
    assert body["model"] == (name if ":" in name else name + ":latest")
    assert body["message"]["role"] == "assistant"
    assert body["message"]["content"] == "hello there hello there hello there hello there"
    assert body["done"] is True and body["done_reason"] == "stop"
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
                "eval_count", "eval_duration"):
        assert isinstance(body[key], int) and body[key] > 0, key
    assert body["eval_count"] == 8


async def test_chat_streams_ndjson_by_default(ports: Any) -> None:
    r = await ports.ollama.post("/api/chat", json=chat(options={"num_predict": 3}))
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("application/x-ndjson")
    lines = await ndjson(r)
    assert [line["message"]["content"] for line in lines] == ["hello", " there", " hello", ""]
    assert [line["done"] for line in lines] == [False, False, False, True]
    assert lines[-1]["done_reason"] == "length"
    assert lines[-1]["eval_count"] == 3
    assert lines[-1]["eval_duration"] >= 1


async def test_chat_sends_ollama_defaults_and_translations(ports: Any) -> None:
    body = {
        "model": "m",
        "stream": False,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "weather in Tokyo?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}]},
            {"role": "tool", "content": "11 degrees", "tool_name": "get_weather"},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}}}}],
        "format": {"type": "object"},
        "options": {"temperature": 0, "seed": 7, "stop": "END", "num_ctx": 4096},
        "think": False,
        "keep_alive": "10m",
    }
    r = await ports.ollama.post("/api/chat", json=body)
    assert r.status == 200, await r.text()
    sent = (await upstream_requests(ports))[-1]
    assert sent["path"] == "/v1/chat/completions"
    up = sent["body"]
    assert up["stream"] is True and up["stream_options"] == {"include_usage": True}
    assert (up["temperature"], up["seed"], up["stop"], up["top_p"], up["top_k"]) == (
        0.0, 7, ["END"], 0.9, 40)
    assert "num_ctx" not in up and "options" not in up and "keep_alive" not in up
    assert up["messages"][2]["tool_calls"][0]["function"]["arguments"] == '{"city":"Tokyo"}'
    assert up["messages"][3]["tool_call_id"] == up["messages"][2]["tool_calls"][0]["id"]
    assert up["response_format"]["type"] == "json_schema"
    assert up["chat_template_kwargs"] == {"enable_thinking": False}
    assert up["tools"] == body["tools"]
    inst = ports.ollama.app[SCHEDULER].instances()[0]
    assert inst.ttl_override == 600


async def test_generate_stream_and_whole(ports: Any) -> None:
    r = await ports.ollama.post("/api/generate", json={
        "model": "m", "prompt": "why is the sky blue", "system": "be brief",
        "options": {"num_predict": 2}})
    lines = await ndjson(r)
    assert [line["response"] for line in lines] == ["why", " is", ""]
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "length"
    sent = (await upstream_requests(ports))[-1]["body"]
    assert sent["messages"][0] == {"role": "system", "content": "be brief"}
    r = await ports.ollama.post("/api/generate", json={"model": "m", "prompt": "a b",
                                                       "stream": False, "raw": True})
    body = await r.json()
    assert body["response"].startswith("a b a b")
    assert body["done"] is True
    assert (await upstream_requests(ports))[-1]["path"] == "/v1/completions"


async def test_load_and_unload_probes(ports: Any) -> None:
    sched = ports.ollama.app[SCHEDULER]
    r = await ports.ollama.post("/api/chat", json={"model": "m", "messages": []})
    body = await r.json()
    assert body["done"] is True and body["done_reason"] == "load"
    assert body["message"] == {"role": "assistant", "content": ""}
    assert [i.state for i in sched.instances()] == [State.READY]
    r = await ports.ollama.post("/api/generate", json={"model": "m", "prompt": "",
                                                       "keep_alive": 0})
    body = await r.json()
    assert body["done_reason"] == "unload" and body["response"] == ""
    await wait_for(lambda: sched.instances() == [])
    # Open WebUI's "unload" on a model that is not loaded: nothing to do, same answer.
    r = await ports.ollama.post("/api/generate", json={"model": "m", "keep_alive": 0})
    assert (await r.json())["done_reason"] == "unload"
    assert sched.instances() == []


async def test_keep_alive_drives_the_idle_ttl(ports: Any) -> None:
    sched = ports.ollama.app[SCHEDULER]
    await ports.ollama.post("/api/chat", json=chat(stream=False, keep_alive=-1))
    assert sched.instances()[0].ttl_override == -1
    await ports.ollama.post("/api/chat", json=chat(stream=False))
    # Without keep_alive the model's configured TTL applies again.
    assert sched.instances()[0].ttl_override == sched.config.ttl(sched.resolve("m"))
    await ports.ollama.post("/api/chat", json=chat(stream=False, keep_alive="0s"))
    await wait_for(lambda: sched.instances() == [])


async def test_ps_lists_loaded_models(ports: Any) -> None:
    r = await ports.ollama.get("/api/ps")
    assert (await r.json())["models"] == []
    await ports.ollama.post("/api/chat", json=chat(stream=False, keep_alive="1h"))
    models = (await (await ports.ollama.get("/api/ps")).json())["models"]
    assert [m["name"] for m in models] == ["m:latest"]
    m = models[0]
    expires = datetime.fromisoformat(m["expires_at"].replace("Z", "+00:00"))
    assert 3500 < expires.timestamp() - datetime.now().timestamp() <= 3600
    # ctx_size "auto": the GGUF's 2,048-token training context.
    assert m["context_length"] == 2048
    assert m["details"]["family"] == "llama"
    assert isinstance(m["size_vram"], int)


# --- embeddings --------------------------------------------------------------------------


async def test_embed(ports: Any) -> None:
    r = await ports.ollama.post("/api/embed", json={"model": "emb", "input": ["a", "b c"]})
    assert r.status == 200, await r.text()
    body = await r.json()
    assert body["model"] == "emb:latest"
    assert len(body["embeddings"]) == 2
    for vec in body["embeddings"]:
        assert math.isclose(math.sqrt(sum(x * x for x in vec)), 1.0, rel_tol=1e-6)
    assert body["prompt_eval_count"] == 3
    assert isinstance(body["total_duration"], int)
    r = await ports.ollama.post("/api/embed", json={"model": "emb", "input": "a",
                                                    "dimensions": 3})
    (vec,) = (await r.json())["embeddings"]
    assert len(vec) == 3
    assert math.isclose(math.sqrt(sum(x * x for x in vec)), 1.0, rel_tol=1e-6)
    r = await ports.ollama.post("/api/embed", json={"model": "emb", "input": []})
    assert await r.json() == {"model": "emb:latest", "embeddings": []}
    r = await ports.ollama.post("/api/embed", json={"model": "emb", "input": [1]})
    assert (r.status, await r.json()) == (400, {"error": "invalid input type"})


async def test_legacy_embeddings(ports: Any) -> None:
    r = await ports.ollama.post("/api/embeddings", json={"model": "emb", "prompt": "hello"})
    assert len((await r.json())["embedding"]) == 8
    r = await ports.ollama.post("/api/embeddings", json={"model": "emb", "prompt": ""})
    assert await r.json() == {"embedding": []}


async def test_embed_on_a_chat_model_is_a_clear_400(ports: Any) -> None:
    r = await ports.ollama.post("/api/embed", json={"model": "m", "input": "x"})
    assert r.status == 400
    assert "does not support embeddings" in (await r.json())["error"]


# --- model management -----------------------------------------------------------------------


async def test_pull_of_a_configured_model_loads_it(ports: Any) -> None:
    r = await ports.ollama.post("/api/pull", json={"model": "m:latest"})
    assert r.status == 200
    lines = await ndjson(r)
    assert lines[0] == {"status": "pulling manifest"}
    assert lines[-1] == {"status": "success"}
    assert [i.state for i in ports.ollama.app[SCHEDULER].instances()] == [State.READY]
    r = await ports.ollama.post("/api/pull", json={"name": "m", "stream": False})
    assert await r.json() == {"status": "success"}


async def test_pull_of_an_unknown_model_is_404(ports: Any) -> None:
    r = await ports.ollama.post("/api/pull", json={"model": "nope"})
    assert r.status == 404
    assert (await r.json())["error"].startswith("model 'nope' not found")


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/api/push", {"model": "m"}, 501),
        ("POST", "/api/create", {"model": "x", "from": "m"}, 501),
        ("POST", "/api/copy", {"source": "m", "destination": "n"}, 501),
        ("POST", "/api/copy", {"source": "nope", "destination": "n"}, 404),
        ("DELETE", "/api/delete", {"model": "m"}, 501),
        ("DELETE", "/api/delete", {"model": "nope"}, 404),
        ("POST", "/api/blobs/sha256:00", {}, 501),
    ],
)
async def test_management_answers_clearly(
    ports: Any, method: str, path: str, body: dict[str, Any], status: int
) -> None:
    r = await ports.ollama.request(method, path, json=body)
    assert r.status == status
    assert r.headers["Content-Type"].startswith("application/json")
    assert (await r.json())["error"]


async def test_blob_head_is_404(ports: Any) -> None:
    r = await ports.ollama.head("/api/blobs/sha256:" + "0" * 64)
    assert r.status == 404


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"", 400, "missing request body"),
        (b"{nope", 400, "request body is not valid JSON"),
        (b"[]", 400, "request body must be a JSON object"),
        (b'{"messages": []}', 400, "model is required"),
        (b'{"model": "nope", "messages": []}', 404, "model 'nope' not found"),
        (b'{"model": "nope:latest"}', 404, "model 'nope:latest' not found"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "format": "xml"}',
         400, "invalid format"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "keep_alive": "x"}',
         400, "invalid duration"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "options": '
         b'{"temperature": "hot"}}', 400, "option 'temperature' must be a number"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "think": "lots"}',
         400, "invalid think value"),
    ],
)
async def test_error_shapes(ports: Any, data: bytes, status: int, message: str) -> None:
    r = await ports.ollama.post("/api/chat", data=data)
    assert r.status == status
    assert r.headers["Content-Type"].startswith("application/json")
    body = await r.json()
    assert list(body) == ["error"]
    assert isinstance(body["error"], str) and message in body["error"]
    # Bad requests launch nothing.
    assert ports.ollama.app[SCHEDULER].instances() == []


async def test_upstream_errors_keep_their_status(ports: Any) -> None:
    # The fake rejects embeddings without --embedding (501, as llama-server) and has no
    # /infill route: a 404 there is the gateway's problem, never "model not found",
    # which clients answer by pulling.
    r = await ports.ollama.post("/api/generate", json={"model": "m", "prompt": "def f(",
                                                       "suffix": "return 1", "stream": False})
    assert r.status == 502
    assert list(await r.json()) == ["error"]


async def test_busy_is_503(corral_ports: Any, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "m", "env": {"FAKE_TOKEN_DELAY": "0.1"}}],
                      scheduler={"queue_size": 1})
    ports = await corral_ports(cfg)
    await ports.ollama.post("/api/chat", json={"model": "m", "messages": []})  # load

    async def slow() -> int:
        r = await ports.ollama.post("/api/chat", json=chat(stream=False,
                                                           options={"num_predict": 10}))
        await r.read()
        return int(r.status)

    first = asyncio.create_task(slow())
    await wait_for(lambda: ports.ollama.app[SCHEDULER].instances()[0].in_flight == 1)
    second = asyncio.create_task(slow())
    await asyncio.sleep(0.2)
    r = await ports.ollama.post("/api/chat", json=chat(stream=False))
    assert r.status == 503
    assert "Retry-After" in r.headers
    assert list(await r.json()) == ["error"]
    assert await first == 200 and await second == 200


async def test_mid_stream_crash_ends_with_an_error_line(corral_ports: Any, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "m", "env": {"FAKE_CRASH_AFTER_CHUNKS": "2"}}])
    ports = await corral_ports(cfg)
    r = await ports.ollama.post("/api/chat", json=chat(options={"num_predict": 10}))
    assert r.status == 200
    lines = await ndjson(r)
    assert [line["message"]["content"] for line in lines[:-1]] == ["hello", " there"]
    assert list(lines[-1]) == ["error"]
    assert "mid-stream" in lines[-1]["error"]
    assert not any(line.get("done") for line in lines)


async def test_mid_stream_crash_without_streaming_is_502(corral_ports: Any,
                                                         tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "m", "env": {"FAKE_CRASH_AFTER_CHUNKS": "2"}}])
    ports = await corral_ports(cfg)
    r = await ports.ollama.post("/api/generate", json={"model": "m", "prompt": "x y",
                                                       "stream": False})
    assert r.status == 502
    assert list(await r.json()) == ["error"]


async def test_client_disconnect_stops_the_upstream(corral_ports: Any, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "m", "env": {"FAKE_TOKEN_DELAY": "0.05"}}])
    ports = await corral_ports(cfg)
    resp = await ports.ollama.post("/api/chat", json=chat(options={"num_predict": 200}))
    await resp.content.readline()
    sched = ports.ollama.app[SCHEDULER]
    # The first lines may be loading feedback, sent before the lease while the fake
    # starts on a loaded machine: close once the call holds the slot.
    await wait_for(lambda: [i.in_flight for i in sched.instances()] == [1], within=30)
    await resp.content.readline()
    resp.close()
    await wait_for(lambda: sched.instances()[0].in_flight == 0)
    stats: dict[str, Any] = {}

    async def cancelled() -> bool:
        stats.update(await upstream_stats(ports))
        return bool(stats["cancelled"] == 1)

    for _ in range(100):
        if await cancelled():
            break
        await asyncio.sleep(0.05)
    assert stats["cancelled"] == 1


# --- CORS and /v1 -----------------------------------------------------------------------------


async def test_cors_as_ollama(ports: Any) -> None:
    c = ports.ollama
    r = await c.options("/api/chat", headers={"Origin": "http://localhost:3000",
                                              "Access-Control-Request-Method": "POST",
                                              "Access-Control-Request-Headers": "content-type"})
    assert r.status == 204
    assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "Content-Type" in r.headers["Access-Control-Allow-Headers"]
    r = await c.get("/api/tags", headers={"Origin": "app://obsidian.md"})
    assert r.headers["Access-Control-Allow-Origin"] == "app://obsidian.md"
    r = await c.get("/api/tags", headers={"Origin": "https://evil.example"})
    assert r.status == 403
    assert "Access-Control-Allow-Origin" not in r.headers
    r = await c.get("/api/tags")
    assert "Access-Control-Allow-Origin" not in r.headers


async def test_openai_routes_on_the_ollama_port(ports: Any) -> None:
    r = await ports.ollama.get("/v1/models")
    assert [m["id"] for m in (await r.json())["data"]] == ["m", "alias", "tagged:2b", "emb"]
    r = await ports.ollama.post("/v1/chat/completions", json=chat(max_tokens=2))
    body = await r.json()
    assert body["choices"][0]["message"]["content"] == "hello there"
    r = await ports.ollama.post("/v1/chat/completions", json=chat("nope"))
    assert r.status == 404
