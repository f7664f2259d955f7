"""Listener limits on real sockets: a slowloris head, a body that never arrives, the
connection caps, and what must not be cut (keep-alive between calls, websockets)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.app import build_openai_app, port_app
from proxy.edge.listener import GuardedRunner, Limits
from tests.conftest import make_config

HEAD, BODY = 0.4, 0.4
EVENTS: list[tuple[str, str]] = []


@asynccontextmanager
async def serving(tmp_path: Path, **server: Any) -> AsyncIterator[Callable[[str], int]]:
    """The main, Ollama and LM Studio apps on port 0 behind GuardedRunners; the
    listener events they report land in ``EVENTS``."""
    EVENTS.clear()
    cfg = make_config(tmp_path, [{"name": "a"}], server={
        "header_timeout": HEAD, "body_timeout": BODY, **server})
    core = build_openai_app(cfg)
    runners: list[web.AppRunner] = []
    ports: dict[str, int] = {}
    try:
        for name in ("openai", "ollama", "lmstudio"):
            # The core's runner starts the scheduler the other ports share.
            app = core if name == "openai" else port_app(core, name)  # type: ignore[arg-type]
            runner = GuardedRunner(app, Limits.of(cfg.server),
                                   lambda event, name=name: EVENTS.append((name, event)),
                                   handler_cancellation=True)
            await runner.setup()
            runners.append(runner)
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            ports[name] = runner.addresses[0][1]
        yield ports.__getitem__
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


async def read_all(reader: asyncio.StreamReader, within: float = 5.0) -> bytes:
    async with asyncio.timeout(within):
        return await reader.read()


async def test_slowloris_head_gets_408_and_close(tmp_path: Path) -> None:
    async with serving(tmp_path) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port("openai"))
        start = time.monotonic()
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        got = b""
        for i in range(40):  # a header line every 0.05 s: never a whole head
            writer.write(f"X-Drip-{i}: y\r\n".encode())
            try:
                got = await asyncio.wait_for(reader.read(4096), 0.05)
                break  # the server answered (and closes)
            except TimeoutError:
                continue
        elapsed = time.monotonic() - start
        writer.close()
    assert got.startswith(b"HTTP/1.1 408"), got
    assert HEAD <= elapsed < HEAD + 1.5, elapsed
    assert EVENTS == [("openai", "head_timeout")]


async def test_body_that_never_arrives_is_a_408_in_the_callers_dialect(tmp_path: Path) -> None:
    async with serving(tmp_path) as port:
        for name, path in (("openai", "/v1/chat/completions"), ("ollama", "/api/chat"),
                           ("openai", "/v1/messages")):
            reader, writer = await asyncio.open_connection("127.0.0.1", port(name))
            writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         "Content-Type: application/json\r\nContent-Length: 500\r\n\r\n"
                         '{"model": "a", '.encode())
            await writer.drain()
            got = await read_all(reader)
            writer.close()
            head, _, body = got.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), (path, got)
            if b"chunked" in head.lower():
                body = body.split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0]
            err = json.loads(body)
            if name == "ollama":
                assert "body_timeout" in err["error"], err
            elif path == "/v1/messages":
                assert err["type"] == "error" and "body_timeout" in err["error"]["message"]
            else:
                assert err["error"]["code"] == "request_timeout", err
        assert [e for _, e in EVENTS] == ["body_timeout"] * 3


async def test_keepalive_between_calls_and_slow_bodies_within_limits_pass(
    tmp_path: Path
) -> None:
    async with serving(tmp_path) as port, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{port('openai')}"
        assert (await http.get(url + "/health")).status == 200
        await asyncio.sleep(HEAD * 2.5)  # idle keep-alive longer than the head limit
        resp = await http.get(url + "/health")
        assert resp.status == 200

        async def trickle() -> AsyncIterator[bytes]:
            for part in (b'{"model": "nope", ', b'"messages": []}'):
                yield part
                await asyncio.sleep(BODY / 4)

        resp = await http.post(url + "/v1/chat/completions", data=trickle(),
                               headers={"Content-Type": "application/json"})
        assert resp.status == 404  # the body arrived whole: routed, the model is unknown


async def test_connection_caps_refuse_with_503_then_admit_again(tmp_path: Path) -> None:
    async with serving(tmp_path, max_connections=3) as port:
        held = [await asyncio.open_connection("127.0.0.1", port("ollama")) for _ in range(3)]
        reader, writer = await asyncio.open_connection("127.0.0.1", port("ollama"))
        got = await read_all(reader)
        writer.close()
        assert got.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in got, got
        assert EVENTS == [("ollama", "refused")]
        # Other ports count their own connections.
        async with aiohttp.ClientSession() as http:
            resp = await http.get(f"http://127.0.0.1:{port('openai')}/health")
            assert resp.status == 200
        held.pop()[1].close()
        await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as http:
            resp = await http.get(f"http://127.0.0.1:{port('ollama')}/api/version")
            assert resp.status == 200
        for _, w in held:
            w.close()


async def test_per_client_cap(tmp_path: Path) -> None:
    async with serving(tmp_path, max_connections_per_client=2) as port:
        held = [await asyncio.open_connection("127.0.0.1", port("openai")) for _ in range(2)]
        reader, writer = await asyncio.open_connection("127.0.0.1", port("openai"))
        assert (await read_all(reader)).startswith(b"HTTP/1.1 503")
        writer.close()
        for _, w in held:
            w.close()


async def test_websocket_is_not_cut_by_the_head_timer(tmp_path: Path) -> None:
    async with serving(tmp_path) as port, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{port('lmstudio')}/system"
        async with http.ws_connect(url) as ws:
            await asyncio.sleep(HEAD * 3)
            await ws.send_json({"authVersion": 1, "clientIdentifier": "guest:x",
                                "clientPasskey": "y"})
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            assert json.loads(msg.data)["success"] is True


async def test_a_call_longer_than_header_timeout_is_not_cut(tmp_path: Path) -> None:
    # The body is read at once; generating the answer takes 3 × header_timeout. aiohttp
    # resumes reading (data_received(b"")) while the handler runs: no head timer then.
    async def slow(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(3 * HEAD)
        return web.Response(text="done")

    app = web.Application()
    app.router.add_post("/slow", slow)
    runner = GuardedRunner(app, Limits(HEAD, BODY, 100, None))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{runner.addresses[0][1]}/slow", json={"a": 1}
        ) as resp:
            assert resp.status == 200 and await resp.text() == "done"
    finally:
        await runner.cleanup()
