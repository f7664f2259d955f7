"""Attacks from web pages and hostile clients, each reproduced against real ports
(fake llama-servers as children)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from aiohttp.test_utils import TestClient

from proxy.app import CoreOptions, build_openai_app
from scheduler.config.root import load_config
from tests.conftest import make_config
from tests.fakes import write_dummy_gguf

EVIL = "http://evil.example"


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


async def test_foreign_host_is_refused_on_every_port(corral_ports: Any, tmp_path: Path) -> None:
    ports = await corral_ports(make_config(tmp_path, [{"name": "a"}]))
    for client, path in ((ports.openai, "/v1/models"), (ports.ollama, "/api/tags"),
                         (ports.lmstudio, "/api/v0/models")):
        resp = await client.get(path, headers={"Host": "evil.example:8080"})
        assert resp.status == 403, path
        resp = await client.get(path, headers={"Host": f"localhost:{client.port}"})
        assert resp.status == 200, path


@pytest.mark.parametrize("path", ["/admin/drain", "/admin/models/a/load",
                                  "/v1/chat/completions"])
async def test_cross_origin_text_plain_posts_are_refused(
    corral_ports: Any, tmp_path: Path, path: str
) -> None:
    ports = await corral_ports(make_config(tmp_path, [{"name": "a"}]))
    body = '{"model": "a", "messages": [{"role": "user", "content": "hi"}]}'
    for client in (ports.openai, ports.lmstudio, ports.ollama):
        for headers in ({"Origin": EVIL, "Content-Type": "text/plain"},
                        {"Content-Type": "text/plain"}):
            if client is ports.ollama and "Origin" not in headers:
                continue  # Ollama's port keeps Ollama's rules: only the Origin counts
            resp = await client.post(path, data=body, headers=headers)
            assert resp.status == 403, (path, headers, await resp.text())
    # Ollama's own generation route: its origin rules refuse the page too.
    resp = await ports.ollama.post("/api/generate", data='{"model": "a"}',
                                   headers={"Origin": EVIL, "Content-Type": "text/plain"})
    assert resp.status == 403
    assert ports.openai.app  # nothing was loaded by any refused call
    from proxy.keys import SCHEDULER
    assert ports.openai.app[SCHEDULER].instances() == []


async def test_cors_origins_preflight_and_allow_origin(corral: Any, tmp_path: Path) -> None:
    client = await corral(make_config(tmp_path, [{"name": "a"}],
                                      server={"cors_origins": ["http://app.example"]}))
    pre = await client.options("/v1/chat/completions", headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
    assert pre.status == 204
    assert pre.headers["Access-Control-Allow-Origin"] == "http://app.example"
    resp = await client.get("/v1/models", headers={"Origin": "http://app.example"})
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "http://app.example"
    resp = await client.get("/v1/models", headers={"Origin": EVIL})
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "forbidden"


async def test_dashboard_security_headers(corral: Any, tmp_path: Path) -> None:
    client = await corral(make_config(tmp_path, [{"name": "a"}]))
    resp = await client.get("/dashboard/")
    assert resp.status == 200
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Referrer-Policy"] == "no-referrer"


async def _raw(client: TestClient, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    await writer.wait_closed()
    return data


async def test_non_utf8_api_key_is_401_not_500(corral: Any, tmp_path: Path) -> None:
    client = await corral(make_config(tmp_path, [{"name": "a"}], server={"api_keys": ["k"]}))
    for header in (b"Authorization: Bearer \xff\xfe\xc3", b"X-API-Key: \x80\x81"):
        answer = await _raw(client, b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n"
                            + header + b"\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    ok = await client.get("/v1/models", headers={"Authorization": "Bearer k"})
    assert ok.status == 200


async def test_huge_keep_alive_then_ps(corral_ports: Any, tmp_path: Path) -> None:
    ports = await corral_ports(make_config(tmp_path, [{"name": "a"}]))
    resp = await ports.ollama.post("/api/generate", json={"model": "a", "keep_alive": 1e18})
    assert resp.status == 200, await resp.text()
    ps = await ports.ollama.get("/api/ps")
    assert ps.status == 200, await ps.text()
    (entry,) = (await ps.json())["models"]
    assert entry["expires_at"] > "2300"
    resp = await ports.lmstudio.post("/v1/chat/completions", json={**chat("a"), "ttl": 1e300})
    assert resp.status == 200
    assert (await ports.ollama.get("/api/ps")).status == 200


async def test_too_large_body_is_request_too_large(corral: Any, tmp_path: Path) -> None:
    import io

    client = await corral(make_config(tmp_path, [{"name": "a"}]))
    resp = await client.post("/v1/chat/completions", data=io.BytesIO(b"x" * (65 << 20)),
                             headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "request_too_large"


def _file(tmp_path: Path, **server: Any) -> Path:
    path = tmp_path / "corral.toml"
    gguf = write_dummy_gguf(tmp_path / "a.gguf")
    path.write_text(tomli_w.dumps({
        "server": {"ollama_enabled": False, "lmstudio_enabled": False, **server},
        "models": [{"name": "a", "path": str(gguf)}],
    }))
    return path


async def _serve(aiohttp_client: Any, fake_llama: Path, path: Path) -> TestClient:
    opts = CoreOptions(find_binary=lambda _: fake_llama, reap_interval=0.05)
    client: TestClient = await aiohttp_client(
        build_openai_app(load_config(path), opts, config_path=path))
    return client


TOML = {"Content-Type": "application/toml", "Authorization": "Bearer k"}


@pytest.mark.parametrize("write", [False, True])
async def test_put_config_cannot_change_the_binary(
    aiohttp_client: Any, fake_llama: Path, tmp_path: Path, write: bool
) -> None:
    path = _file(tmp_path, admin_config_write=write, api_keys=["k"])
    old = path.read_text()
    client = await _serve(aiohttp_client, fake_llama, path)
    evil = old + '\n[llama_server]\nbinary = "/bin/sh"\nargs = ["--log-file", "/tmp/pwned"]\n'
    resp = await client.put("/admin/config", data=evil, headers=TOML)
    assert resp.status == 403, await resp.text()
    message = (await resp.json())["error"]["message"]
    assert ("llama_server" in message) if write else ("admin_config_write" in message)
    assert path.read_text() == old
    if write:
        turn_off_keys = old.replace('api_keys = [\n    "k",\n]', "api_keys = []")
        turn_off_keys = turn_off_keys.replace('api_keys = ["k"]', "api_keys = []")
        assert turn_off_keys != old
        resp = await client.put("/admin/config", data=turn_off_keys, headers=TOML)
        assert resp.status == 403 and "server.api_keys" in await resp.text()


async def test_config_file_view_hides_api_keys(
    aiohttp_client: Any, fake_llama: Path, tmp_path: Path
) -> None:
    path = _file(tmp_path, api_keys=["sekrit-key-1"])
    client = await _serve(aiohttp_client, fake_llama, path)
    resp = await client.get("/admin/config/file",
                            headers={"Authorization": "Bearer sekrit-key-1"})
    assert resp.status == 200
    text = await resp.text()
    assert "sekrit-key-1" not in text and "<redacted>" in text
