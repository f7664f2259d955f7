"""The API families through the real llama-server and Gemma 3 270M, driven by the real
client libraries: ``anthropic`` (Messages, streaming, count_tokens, tool use, 404) and
``openai`` (Responses plain and streamed, input_tokens) on all three ports; the
native routes with httpx; rerank and embeddings on Gemma started with --rerank and
--embedding; llama-server's own error for a model without audio; loading comments of
a cold stream seen by a raw SSE reader."""

from __future__ import annotations

import io
import threading
import wave
from collections.abc import Callable
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.e2e.conftest import CorralProc, Tidy, model_toml, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture
def served(corral: Callable[..., CorralProc], gemma: Path) -> CorralProc:
    models = (
        model_toml("gemma", gemma, aliases=["default"], chat_template="gemma3",
                   parallel=2)
        + model_toml("gemma-rerank", gemma, rerank=True)
        # Gemma's GGUF sets no pooling; OpenAI embeddings need one.
        + model_toml("gemma-embed", gemma, embedding=True, args=["--pooling", "mean"])
    )
    return corral(models, scheduler="max_instances = 3")


def urls(cp: CorralProc) -> list[str]:
    return [cp.url, f"http://127.0.0.1:{cp.ollama_port}", f"http://127.0.0.1:{cp.lmstudio_port}"]


HELLO = [{"role": "user", "content": "Hello, how are you?"}]


def test_anthropic_sdk_on_every_port(served: CorralProc, tidy: Tidy) -> None:
    for base in urls(served):
        client = tidy(anthropic.Anthropic(base_url=base, api_key="x", max_retries=0))
        msg = client.messages.create(model="default", max_tokens=8, messages=HELLO)
        assert msg.type == "message" and msg.content and msg.content[0].type == "text"
        assert msg.stop_reason in ("max_tokens", "end_turn") and msg.usage.output_tokens > 0
        with client.messages.stream(model="default", max_tokens=8, messages=HELLO) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert text and final.content[0].text == text  # type: ignore[union-attr]
        count = client.messages.count_tokens(model="default", messages=HELLO)
        assert count.input_tokens > 0
        with pytest.raises(anthropic.NotFoundError) as e:
            client.messages.create(model="nope", max_tokens=4, messages=HELLO)
        assert e.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
        # Closed here: a pooled socket left to the GC fails a later test (unraisable
        # ResourceWarning).
        client.close()


def test_anthropic_tool_use_round_trip(served: CorralProc, tidy: Tidy) -> None:
    """Gemma 270M will not call a tool on its own; the assistant's tool_use turn is
    scripted, and the model answers after the tool_result: every block type travels
    through llama-server's Anthropic conversion."""
    client = tidy(anthropic.Anthropic(base_url=served.url, api_key="x", max_retries=0))
    tools = [{"name": "get_weather", "description": "Weather in a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"]}}]
    msg = client.messages.create(
        model="default", max_tokens=8, tools=tools,  # type: ignore[arg-type]
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                 "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny, 21 C"}]},
        ],
    )
    assert msg.role == "assistant" and msg.content
    client.close()


def test_openai_responses_on_every_port(served: CorralProc, tidy: Tidy) -> None:
    for base in urls(served):
        client = tidy(openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0))
        # Kept (the SDK's default): through Corral's store, which answers as OpenAI does
        # when max_output_tokens cuts the answer short.
        resp = client.responses.create(model="default", input="Hello", max_output_tokens=8)
        assert resp.output_text and (resp.status == "completed" or (
            resp.status == "incomplete"
            and resp.incomplete_details.reason == "max_output_tokens")), resp
        # previous_response_id: the follow-up's prompt holds the first exchange.
        again = client.responses.create(model="default", input="And again?",
                                        max_output_tokens=8, previous_response_id=resp.id)
        assert again.output_text and resp.usage and again.usage
        assert again.usage.input_tokens > resp.usage.input_tokens + resp.usage.output_tokens
        kinds = [e.type for e in client.responses.create(
            model="default", input="Hello", max_output_tokens=8, stream=True)]
        assert kinds[0] == "response.created"
        assert kinds[-1] in ("response.completed", "response.incomplete")
        assert "response.output_text.delta" in kinds
        # Not kept (store false): llama-server's own Responses, passed through.
        resp = client.responses.create(model="default", input="Hello", max_output_tokens=8,
                                       store=False)
        assert resp.status == "completed" and resp.output_text
        kinds = [e.type for e in client.responses.create(
            model="default", input="Hello", max_output_tokens=8, stream=True, store=False)]
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        assert "response.output_text.delta" in kinds
        r = httpx.post(base + "/v1/responses/input_tokens",
                       json={"model": "default", "input": "Hello there"}, timeout=60)
        assert r.status_code == 200 and r.json()["input_tokens"] > 0
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model="nope", input="x")
        client.close()


