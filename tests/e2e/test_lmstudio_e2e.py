"""The LM Studio port through the real llama-server and Gemma 3 270M: the `openai`
package on /v1, LM Studio's REST API (/api/v0, /api/v1), and ChatBox's LM Studio
provider replayed with httpx."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import CorralProc, wait_until
from tests.e2e.test_ollama_e2e import HELLO, models

pytestmark = pytest.mark.e2e


def url(c: CorralProc) -> str:
    return f"http://127.0.0.1:{c.lmstudio_port}"


@pytest.fixture
def served(corral, gemma: Path) -> CorralProc:
    return corral(models(gemma))


def test_openai_package_on_v1(served: CorralProc) -> None:
    with openai.OpenAI(base_url=url(served) + "/v1", api_key="lm-studio", max_retries=0,
                       timeout=120) as client:
        assert [m.id for m in client.models.list().data] == ["gemma", "gemma-embed"]
        whole = client.chat.completions.create(model="gemma", messages=HELLO,  # type: ignore[arg-type]
                                               max_tokens=8)
        assert whole.choices[0].message.content
        stream = client.chat.completions.create(
            model="gemma", messages=HELLO, max_tokens=8, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
            extra_body={"ttl": 600},
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text
        comp = client.completions.create(model="gemma", prompt="Once upon a time", max_tokens=4)
        assert comp.choices[0].text
        vec = client.embeddings.create(model="gemma-embed", input=["a", "b"]).data
        assert [len(v.embedding) for v in vec] == [640, 640]


def test_rest_v0(served: CorralProc) -> None:
    with httpx.Client(base_url=url(served), timeout=120) as h:
        data = h.get("/api/v0/models").json()["data"]
        assert [(m["id"], m["type"], m["state"]) for m in data] == [
            ("gemma", "llm", "not-loaded"), ("gemma-embed", "embeddings", "not-loaded")]
        assert (data[0]["arch"], data[0]["quantization"], data[0]["compatibility_type"]) == (
            "gemma3", "Q4_K_M", "gguf")
        # The most context a call can get from Corral: this model's fixed ctx_size (an
        # "auto" one lists its training context capped by max_ctx and memory).
        assert data[0]["max_context_length"] == 1024

        body = h.post("/api/v0/chat/completions", json={
            "model": "gemma", "messages": HELLO, "max_tokens": 8}).json()
        assert body["choices"][0]["message"]["content"]
        assert body["stats"]["tokens_per_second"] > 0
        assert body["stats"]["stop_reason"] in ("eosFound", "maxPredictedTokensReached")
        assert body["model_info"] == {"arch": "gemma3", "quant": "Q4_K_M", "format": "gguf",
                                      "context_length": 1024}
        assert body["runtime"]["supported_formats"] == ["gguf"]

        events = []
        with h.stream("POST", "/api/v0/chat/completions", json={
            "model": "gemma", "messages": HELLO, "max_tokens": 8, "stream": True,
        }) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
        assert "stats" in events[-1] and "model_info" in events[-1]
        assert not any("stats" in e for e in events[:-1])

        one = h.get("/api/v0/models/gemma").json()
        assert one["state"] == "loaded" and one["loaded_context_length"] == 1024

        comp = h.post("/api/v0/completions", json={
            "model": "gemma", "prompt": "Once upon a time", "max_tokens": 4}).json()
        assert comp["choices"][0]["text"]
        assert comp["stats"]["stop_reason"] == "maxPredictedTokensReached"


def test_rest_v1_load_unload_and_ttl(served: CorralProc) -> None:
    with httpx.Client(base_url=url(served), timeout=120) as h:
        listed = h.get("/api/v1/models").json()["models"]
        assert [(m["key"], m["type"]) for m in listed] == [("gemma", "llm"),
                                                           ("gemma-embed", "embedding")]
        assert listed[0]["quantization"] == {"name": "Q4_K_M", "bits_per_weight": 4}
        assert listed[0]["display_name"] == "Gemma 3 270m"

        loaded = h.post("/api/v1/models/load", json={"model": "gemma"}).json()
        assert loaded["status"] == "loaded" and loaded["instance_id"] == "gemma"
        listed = h.get("/api/v1/models").json()["models"]
        assert [i["id"] for i in listed[0]["loaded_instances"]] == ["gemma"]
        assert h.post("/api/v1/models/unload",
                      json={"instance_id": "gemma"}).json() == {"instance_id": "gemma"}

        def loaded_count() -> int:
            return len(h.get("/api/v1/models").json()["models"][0]["loaded_instances"])

        wait_until(lambda: loaded_count() == 0)

        # ttl: idle seconds before the model is unloaded, per request.
        r = h.post("/v1/chat/completions", json={"model": "gemma", "messages": HELLO,
                                                 "max_tokens": 2, "ttl": 1})
        assert r.status_code == 200
        wait_until(lambda: h.get("/api/v0/models/gemma").json()["state"] == "not-loaded")

        assert h.get("/lmstudio-greeting").json() == {"lmstudio": True}


def test_chatbox_lmstudio_provider(served: CorralProc) -> None:
    """ChatBox's LM Studio provider: OpenAI-compatible, base {host}/v1, empty token."""
    with httpx.Client(base_url=url(served) + "/v1", timeout=120,
                      # fetch trims "Bearer " with an empty key to "Bearer".
                      headers={"Authorization": "Bearer"}) as h:
        ids = [m["id"] for m in h.get("/models").json()["data"]]
        assert ids == ["gemma", "gemma-embed"]
        text, done = "", False
        with h.stream("POST", "/chat/completions", json={
            "model": ids[0], "messages": HELLO, "stream": True, "max_tokens": 8,
        }) as r:
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                    break
                if line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if chunk["choices"]:
                        text += chunk["choices"][0]["delta"].get("content") or ""
        assert done and text
        emb = h.post("/embeddings", json={"model": "gemma-embed", "input": "a note"}).json()
        assert len(emb["data"][0]["embedding"]) == 640
