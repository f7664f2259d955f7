"""ctx_size = "auto" and the context a call gets, against fake llama-servers; the
"too long" error through the real anthropic and openai clients.

Model ``a`` has an 8,192-token training context and 16 KiB of KV cache per token; ``b``
keeps one instance loaded (replicas.min = 1). On a 240 MiB budget ``a`` gets 4,096 tokens
beside ``b`` by default, and 8,192 at most (``b`` evicted for it). The fake counts a
token per word, plus 4 per message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import gguf
import lmstudio as lms
import numpy as np
import openai
import pytest

from proxy.keys import SCHEDULER
from scheduler.process.instance import State
from tests.conftest import make_config, wait_for

MiB = 2**20


def write_gguf(path: Path, context: int = 8192) -> Path:
    """A header Corral can size: 4 layers × 1 KV head × (1,024 + 1,024) × 2 bytes =
    16 KiB of KV cache per token."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(context)
    writer.add_embedding_length(64)
    writer.add_block_count(4)
    writer.add_head_count(1)
    writer.add_head_count_kv(1)
    writer.add_key_length(1024)
    writer.add_value_length(1024)
    writer.add_tensor("w", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
async def ports(corral_ports: Any, tmp_path: Path) -> Any:
    model = str(write_gguf(tmp_path / "a.gguf"))
    cfg = make_config(tmp_path, [
        {"name": "a", "path": model},
        {"name": "b", "path": model, "ctx_size": 2048, "replicas": {"min": 1, "max": 1}},
    ], scheduler={"memory_budget": 240 * MiB, "max_ctx": 32768})
    ports = await corral_ports(cfg)
    scheduler = ports.openai.app[SCHEDULER]
    await wait_for(lambda: any(i.state is State.READY for i in scheduler.loaded("b")))
    return ports


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def instances(ports: Any, model: str = "a") -> list[Any]:
    return [i for i in ports.openai.app[SCHEDULER].loaded(model) if i.state is State.READY]


async def argv_ctx(inst: Any) -> int:
    async with aiohttp.ClientSession() as s, s.get(inst.base_url + "/fake/stats") as r:
        argv = (await r.json())["argv"]
    return int(argv[argv.index("-c") + 1])


async def test_auto_gives_what_fits_beside_the_resident_model(ports: Any) -> None:
    r = await ports.openai.get("/admin/models")
    a = next(m for m in (await r.json())["models"] if m["name"] == "a")
    assert (a["ctx_size"], a["context"], a["max_context"]) == ("auto", 4096, 8192)
    r = await ports.openai.post("/v1/chat/completions", json={
        "model": "a", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status == 200, await r.text()
    (inst,) = instances(ports)
    assert inst.ctx == 4096
    assert await argv_ctx(inst) == 4096


async def test_ollama_num_ctx_gets_a_larger_replica(ports: Any) -> None:
    r = await ports.ollama.post("/api/chat", json={
        "model": "a", "messages": [{"role": "user", "content": "hi"}], "stream": False})
    assert r.status == 200
    (small,) = instances(ports)
    assert small.ctx == 4096
    r = await ports.ollama.post("/api/chat", json={
        "model": "a", "messages": [{"role": "user", "content": "hi"}], "stream": False,
        "options": {"num_ctx": 8192}})
    assert r.status == 200, await r.text()
    (big,) = instances(ports)
    # The idle 4,096-token instance made way (replicas.max = 1), and b was evicted for the
    # larger footprint: never a reload under running calls.
    assert big is not small and big.ctx == 8192 and await argv_ctx(big) == 8192
    # More than the model can have is served by the largest.
    r = await ports.ollama.post("/api/chat", json={
        "model": "a", "messages": [{"role": "user", "content": "hi"}], "stream": False,
        "options": {"num_ctx": 1 << 20}})
    assert r.status == 200
    assert instances(ports) == [big]


async def test_a_prompt_longer_than_the_default_gets_a_larger_replica(ports: Any) -> None:
    r = await ports.openai.post("/v1/chat/completions", json={
        "model": "a", "messages": [{"role": "user", "content": words(5000)}]})
    assert r.status == 200, await r.text()
    (inst,) = instances(ports)
    # 5,004 tokens: the next power of two, within the maximum.
    assert inst.ctx == 8192
    assert (await r.json())["usage"]["prompt_tokens"] == 5004


async def test_too_long_through_the_anthropic_client(ports: Any) -> None:
    client = anthropic.AsyncAnthropic(base_url=str(ports.openai.make_url("")), api_key="x",
                                      max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client.messages.create(model="a", max_tokens=32000, stream=True, messages=[
            {"role": "user", "content": words(9000)}])
    assert caught.value.status_code == 400
    body: Any = caught.value.body
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"] == "prompt is too long: 9004 tokens > 8192 maximum"
    # A prompt that fits is served though max_tokens would overflow: the answer ends at
    # the context's end, as Anthropic's current models do (Claude Code asks for 32,000).
    async with client.messages.stream(model="a", max_tokens=32000, messages=[
            {"role": "user", "content": words(7500)}]) as stream:
        answer = await stream.get_final_message()
    await client.close()
    assert answer.usage.input_tokens == 7504


async def test_too_long_through_the_openai_client(ports: Any) -> None:
    client = openai.AsyncOpenAI(base_url=str(ports.openai.make_url("/v1")), api_key="x",
                                max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="a", messages=[
            {"role": "user", "content": words(9000)}])
    assert caught.value.code == "context_length_exceeded"
    assert "maximum context length is 8192 tokens" in caught.value.message
    assert "resulted in 9004 tokens" in caught.value.message
    # prompt + max_tokens over the context: OpenAI's own refusal, counted before sending.
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="a", max_tokens=9000, messages=[
            {"role": "user", "content": words(100)}], stream=True)
    await client.close()
    assert caught.value.code == "context_length_exceeded"
    assert "(104 in the messages, 9000 in the completion)" in caught.value.message


async def test_too_long_in_ollama_and_lm_studio_words(ports: Any) -> None:
    long = [{"role": "user", "content": words(9000)}]
    r = await ports.ollama.post("/api/chat", json={"model": "a", "messages": long,
                                                   "stream": False})
    assert r.status == 400
    assert (await r.json())["error"].startswith("the input length exceeds the context length")
    r = await ports.lmstudio.post("/v1/chat/completions", json={"model": "a", "messages": long})
    assert r.status == 400
    err = (await r.json())["error"]
    assert err["code"] == "context_length_exceeded"
    assert "Try to load the model with a larger context length" in err["message"]


async def test_lm_studio_load_with_a_context_length(ports: Any) -> None:
    r = await ports.lmstudio.post("/api/v1/models/load",
                                  json={"model": "a", "context_length": 6000})
    assert r.status == 200, await r.text()
    (inst,) = instances(ports)
    assert inst.ctx == 8192
    r = await ports.lmstudio.get("/api/v0/models/a")
    info = await r.json()
    assert (info["loaded_context_length"], info["max_context_length"]) == (8192, 8192)


@pytest.mark.timeout(60)
async def test_lm_studio_sdk_load_with_a_context_and_too_long(ports: Any) -> None:
    async with lms.AsyncClient(f"127.0.0.1:{ports.lmstudio.server.port}") as client:
        model = await client.llm.load_new_instance("a", config={"contextLength": 6000})
        (inst,) = instances(ports)
        assert inst.ctx == 8192
        assert await model.get_context_length() == 8192
        with pytest.raises(lms.LMStudioError) as refused:
            await model.respond(words(9000), config={"maxTokens": 4})
    assert "Try to load the model with a larger context length" in str(refused.value)
