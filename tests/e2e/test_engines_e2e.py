"""Engines end to end (issue 10): a second real llama-server started with
``--api-key`` used as a remote through ``api_key_env``, a fake cloud behind a key
that names its model differently, a provider listing three models and a runtime
launching a vLLM-style fake engine, all behind one `corral serve`: every model listed
on all three ports and answering the ``openai`` client, and no key anywhere in the
log, ``/admin`` or ``/metrics``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.e2e.conftest import REPO, CorralProc, Tidy, reaped, wait_until
from tests.fakes import HERE, free_port

pytestmark = pytest.mark.e2e

REMOTE_KEY = "llama-e2e-key-3c1f9a77d2"
CLOUD_KEY = "sk-e2e-cloud-88b04e21f6"
PROVIDER_KEY = "sk-e2e-prov-51d7c3a90e"


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{url}: the process exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise AssertionError(f"{url} did not answer within {timeout} s")


@pytest.fixture
def keyed_llama(llama_server_bin: Path, gemma: Path, tmp_path: Path) -> Iterator[str]:
    """A second real llama-server that wants a key on every /v1 call."""
    port = free_port()
    with (tmp_path / "keyed-llama.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(llama_server_bin), "-m", str(gemma), "--host", "127.0.0.1",
             "--port", str(port), "-c", "1024", "-t", "1", "--api-key", REMOTE_KEY,
             "--no-webui"], stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + "/health", proc)
        wait_until(lambda: httpx.get(url + "/health", timeout=2).status_code == 200, 60)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture
def fake_cloud(tmp_path: Path) -> Iterator[object]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(key: str, models: str, prefix: str) -> str:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "fake_cloud.py"), "--port", str(port), "--key", key,
             "--models", models, "--prefix", prefix], cwd=REPO,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + "/fake/requests", proc, timeout=20)
        return url

    yield start
    for p in procs:
        p.terminate()
        p.wait(timeout=10)


def test_every_engine_behind_one_corral(
    corral, keyed_llama: str, fake_cloud, monkeypatch: pytest.MonkeyPatch, tidy: Tidy
) -> None:
    cloud = fake_cloud(CLOUD_KEY, "gpt-cloud-large", "/v1beta/openai")
    provider = fake_cloud(PROVIDER_KEY, "alpha,beta,gamma", "/v1")
    monkeypatch.setenv("E2E_REMOTE_KEY", REMOTE_KEY)
    monkeypatch.setenv("E2E_PROVIDER_KEY", PROVIDER_KEY)
    engine = [sys.executable, str(HERE / "fake_engine.py"), "serve", "${MODEL}",
              "--host", "${HOST}", "--port", "${PORT}", "--served-model-name", "${MODEL}",
              "--max-num-seqs", "${SLOTS}", "${ARGS}"]
    cmd = ", ".join(f'"{a}"' for a in engine)
    config = f"""
[[models]]
name = "secured"
remotes = [{{ url = "{keyed_llama}", api_key_env = "E2E_REMOTE_KEY", health = "/v1/models" }}]

[[models]]
name = "cloud"
[[models.remotes]]
url = "{cloud}/v1beta/openai"
api_key = "{CLOUD_KEY}"
model = "gpt-cloud-large"
health = "none"

[[models]]
name = "engine"
runtime = "fakevllm"
upstream_model = "org/Engine-1B"
footprint = "256MiB"

[runtimes.fakevllm]
command = [{cmd}]
api = ["chat", "completions"]

