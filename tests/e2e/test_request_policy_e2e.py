"""Request policy and variants through the real llama-server and Gemma 3 270M, driven
by the real ``openai``, ``anthropic`` and ``ollama`` clients: a ``max_tokens`` clamp of
5 holds although every client asks for 200; a variant whose params ask llama-server
for log-probabilities gets them, from the same child process as its model (one
launch); an unlisted variant is callable and listed nowhere."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest

from tests.e2e.conftest import CorralProc, Tidy

pytestmark = pytest.mark.e2e

ASK = [{"role": "user", "content": "Tell me a long story about a dragon."}]


@pytest.fixture
def served(corral: Callable[..., CorralProc], gemma: Path) -> CorralProc:
    models = f"""
[[models]]
name = "gemma"
path = "{gemma}"
chat_template = "gemma3"
ctx_size = 1024
parallel = 2
threads = 1

[models.request]
clamp = {{ max_tokens = {{ max = 5 }} }}

[[models.variants]]
name = "gemma:probs"
params = {{ logprobs = true, top_logprobs = 2 }}

[[models.variants]]
name = "gemma:quiet"
unlisted = true
params = {{ chat_template_kwargs.enable_thinking = false }}
"""
    return corral(models)


def test_a_clamp_holds_for_the_openai_anthropic_and_ollama_clients(
    served: CorralProc, tidy: Tidy
) -> None:
    oai = tidy(openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0))
    chat = oai.chat.completions.create(model="gemma", messages=ASK,
                                       max_tokens=200)
    assert chat.usage is not None and 0 < chat.usage.completion_tokens <= 5
    responses = oai.responses.create(model="gemma", input="Tell me a long story.",
                                     max_output_tokens=200)
    assert responses.usage is not None and 0 < responses.usage.output_tokens <= 5
    oai.close()
    claude = tidy(anthropic.Anthropic(base_url=served.url, api_key="x", max_retries=0))
    msg = claude.messages.create(model="gemma", max_tokens=200,
                                 messages=ASK)
    assert 0 < msg.usage.output_tokens <= 5
    claude.close()
    with ollama.Client(host=f"http://127.0.0.1:{served.ollama_port}", timeout=120) as c:
        answer = c.chat(model="gemma", messages=ASK, options={"num_predict": 200})
        assert answer.eval_count is not None and 0 < answer.eval_count <= 5
        made = c.generate(model="gemma", prompt="Once upon a time",
                          options={"num_predict": 200})
        assert made.eval_count is not None and 0 < made.eval_count <= 5
        # Ollama's default is no limit at all: the clamp gives it one.
        answer = c.chat(model="gemma", messages=ASK)
        assert answer.eval_count is not None and 0 < answer.eval_count <= 5


def test_variants_share_the_models_instance(served: CorralProc, tidy: Tidy) -> None:
    oai = tidy(openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0))
    plain = oai.chat.completions.create(model="gemma", messages=ASK,
                                        max_tokens=200)
    assert plain.choices[0].logprobs is None
    probs = oai.chat.completions.create(model="gemma:probs",
                                        messages=ASK,
                                        max_tokens=200)
    # The variant's params reached llama-server; the model's clamp still holds.
    logprobs = probs.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert all(len(t.top_logprobs) == 2 for t in logprobs.content)
    assert probs.usage is not None and probs.usage.completion_tokens <= 5
    quiet = oai.chat.completions.create(model="gemma:quiet",
                                        messages=ASK)
    assert quiet.usage is not None and quiet.usage.completion_tokens <= 5
    listed = [m.id for m in oai.models.list()]
    assert "gemma" in listed and "gemma:probs" in listed and "gemma:quiet" not in listed
    oai.close()
    # One llama-server for the model and both variants: one launch, one child.
    assert len(served.children()) == 1
    metrics = httpx.get(served.url + "/metrics").text
    assert 'corral_instance_launches_total{model="gemma",result="ok"} 1.0' in metrics
    counted = [line for line in metrics.splitlines()
               if line.startswith("corral_requests_total{")
               and 'endpoint="/v1/chat/completions"' in line]
    assert any('model="gemma:probs"' in line for line in counted), counted
    assert any('model="gemma:quiet"' in line for line in counted), counted
