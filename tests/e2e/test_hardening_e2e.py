"""Issue 25's edges through a real ``corral serve`` (on uvloop, as in production)
and the real llama-server: the listener's 503 and 408, hostile numbers on every
family, a deeply nested SDK auth packet; nothing of it is a 5xx or a traceback."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import CorralProc, model_toml

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

BIG = "9" * 400
JSON = {"Content-Type": "application/json"}


def _read_all(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_listener_limits_and_hostile_numbers(
    corral: Callable[..., CorralProc], gemma: Path
) -> None:
    cp = corral(model_toml("gemma", gemma),
                server="max_connections = 3\nheader_timeout = 1.0")
    ollama = f"http://127.0.0.1:{cp.ollama_port}"
    chat = {"model": "gemma", "messages": [{"role": "user", "content": "Say hi."}],
            "stream": False}
    # A 400-digit keep_alive is "forever" on the Ollama port, not a 500.
    r = httpx.post(ollama + "/api/chat", timeout=120, headers=JSON,
                   content=json.dumps({**chat, "options": {"num_predict": 4}})[:-1]
                   + f', "keep_alive": {BIG}}}')
    assert r.status_code == 200, r.text
    # An option past an int64: Corral's 400, in Ollama's envelope.
    r = httpx.post(ollama + "/api/chat", timeout=60, headers=JSON,
                   content=json.dumps(chat)[:-1] + f', "options": {{"seed": {BIG}}}}}')
    assert r.status_code == 400 and "seed" in r.json()["error"], r.text
    # The pass-through hands it to llama-server, whose JSON 400 comes back as it came.
    r = httpx.post(cp.url + "/v1/chat/completions", timeout=60, headers=JSON,
                   content=json.dumps(chat)[:-1] + f', "max_tokens": {BIG}}}')
    assert r.status_code == 400 and "overflow" in r.json()["error"]["message"], r.text

    # Three connections held on the Ollama port: the fourth gets the 503 (uvloop).
    held = [socket.create_connection(("127.0.0.1", cp.ollama_port)) for _ in range(3)]
    try:
        with socket.create_connection(("127.0.0.1", cp.ollama_port)) as extra:
            refused = _read_all(extra)
        assert refused.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in refused
        # A head that never ends: 408 after header_timeout.
        held[0].sendall(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        assert _read_all(held[0]).startswith(b"HTTP/1.1 408")
    finally:
        for s in held:
            s.close()
    log = cp.log()
    assert log.count("refused with 503") == 1 and log.count("server.header_timeout") == 1
    assert "Traceback" not in log, log[-4000:]


async def test_a_deeply_nested_sdk_auth_packet(
    corral: Callable[..., CorralProc], gemma: Path
) -> None:
    import aiohttp

    cp = corral(model_toml("gemma", gemma))
    url = f"ws://127.0.0.1:{cp.lmstudio_port}/llm"
    async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
        await ws.send_str('{"authVersion": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
        answer = json.loads((await ws.receive(timeout=10)).data)
    assert answer["success"] is False
    assert "Traceback" not in cp.log()
