"""The official LM Studio SDKs against Corral's LM Studio port, through the real
llama-server and Gemma 3 270M: lmstudio-python 1.5.0 (sync and async) and
@lmstudio/sdk 1.5.0 under node (tests/e2e/js/lmstudio_sdk.mjs)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import lmstudio as lms
import pytest

from tests.e2e.conftest import CorralProc, wait_until
from tests.e2e.test_ollama_e2e import models

pytestmark = pytest.mark.e2e

JS = Path(__file__).resolve().parent / "js"


def host(c: CorralProc) -> str:
    return f"127.0.0.1:{c.lmstudio_port}"


@pytest.fixture
def served(corral, gemma: Path) -> CorralProc:
    return corral(models(gemma))


def test_python_sdk_sync(served: CorralProc) -> None:
    with lms.Client(host(served)) as client:
        keys = sorted(m.model_key for m in client.list_downloaded_models())
        assert keys == ["gemma", "gemma-embed"]
        assert client.llm.list_loaded() == []
        model = client.llm.model("gemma")
        assert [m.identifier for m in client.llm.list_loaded()] == ["gemma"]
        assert served.children(), "the load started a llama-server"
        result = model.respond("Say hello.", config={"maxTokens": 8, "temperature": 0})
        assert result.content and result.stats.predicted_tokens_count > 0
        assert result.stats.stop_reason in ("eosFound", "maxPredictedTokensReached")
        stream = model.respond_stream("Name a colour.", config={"maxTokens": 8})
        fragments = [f.content for f in stream]
        assert fragments and "".join(fragments) == stream.result().content
        assert model.get_context_length() == 1024
        assert model.count_tokens("hello world") > 0
        vec = client.embedding.model("gemma-embed").embed("hello")
        assert len(vec) == 640
        model.unload()
        assert client.llm.list_loaded() == []


def test_python_sdk_async_cancel(served: CorralProc) -> None:
    async def run() -> str:
        async with lms.AsyncClient(host(served)) as client:
            model = await client.llm.model("gemma")
            stream = await model.respond_stream("Count to a thousand.",
                                                config={"maxTokens": 500})
            n = 0
            async for _ in stream:
                n += 1
                if n == 3:
                    await stream.cancel()
            return stream.result().stats.stop_reason

    assert asyncio.run(run()) == "userStopped"
    # The slot is free again: parallel = 1, and the next call is answered.
    with lms.Client(host(served)) as client:
        assert client.llm.model("gemma").respond("Hi", config={"maxTokens": 2}).content


def test_npm_sdk(served: CorralProc) -> None:
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node is not None and npm is not None, "node and npm are needed (make test installs them)"
    if not (JS / "node_modules" / "@lmstudio" / "sdk").is_dir():
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    run = subprocess.run([node, "lmstudio_sdk.mjs", f"ws://{host(served)}", "gemma"], cwd=JS,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"node failed:\n{run.stdout}\n{run.stderr}"
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["downloaded"] == ["gemma", "gemma-embed"] and out["loaded"] == ["gemma"]
    assert out["content"] and out["content"] == out["streamed"] and out["whole"]
    assert out["warnings"] == [] and out["contextLength"] == 1024
    assert "rejected a message" not in served.log()
    wait_until(lambda: bool(served.children()))


KEY = "sk-lm-Abcd1234:abcdefghij0123456789"


class _KeyedClient(lms.AsyncClient):
    """lmstudio-python 1.5.0 sends a guest identity; this one sends an sk-lm- key."""

    def __init__(self, api_host: str) -> None:
        self._ident, self._passkey = KEY.removeprefix("sk-lm-").split(":")
        super().__init__(api_host)

    def _create_auth_message(self) -> dict[str, object]:
        return self._format_auth_message(self._ident, self._passkey)


def test_keys_open_only_the_sdk_sockets(corral, gemma: Path) -> None:
    """With api_keys set: the SDK's websocket authenticates with its key in the auth
    packet, keyless; llama-server's own POST /embedding on the main port needs a key
    (issue 25: it answered embeddings to anyone, the SDK namespace of the same name
    being open on every port)."""
    import httpx

    served = corral(models(gemma), server=f'api_keys = ["{KEY}"]')
    body = {"model": "gemma-embed", "content": "hello"}
    assert httpx.post(served.url + "/embedding", json=body, timeout=60).status_code == 401
    assert httpx.options(served.url + "/v1/models", timeout=10).status_code == 401
    keyed = httpx.post(served.url + "/embedding", json=body, timeout=120,
                       headers={"Authorization": f"Bearer {KEY}"})
    assert keyed.status_code == 200, keyed.text

    async def run() -> int:
        async with _KeyedClient(host(served)) as client:
            return len(await (await client.embedding.model("gemma-embed")).embed("hello"))

    assert asyncio.run(run()) == 640
    # A guest (no key) is refused in the auth packet.
    with pytest.raises((lms.LMStudioError, ValueError)), lms.Client(host(served)) as client:
        client.list_downloaded_models()