def test_native_routes(served: CorralProc) -> None:
    base = served.url
    r = httpx.post(base + "/tokenize", json={"model": "gemma", "content": "Hello world"},
                   timeout=60)
    tokens = r.json()["tokens"]
    assert r.status_code == 200 and len(tokens) >= 2
    r = httpx.post(base + "/detokenize", json={"model": "gemma", "tokens": tokens}, timeout=30)
    assert "Hello world" in r.json()["content"]
    r = httpx.post(base + "/apply-template", json={"model": "gemma", "messages": HELLO},
                   timeout=30)
    assert r.json()["prompt"] == (
        "<start_of_turn>user\nHello, how are you?<end_of_turn>\n<start_of_turn>model\n")
    r = httpx.post(base + "/infill", json={"model": "gemma", "input_prefix": "def add(a, b):",
                                           "input_suffix": "\n", "n_predict": 4}, timeout=60)
    # Gemma 3 has no fill-in-the-middle tokens: llama-server's own 4xx comes back as it is.
    assert r.status_code in (200, 400, 501), r.text
    r = httpx.get(base + "/props", params={"model": "gemma"}, timeout=30)
    assert r.status_code == 200 and "default_generation_settings" in r.json()


def test_rerank_and_embeddings(served: CorralProc) -> None:
    r = httpx.post(served.url + "/v1/rerank", timeout=120, json={
        "model": "gemma-rerank", "query": "a cat", "documents": ["a cat sat", "stock prices"]})
    assert r.status_code == 200, r.text
    # Gemma has no reranking head, so the scores mean little; their shape is the test.
    results = r.json()["results"]
    assert {x["index"] for x in results} == {0, 1}
    assert all(isinstance(x["relevance_score"], float) for x in results)
    r = httpx.post(served.url + "/v1/embeddings", timeout=120,
                   json={"model": "gemma-embed", "input": ["hello", "world"]})
    assert r.status_code == 200 and len(r.json()["data"]) == 2
    # A chat model does not rerank: Corral says which model does.
    r = httpx.post(served.url + "/v1/rerank", timeout=30,
                   json={"model": "gemma", "query": "q", "documents": ["d"]})
    assert r.status_code == 400 and "gemma-rerank" in r.json()["error"]["message"]


def _wav() -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * 1600)
    return buf.getvalue()


def test_transcription_relays_llama_servers_error(corral: Callable[..., CorralProc],
                                                  gemma: Path, tidy: Tidy) -> None:
    """Gemma has no audio projector: llama-server's own error reaches an OpenAI client
    in OpenAI's envelope (the model is declared audio-capable to get past Corral)."""
    cp = corral(model_toml("gemma", gemma, capabilities=["chat", "audio"]))
    client = tidy(openai.OpenAI(base_url=cp.url + "/v1", api_key="x", max_retries=0))
    with pytest.raises(openai.APIStatusError) as e:
        client.audio.transcriptions.create(model="gemma", file=("a.wav", _wav(), "audio/wav"))
    assert 400 <= e.value.status_code < 600
    assert isinstance(e.value.body, dict) and "message" in e.value.body
    client.close()


def test_a_waiting_stream_shows_loading_comments(corral: Callable[..., CorralProc],
                                                 gemma: Path) -> None:
    """One slot, taken by a long call started first: the stream behind it waits through
    the load and the queue, and says so in SSE comments before its first token."""
    cp = corral(model_toml("gemma", gemma, chat_template="gemma3", parallel=1))
    long_call = threading.Thread(target=httpx.post, args=(cp.url + "/v1/completions",), kwargs={
        "json": {"model": "gemma", "prompt": "Once upon a time", "max_tokens": 160,
                 "ignore_eos": True}, "timeout": 120})
    long_call.start()
    # Wait until the long call holds the one slot: the stream then waits behind it.
    wait_until(lambda: any(i["in_flight"] for i in httpx.get(
        cp.url + "/admin/instances", timeout=5).json()["instances"]), timeout=60, step=0.02)
    lines: list[str] = []
    try:
        with httpx.stream("POST", cp.url + "/v1/chat/completions", timeout=120, json={
            "model": "gemma", "stream": True, "max_tokens": 4, "messages": HELLO,
        }) as r:
            lines.extend(r.iter_lines())
    finally:
        long_call.join(timeout=120)
    comments = [x for x in lines if x.startswith(":")]
    data = [x for x in lines if x.startswith("data:")]
    assert comments, lines[:5]
    assert all(c.startswith((": loading gemma", ": waiting for a free slot on gemma"))
               for c in comments), comments
    assert lines.index(comments[-1]) < lines.index(data[0])
    assert data[-1] == "data: [DONE]"
