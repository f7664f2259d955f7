"""With API keys set, only the open routes of docs/security.md answer a keyless call,
each only on its port, method and protocol (issue 25: a keyless ``POST /embedding``
on the main port got embeddings, and OPTIONS skipped the key check)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.app import port_app
from tests.conftest import make_config

KEY = "sk-lm-Abcd1234:abcdefghij0123456789"
OTHER = "other-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
async def ports(corral_ports: Any, tmp_path: Path) -> Any:
    cfg = make_config(tmp_path, [{"name": "m"}, {"name": "n"}], server={"api_keys": [KEY]},
                      keys=[{"name": "scoped", "key": OTHER, "models": ["n"],
                             "requests_per_minute": 1}])
    return await corral_ports(cfg)


async def test_keyless_embedding_on_the_main_port_is_refused(ports: Any) -> None:
    body = {"model": "m", "content": "hello"}
    resp = await ports.openai.post("/embedding", json=body)
    assert resp.status == 401, await resp.text()
    # A key scoped to another model, limited to one call a minute, gets nowhere
    # either: the scope hides m (404), and the limit counts every try.
    statuses = [(await ports.openai.post("/embedding", json=body,
                                         headers={"Authorization": f"Bearer {OTHER}"})).status
                for _ in range(3)]
    assert 200 not in statuses, statuses
    # An SDK namespace fetched as plain HTTP on the LM Studio port needs a key too.
    assert (await ports.lmstudio.post("/embedding", json=body)).status == 401
    assert (await ports.lmstudio.get("/embedding")).status == 401


@pytest.mark.parametrize("path", ["/v1/models", "/admin/config", "/health", "/nope"])
async def test_options_follows_the_key_rule_of_the_route(ports: Any, path: str) -> None:
    for client in (ports.openai, ports.ollama, ports.lmstudio):
        resp = await client.options(path)
        assert resp.status == 401, (path, resp.status)
        resp = await client.options(path, headers=AUTH)
        assert resp.status != 401, (path, resp.status)


async def test_open_routes_answer_without_a_key(ports: Any) -> None:
    for client in (ports.openai, ports.ollama, ports.lmstudio):
        assert (await client.get("/health")).status == 200
        assert (await client.head("/health")).status == 200
    resp = await ports.openai.get("/dashboard/app.js")
    assert resp.status == 200
    assert (await ports.openai.get("/", allow_redirects=False)).status == 302
    assert (await ports.ollama.get("/")).status == 200
    assert (await ports.lmstudio.get("/lmstudio-greeting")).status == 200
    # Neighbours of the open routes are not open.
    assert (await ports.openai.get("/metrics")).status == 401
    assert (await ports.openai.get("/dashboard/app.js/x")).status == 401
    assert (await ports.ollama.get("/api/version")).status == 401
    assert (await ports.lmstudio.get("/")).status == 401


async def _sdk_auth(url: str, passkey: str) -> dict[str, Any]:
    ident = KEY.removeprefix("sk-lm-").split(":")[0]
    packet = {"authVersion": 1, "clientIdentifier": ident, "clientPasskey": passkey}
    async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
        await ws.send_str(json.dumps(packet))
        answer: dict[str, Any] = json.loads((await ws.receive(timeout=5)).data)
        return answer


async def test_sdk_websockets_stay_keyless_where_documented(
    aiohttp_client: Any, ports: Any
) -> None:
    passkey = KEY.split(":")[1]
    sdk = await aiohttp_client(port_app(ports.openai.app, "lmstudio_sdk"))
    for client in (ports.lmstudio, sdk):
        base = f"ws://127.0.0.1:{client.port}"
        assert await _sdk_auth(f"{base}/llm", passkey) == {"success": True}
        bad = await _sdk_auth(f"{base}/embedding", "wrong")
        assert bad["success"] is False
    # The same upgrade on the main and Ollama ports is an ordinary keyless call.
    for client in (ports.openai, ports.ollama):
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await _sdk_auth(f"ws://127.0.0.1:{client.port}/llm", passkey)
        assert e.value.status == 401
