"""The context rule through the real llama-server and Gemma 3 270M: ctx_size = "auto"
sized to the memory budget, a larger replica for a prompt longer than the default, and
the "too long" error (counted by llama-server's tokenizer) through the real anthropic
and openai clients."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from scheduler.config.root import ModelConfig
from scheduler.models.sources import model_size
from tests.e2e.conftest import CorralProc, Tidy, model_toml

pytestmark = pytest.mark.e2e


def budget(gemma: Path) -> int:
    """Room for Gemma at 4,096 tokens beside a resident Gemma at 512, not at 5,120: the
    auto model's default is 4,096 and its maximum 8,192 (max_ctx), the resident evicted
    for it."""
    size = model_size(ModelConfig(name="g", path=gemma), gemma)
    assert size is not None
    return size.bytes(4096) + size.bytes(512) + 4 * 2**20


@pytest.fixture
def served(corral: Callable[..., CorralProc], gemma: Path) -> CorralProc:
    models = (
        model_toml("auto", gemma, ctx_size="auto", chat_template="gemma3", threads=2)
        + model_toml("resident", gemma, ctx_size=512, chat_template="gemma3",
                     replicas={"min": 1, "max": 1})
        + model_toml("short", gemma, ctx_size=512, chat_template="gemma3")
    )
    return corral(models, scheduler=f"max_ctx = 8192\nmemory_budget = {budget(gemma)}")


def models(cp: CorralProc) -> dict[str, dict[str, object]]:
    listing = httpx.get(cp.url + "/admin/models", timeout=30).json()["models"]
    return {m["name"]: m for m in listing}


def test_auto_context_and_a_larger_replica(served: CorralProc, tidy: Tidy) -> None:
    auto = models(served)["auto"]
    assert (auto["ctx_size"], auto["context"], auto["max_context"]) == ("auto", 4096, 8192)
    client = tidy(openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0,
                                timeout=300))
    small = client.chat.completions.create(
        model="auto", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert small.choices[0].message is not None
    (inst,) = models(served)["auto"]["instances"]  # type: ignore[misc]
    assert inst["ctx_size"] == 4096
    # Longer than 4,096 tokens: llama-server refuses it on the small instance (its own
    # count), and an 8,192-token replica takes it, the idle small one and the resident
    # model making way.
    long = client.chat.completions.create(
        model="auto", max_tokens=4, messages=[{"role": "user", "content": "hello " * 4200}])
    client.close()
    assert long.usage is not None and 4096 < long.usage.prompt_tokens < 8192
    listing = models(served)
    (inst,) = [i for i in listing["auto"]["instances"]  # type: ignore[attr-defined]
               if i["state"] == "ready"]
    assert inst["ctx_size"] == 8192
    assert [i["state"] for i in listing["resident"]["instances"]] == []  # type: ignore[attr-defined]
    # The slot really has that much.
    props = httpx.get(inst["base_url"] + "/props", timeout=30).json()
    assert props["default_generation_settings"]["n_ctx"] == 8192


def test_too_long_in_each_family_through_the_real_clients(served: CorralProc, tidy: Tidy) -> None:
    text = "hello " * 800
    claude = tidy(anthropic.Anthropic(base_url=served.url, api_key="x", max_retries=0, timeout=300))
    counted = claude.messages.count_tokens(
        model="short", messages=[{"role": "user", "content": text}]).input_tokens
    assert counted > 512
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude.messages.create(model="short", max_tokens=32000, stream=True,
                               messages=[{"role": "user", "content": text}])
    claude.close()
    body = refused.value.body
    assert isinstance(body, dict)
    assert body["error"]["type"] == "invalid_request_error"
    # llama-server's own count of the prompt, the model's own context.
    assert body["error"]["message"] == f"prompt is too long: {counted} tokens > 512 maximum"

    oai = tidy(openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0, timeout=300))
    with pytest.raises(openai.BadRequestError) as too_long:
        oai.chat.completions.create(model="short", messages=[{"role": "user", "content": text}])
    assert too_long.value.code == "context_length_exceeded"
    assert "maximum context length is 512 tokens" in too_long.value.message
    # prompt + max_tokens over the context: counted before sending, refused as OpenAI does.
    with pytest.raises(openai.BadRequestError) as with_output:
        oai.chat.completions.create(model="short", max_tokens=600,
                                    messages=[{"role": "user", "content": "Hi"}])
    oai.close()
    assert with_output.value.code == "context_length_exceeded"
    assert "600 in the completion" in with_output.value.message
    # Ollama's words.
    r = httpx.post(f"http://127.0.0.1:{served.ollama_port}/api/chat", timeout=300, json={
        "model": "short", "stream": False, "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 400
    assert r.json()["error"].startswith("the input length exceeds the context length")
