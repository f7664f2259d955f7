"""The benchmarks' yardsticks relay what they claim to: the bare relay (aiohttp) and the
floor relay (asyncio protocols and httptools) of tests/bench/bench_proxy.py answer a
sized chat answer whole and a stream chunk by chunk, byte for byte, on kept-alive
connections, and refuse a body without a model. A yardstick that dropped or mangled
bytes would make every figure beside it meaningless."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.bench.bench_proxy import BENCH_DIR
from tests.fakes import free_port

CHAT = json.dumps({"id": "c1", "object": "chat.completion", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "Hello."}}]}).encode()
EVENTS = [b'data: {"choices":[{"delta":{"content":"%d"}}]}\n\n' % n for n in range(5)]
EVENTS.append(b"data: [DONE]\n\n")


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if not body.get("stream"):
        return web.Response(body=CHAT, content_type="application/json")
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await out.prepare(request)
    for event in EVENTS:
        await out.write(event)
        await asyncio.sleep(0.01)  # separate reads: relayed chunk by chunk
    await out.write_eof()
    return out


@pytest.fixture
async def upstream(aiohttp_server: Any) -> str:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


@pytest.fixture(params=["baseline", "floor"])
async def relay(request: pytest.FixtureRequest, upstream: str) -> AsyncIterator[str]:
    port = free_port()
    if request.param == "floor":
        argv = [sys.executable, str(BENCH_DIR / "floor_relay.py"), str(port), upstream]
    else:
        argv = [sys.executable, str(BENCH_DIR / "bench_proxy.py"), "--serve-baseline",
                str(port), upstream]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as session:
            while True:
                assert proc.returncode is None, "the relay exited"
                try:
                    async with session.get(url + "/health") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, "the relay did not start"
                await asyncio.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def test_a_yardstick_relays_whole_answers_and_streams_byte_for_byte(relay: str) -> None:
    connector = aiohttp.TCPConnector(limit=1)  # one kept-alive connection for every call
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(3):
            async with session.post(relay + "/v1/chat/completions",
                                    json={"model": "m", "messages": []}) as resp:
                assert resp.status == 200
                assert resp.content_type == "application/json"
                assert await resp.read() == CHAT
            async with session.post(relay + "/v1/chat/completions",
                                    json={"model": "m", "stream": True}) as resp:
                assert resp.status == 200
                assert resp.content_type == "text/event-stream"
                assert await resp.read() == b"".join(EVENTS)
        async with session.post(relay + "/v1/chat/completions", json={"no": "model"}) as resp:
            assert resp.status == 400

