"""An upstream's error that is not JSON (llama-server's text/plain 500, an HTML page
from a proxy in front of a remote) reaches the caller in the caller's own envelope
with the upstream's status, on every port; a JSON error passes as it came."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import make_config

TEXT = "Internal Server Error: llama_decode failed"


def _upstream(status: int, body: str, content_type: str) -> web.Application:
    async def answer(_: web.Request) -> web.Response:
        return web.Response(status=status, text=body, content_type=content_type)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


def _models(base: str, names: list[str]) -> list[dict[str, Any]]:
    # One remote per call: a 5xx sends a remote into its cooldown, after which the
    # next call would get Corral's own 503 instead of the upstream's answer.
    return [{"name": n, "remotes": [{"url": base, "health": "none"}]} for n in names]


CALLS = [
    ("openai", "/v1/chat/completions", "openai"),
    ("ollama", "/v1/chat/completions", "openai"),
    ("lmstudio", "/v1/chat/completions", "openai"),
    ("lmstudio", "/api/v0/chat/completions", "openai"),
    ("openai", "/v1/messages", "anthropic"),
    ("ollama", "/api/chat", "ollama"),
]


async def test_a_text_plain_500_is_wrapped_in_the_callers_dialect(
    corral_ports: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    up = await aiohttp_server(_upstream(500, TEXT, "text/plain"))
    names = [f"r{i}" for i in range(len(CALLS))]
    ports = await corral_ports(make_config(tmp_path, _models(str(up.make_url("/v1")), names)))
    for name, (port, path, dialect) in zip(names, CALLS, strict=True):
        body: dict[str, Any] = {"model": name, "messages": [{"role": "user", "content": "hi"}],
                                "max_tokens": 8, "stream": False}
        r = await getattr(ports, port).post(path, json=body)
        assert r.status == 500, (port, path, await r.text())
        assert r.content_type == "application/json", (port, path)
        err = await r.json()
        if dialect == "openai":
            assert err["error"]["message"] == TEXT and err["error"]["src"] == "upstream"
        elif dialect == "anthropic":
            assert err["type"] == "error" and err["error"]["message"] == TEXT
        else:
            assert err == {"error": TEXT}
        assert "X-Corral-Error" not in r.headers  # the upstream's error, not Corral's


@pytest.mark.parametrize(("status", "content_type", "body"), [
    (502, "text/html", "<html><body>Bad Gateway</body></html>"),
    (400, "application/json", "{not json"),  # says JSON, is not
])
async def test_other_non_json_errors_keep_their_status(
    corral: Any, aiohttp_server: Any, tmp_path: Path, status: int, content_type: str, body: str
) -> None:
    up = await aiohttp_server(_upstream(status, body, content_type))
    client = await corral(make_config(tmp_path, _models(str(up.make_url("/v1")), ["r"])))
    r = await client.post("/v1/chat/completions",
                          json={"model": "r", "messages": [{"role": "user", "content": "x"}]})
    assert r.status == status
    assert (await r.json())["error"]["message"] == body


async def test_a_json_error_is_relayed_as_it_came(
    corral: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    raw = '{"error": {"code": 400, "message": "the prompt is too long", "type": "x"}}'
    up = await aiohttp_server(_upstream(400, raw, "application/json"))
    client = await corral(make_config(tmp_path, _models(str(up.make_url("/v1")), ["r"])))
    r = await client.post("/v1/chat/completions",
                          json={"model": "r", "messages": [{"role": "user", "content": "x"}]})
    assert r.status == 400 and await r.text() == raw