[[providers]]
name = "fake"
url = "{provider}"
api_key_env = "E2E_PROVIDER_KEY"
prefix = "prov/"
refresh = 1
"""
    c: CorralProc = corral(config)
    names = {"secured", "cloud", "engine", "prov/alpha", "prov/beta", "prov/gamma"}
    wait_until(lambda: names <= _listed(c.url + "/v1/models"), timeout=20)
    assert names <= _listed(f"http://127.0.0.1:{c.lmstudio_port}/v1/models")
    tags = httpx.get(f"http://127.0.0.1:{c.ollama_port}/api/tags", timeout=10).json()
    assert names <= {m["name"].removesuffix(":latest") for m in tags["models"]}

    client = tidy(openai.OpenAI(base_url=c.url + "/v1", api_key="unused", max_retries=0))
    wait_until(lambda: _ready(c, "secured"), timeout=30)
    for model in sorted(names):
        out = client.chat.completions.create(
            model=model, max_tokens=8,
            messages=[{"role": "user", "content": "Say hello."}])
        assert out.choices[0].message.content, model
        stream = client.chat.completions.create(
            model=model, max_tokens=8, stream=True,
            messages=[{"role": "user", "content": "Say hello."}])
        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices), model
    # The anthropic client and the openai Responses client too: natively where the
    # upstream speaks the family (the keyed llama-server), translated to chat where it
    # does not (the cloud, the provider and the engine declared chat-only).
    with anthropic.Anthropic(base_url=c.url, api_key="unused", max_retries=0) as claude:
        for model in sorted(names):
            msg = claude.messages.create(
                model=model, max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
            assert msg.content and msg.content[0].type == "text", model
    for model in sorted(names):
        resp = client.responses.create(model=model, input="Hi", max_output_tokens=16)
        assert resp.output_text, model
    client.close()
    cloud_calls = httpx.get(cloud + "/fake/requests", timeout=5).json()
    assert cloud_calls and all(call["key_ok"] for call in cloud_calls)
    assert {call.get("model") for call in cloud_calls} == {"gpt-cloud-large"}

    # The keyed llama-server refuses a call without its key: Corral sent it.
    direct = httpx.post(keyed_llama + "/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert direct.status_code == 401

    seen = [c.log()]
    for path in ("/admin/config", "/admin/models", "/admin/instances", "/admin/providers",
                 "/admin/overview", "/admin/config/file", "/metrics"):
        r = httpx.get(c.url + path, timeout=10)
        assert r.status_code == 200, path
        seen.append(r.text)
    text = "\n".join(seen)
    assert "prov/alpha" in text and "secured" in text
    for key in (REMOTE_KEY, CLOUD_KEY, PROVIDER_KEY):
        assert key not in text, key


def _listed(url: str) -> set[str]:
    try:
        return {m["id"] for m in httpx.get(url, timeout=5).json()["data"]}
    except (httpx.HTTPError, KeyError, ValueError):
        return set()


def _ready(c: CorralProc, model: str) -> bool:
    info = httpx.get(c.url + f"/admin/models/{model}", timeout=5).json()
    return any(i.get("state") == "ready" for i in info.get("instances", []))


def test_real_llama_server_as_a_command_runtime_dies_with_corral(
    corral, llama_server_bin: Path, gemma: Path, tidy: Tidy
) -> None:
    """The real llama-server launched through a generic command template (substituted
    argv, another binary through ``binary``), then Corral SIGKILLed: the runtime's child
    goes with it (PR_SET_PDEATHSIG), as llama-server's does."""
    config = f"""
[runtimes.plain]
command = ["llama-server-not-on-path", "-m", "${{MODEL_PATH}}", "--host", "${{HOST}}",
           "--port", "${{PORT}}", "--parallel", "${{SLOTS}}", "-c", "${{CTX_SIZE}}",
           "--alias", "${{MODEL}}", "${{ARGS}}"]
binary = "{llama_server_bin}"
stop_signal = "SIGINT"

[runtimes.other-build]
binary = "{llama_server_bin}"

[[models]]
name = "templated"
runtime = "plain"
path = "{gemma}"
ctx_size = 1024
args = ["-t", "1", "--no-webui"]

[[models]]
name = "rebuilt"
runtime = "other-build"
path = "{gemma}"
ctx_size = 1024
threads = 1
"""
    c: CorralProc = corral(config)
    oc = tidy(openai.OpenAI(base_url=c.url + "/v1", api_key="unused", max_retries=0))
    for model in ("templated", "rebuilt"):
        out = oc.chat.completions.create(
            model=model, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
        assert out.choices[0].message.content is not None
    engines = {i["model"]: i["engine"]
               for i in httpx.get(c.url + "/admin/instances", timeout=5).json()["instances"]}
    assert engines == {"templated": llama_server_bin.name, "rebuilt": llama_server_bin.name}
    children = c.children()
    assert len(children) == 2
    os.kill(c.proc.pid, signal.SIGKILL)
    c.proc.wait(timeout=10)
    wait_until(lambda: all(reaped(p) for p in children), timeout=10)
