"""Resends avoid what failed (issue 25): a call resent after its upstream failed goes
to another one, and the one that reset a connection leaves the rotation as one that
refused it does.

Two remotes serve one model: a good fake and one that takes each call and resets
the connection (RST, SO_LINGER 0) without answering.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.keys import SCHEDULER
from scheduler.process.instance import State
from tests.conftest import make_config

CALLS = 24
CONCURRENCY = 4


async def resetting_server(seen: Counter[str]) -> asyncio.Server:
    """Reads a call, notes its tag, and resets the connection."""

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        try:
            while b"}" not in data:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                data += chunk
        finally:
            if (m := re.search(rb"tag-\d+", data)) is not None:
                seen[m.group().decode()] += 1
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

    return await asyncio.start_server(on_connect, "127.0.0.1", 0)


def good_upstream(seen: Counter[str]) -> web.Application:
    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        tag = body["messages"][0]["content"]
        seen[tag] += 1
        return web.json_response({
            "id": "c", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"good {tag}"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def test_a_resent_call_goes_to_the_other_remote(
    corral: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    reset_seen: Counter[str] = Counter()
    good_seen: Counter[str] = Counter()
    bad = await resetting_server(reset_seen)
    good = await aiohttp_server(good_upstream(good_seen))
    bad_url = f"http://127.0.0.1:{bad.sockets[0].getsockname()[1]}"
    try:
        cfg = make_config(tmp_path, [{"name": "m", "remotes": [
            # The resetting one first: at equal load the first listed goes first.
            {"url": bad_url, "health": "none", "cooldown": 600},
            {"url": str(good.make_url("")).rstrip("/"), "health": "none"},
        ]}])
        client = await corral(cfg)
        sched = client.app[SCHEDULER]
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(i: int) -> tuple[int, str]:
            async with gate:
                r = await client.post("/v1/chat/completions", json={
                    "model": "m", "messages": [{"role": "user", "content": f"tag-{i}"}]})
                body = await r.json()
                return r.status, body["choices"][0]["message"]["content"] if r.ok else body

        results = await asyncio.gather(*(one(i) for i in range(CALLS)))
    finally:
        bad.close()
        await bad.wait_closed()
    # Every call answered, by the good remote.
    assert results == [(200, f"good tag-{i}") for i in range(CALLS)]
    # The resetting remote saw each call at most once, and is out of rotation: only
    # the calls that were sent before its first reset was known reached it.
    assert reset_seen and max(reset_seen.values()) == 1
    assert sum(reset_seen.values()) <= CONCURRENCY
    assert all(n == 1 for n in good_seen.values())
    bad_remote = next(r for r in sched.remotes() if r.base_url == bad_url)
    assert bad_remote.state is State.FAILED
