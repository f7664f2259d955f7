"""The Ollama port through the real llama-server and Gemma 3 270M, driven by real
clients: the `ollama` Python package, the `ollama` npm package, the `openai` package,
and the request sequences of Open WebUI and ChatBox replayed with httpx."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import ollama
import openai
import pydantic
import pytest

from proxy.dialects.versions import OLLAMA_VERSION
from tests.e2e.conftest import CorralProc, model_toml, wait_until

pytestmark = pytest.mark.e2e

JS = Path(__file__).resolve().parent / "js"
HELLO = [{"role": "user", "content": "Say hello."}]
SHORT = {"num_predict": 8, "temperature": 0}


def models(gemma: Path) -> str:
    # The same file twice: once to chat, once with --embedding for /api/embed. Gemma
    # has no pooling of its own, and OpenAI-style embeddings need one.
    return model_toml("gemma", gemma) + model_toml(
        "gemma-embed", gemma, embedding=True, args=["--pooling", "mean"]
    )


def url(c: CorralProc) -> str:
    return f"http://127.0.0.1:{c.ollama_port}"


@pytest.fixture
def served(corral, gemma: Path) -> CorralProc:
    return corral(models(gemma))


@pytest.fixture
def client(served: CorralProc) -> Iterator[ollama.Client]:
    with ollama.Client(host=url(served), timeout=120) as c:
        yield c


def test_ollama_python_models_and_chat(client: ollama.Client) -> None:
    listed = client.list().models
    assert [m.model for m in listed] == ["gemma:latest", "gemma-embed:latest"]
    m = listed[0]
    assert isinstance(m.modified_at, datetime)
    assert m.details is not None
    assert (m.details.family, m.details.quantization_level) == ("gemma3", "Q4_K_M")
    assert m.details.parameter_size == "268.10M"
    assert m.size is not None and m.size > 200_000_000

    shown = client.show("gemma")
    assert shown.modelinfo is not None
    assert shown.modelinfo["general.architecture"] == "gemma3"
    assert shown.modelinfo["gemma3.context_length"] == 32768
    assert shown.capabilities is not None and "completion" in shown.capabilities

    whole = client.chat(model="gemma", messages=HELLO, options=SHORT)
    assert whole.message.role == "assistant"
    assert whole.message.content
    assert whole.done and whole.done_reason in ("stop", "length")
    assert whole.eval_count and whole.eval_duration and whole.eval_duration > 0
    assert whole.prompt_eval_count and whole.total_duration
    assert whole.total_duration >= whole.eval_duration

    parts = list(client.chat(model="gemma:latest", messages=HELLO, options=SHORT, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content or "" for p in parts)

    gen = client.generate(model="gemma", prompt="Once upon a time", options=SHORT)
    assert gen.response and gen.done
    streamed = list(client.generate(model="gemma", prompt="Once upon a time", options=SHORT,
                                    stream=True))
    assert streamed[-1].done and "".join(p.response or "" for p in streamed)

    running = client.ps().models
    assert [p.model for p in running] == ["gemma:latest"]
    assert running[0].expires_at is not None and running[0].context_length == 1024

    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="no-such-model", messages=HELLO)
    assert err.value.status_code == 404
    assert "not found" in err.value.error


def get_weather(city: str) -> str:
    """Get the current weather for a city.

    Args:
      city: The name of the city
    """
    return "11 degrees"


def test_ollama_python_tools_format_embed_pull(client: ollama.Client) -> None:
    # Gemma 270M may or may not call the tool; whatever it does must parse.
    first = client.chat(model="gemma", options={"num_predict": 48, "temperature": 0},
                        messages=[{"role": "user", "content": "What is the weather in Tokyo?"}],
                        tools=[get_weather])
    for call in first.message.tool_calls or []:
        assert isinstance(call.function.arguments, dict)

    # The round trip, scripted: an assistant turn with an object-argument tool call in
    # the history and the tool's answer, as ollama-python sends them.
    history = [
        {"role": "user", "content": "What is the weather in Tokyo?"},
        ollama.Message(role="assistant", content="", tool_calls=[ollama.Message.ToolCall(
            function=ollama.Message.ToolCall.Function(name="get_weather",
                                                      arguments={"city": "Tokyo"}))]),
        {"role": "tool", "content": get_weather("Tokyo"), "tool_name": "get_weather"},
    ]
    answer = client.chat(model="gemma", messages=history, tools=[get_weather], options=SHORT)
    assert answer.message.role == "assistant" and answer.done

    class Person(pydantic.BaseModel):
        name: str
        age: int

    structured = client.chat(
        model="gemma", format=Person.model_json_schema(),
        messages=[{"role": "user", "content": "Invent a person. Answer in JSON."}],
        options={"num_predict": 200, "temperature": 0},
    )
    text = structured.message.content or ""
    assert text.lstrip().startswith("{")
    if structured.done_reason == "stop":
        Person.model_validate_json(text)

    emb = client.embed(model="gemma-embed", input=["hello", "world"])
    assert len(emb.embeddings) == 2
    for vec in emb.embeddings:
        assert len(vec) == 640
        assert math.isclose(math.sqrt(sum(x * x for x in vec)), 1.0, rel_tol=1e-3)
    short = client.embed(model="gemma-embed", input="hello", dimensions=64)
    assert len(short.embeddings[0]) == 64
    legacy = client.embeddings(model="gemma-embed", prompt="hello")
    assert len(legacy.embedding) == 640

    assert client.pull("gemma").status == "success"
    statuses = [p.status for p in client.pull("gemma-embed:latest", stream=True)]
    assert statuses[-1] == "success"
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("no-such-model")
    assert err.value.status_code == 404


def test_ollama_js_stream_and_version(served: CorralProc) -> None:
    node, npm = shutil.which("node"), shutil.which("npm")
    # `make test` installs Node.js; a missing one is a broken set-up, not a skip.
    assert node is not None and npm is not None, "node and npm are needed (make test installs them)"
    if not (JS / "node_modules" / "ollama").is_dir():
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    run = subprocess.run([node, "chat_stream.mjs", url(served), "gemma"], cwd=JS,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"node failed:\n{run.stdout}\n{run.stderr}"
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["version"] == OLLAMA_VERSION
    assert out["models"] == ["gemma:latest", "gemma-embed:latest"]
    assert out["done"] is True and out["done_reason"] in ("stop", "length")
    assert out["text"] and out["eval_count"] > 0
    assert out["generate_done"] is True
    assert (out["error_name"], out["error_status"]) == ("ResponseError", 404)
    assert "warn" not in run.stderr.lower()


def test_openai_package_on_the_ollama_port(served: CorralProc) -> None:
    client = openai.OpenAI(base_url=url(served) + "/v1", api_key="ollama", max_retries=0,
                           timeout=120)
    with client:
        check_openai(client)


def check_openai(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["gemma", "gemma-embed"]
    stream = client.chat.completions.create(
        model="gemma", messages=HELLO, max_tokens=8, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert text and usage is not None and usage.completion_tokens > 0
    vec = client.embeddings.create(model="gemma-embed", input="hello").data[0].embedding
    assert len(vec) == 640


def test_open_webui_sequence(served: CorralProc) -> None:
    """What Open WebUI's backend sends (routers/ollama.py), read the way it reads it."""
    with httpx.Client(base_url=url(served), timeout=120) as h:
        # Connection "verify" and the version shown in the admin panel.
        v = h.get("/api/version").json()["version"]
        assert [int(x) for x in re.sub(r"^v|-.*", "", v).split(".")]
        # The model list: m["model"] is the id; bare ids get ":latest" appended.
        tags = h.get("/api/tags").json()["models"]
        ids = [m["model"] for m in tags]
        assert "gemma:latest" in ids
        model_id = "gemma" if "gemma" in ids else "gemma:latest"
        h.post("/api/show", json={"model": model_id}).raise_for_status()

        body = {
            "model": model_id,
            "messages": [{"role": "system", "content": "You are helpful."},
                         {"role": "user", "content": "Say hello."}],
            "stream": True,
            "options": {"temperature": 0.7, "top_p": 0.9, "seed": 1, "num_ctx": 1024,
                        "num_predict": 8, "stop": ["<end_of_turn>"], "repeat_penalty": 1.1},
            "keep_alive": "5m",
            "format": "",
            "think": False,
        }
        lines = []
        with h.stream("POST", "/api/chat", json=body) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("application/x-ndjson")
            for line in r.iter_lines():
                lines.append(json.loads(line))  # every line must be JSON
        final = lines[-1]
        assert final["done"] is True
        # The usage popup: tokens per second from integer nanoseconds.
        for key in ("eval_count", "eval_duration", "prompt_eval_count", "prompt_eval_duration",
                    "total_duration"):
            assert isinstance(final.get(key, 0), int)
        assert final["eval_count"] / final["eval_duration"] * 1e9 > 0

        running = h.get("/api/ps").json()["models"]
        for m in running:
            datetime.fromisoformat(m["expires_at"])

        # RAG: both embedding endpoints.
        embed = h.post("/api/embed", json={"model": "gemma-embed:latest",
                                           "input": ["a passage", "another"]}).json()
        assert len(embed["embeddings"]) == 2
        legacy = h.post("/api/embeddings", json={"model": "gemma-embed", "prompt": "x"}).json()
        assert len(legacy["embedding"]) == 640

        # The "unload" action.
        unload = h.post("/api/generate", json={"model": model_id, "keep_alive": 0,
                                               "prompt": ""}).json()
        assert unload["done_reason"] == "unload"
        wait_until(lambda: all(m["model"] != "gemma:latest"
                               for m in h.get("/api/ps").json()["models"]))


def test_chatbox_sequences(served: CorralProc) -> None:
    """ChatBox's Ollama provider: OpenAI-compatible today, native /api/chat in 2024."""
    auth = {"Authorization": "Bearer ollama"}
    with httpx.Client(base_url=url(served), timeout=120, headers=auth) as h:
        ids = [m["id"] for m in h.get("/v1/models").json()["data"]]
        assert "gemma" in ids
        text = ""
        with h.stream("POST", "/v1/chat/completions", json={
            "model": "gemma", "messages": HELLO, "stream": True, "max_tokens": 8,
        }) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    delta = chunk["choices"][0]["delta"]
                    text += delta.get("content") or delta.get("reasoning_content") or ""
        assert text

        # ChatBox 2024: names from /api/tags, NDJSON chat; it threw on any line that
        # was not done and had empty content.
        names = [m["name"] for m in h.get("/api/tags").json()["models"]]
        assert "gemma:latest" in names
        with h.stream("POST", "/api/chat", json={
            "model": "gemma:latest", "messages": HELLO, "stream": True,
            "options": {"num_predict": 8},
        }) as r:
            parts = [json.loads(line) for line in r.iter_lines()]
        assert parts[-1]["done"] is True
        assert all(p["message"]["content"] for p in parts[:-1])
