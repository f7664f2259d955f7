"""Listener limits under both event loops Corral runs on: asyncio's, and uvloop's
(``corral serve`` picks uvloop where it is installed).

uvloop's transports are not ``asyncio.Transport`` subclasses: an isinstance assert
reset every refused client with a traceback, and an isinstance check skipped the 408
of a head timeout. Each test runs its scenario on a fresh loop of each kind and checks
the wire answer and the log: exactly one WARNING line, no traceback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop
from aiohttp import web

from proxy.edge.listener import BodyTimeout, GuardedRunner, Limits
from scheduler.config.sections import ServerConfig

HEAD, BODY = 0.3, 0.3
Run = Callable[[Coroutine[Any, Any, bytes]], bytes]
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=list(LOOPS))
def run(request: pytest.FixtureRequest) -> Run:
    """Run a scenario to completion on a new loop of the parametrized kind."""
    factory = LOOPS[request.param]

    def go(scenario: Coroutine[Any, Any, bytes]) -> bytes:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(asyncio.wait_for(scenario, 20))

    return go


async def _serving(limits: Limits) -> tuple[GuardedRunner, int]:
    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def echo(request: web.Request) -> web.Response:
        try:
            return web.Response(body=await request.read())
        except BodyTimeout:
            return web.Response(status=408, text="body timeout")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/echo", echo)
    app.router.add_post("/ignore", health)  # answers without reading the body
    runner = GuardedRunner(app, limits, shutdown_timeout=2)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(5):
        return await reader.read()


async def _refusal() -> bytes:
    runner, port = await _serving(Limits(HEAD, BODY, 1, None))
    try:
        held = await asyncio.open_connection("127.0.0.1", port)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        got = await _read_all(reader)
        writer.close()
        held[1].close()
        return got
    finally:
        await runner.cleanup()


async def _head_timeout() -> bytes:
    runner, port = await _serving(Limits(HEAD, BODY, 10, None))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: ")
        got = await _read_all(reader)
        writer.close()
        return got
    finally:
        await runner.cleanup()


async def _body_timeout(path: str) -> bytes:
    runner, port = await _serving(Limits(HEAD, BODY, 10, None))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     "Content-Length: 100\r\n\r\nonly a part".encode())
        got = await _read_all(reader)
        writer.close()
        return got
    finally:
        await runner.cleanup()


def _one_warning_no_traceback(caplog: pytest.LogCaptureFixture, says: str) -> None:
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.name for r in loud] == ["proxy.edge.listener"], caplog.text
    assert says in loud[0].getMessage()
    assert not any(r.exc_info for r in caplog.records), caplog.text
    assert "Traceback" not in caplog.text


def test_refusal_is_a_503_with_retry_after(run: Run, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    got = run(_refusal())
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), got
    assert b"Retry-After: 1" in head and b"Connection: close" in head
    assert body == b"too many connections; retry\n"
    _one_warning_no_traceback(caplog, "refused with 503")


def test_head_timeout_is_a_408(run: Run, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    got = run(_head_timeout())
    assert got.startswith(b"HTTP/1.1 408"), got
    _one_warning_no_traceback(caplog, "server.header_timeout")


async def _flood(count: int) -> bytes:
    """``count`` clients over a cap of 1: each refused one still gets its 503."""
    runner, port = await _serving(Limits(HEAD, BODY, 1, None))
    try:
        held = await asyncio.open_connection("127.0.0.1", port)
        answers = []
        for _ in range(count):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            answers.append((await _read_all(reader))[:12])
            writer.close()
        held[1].close()
        return b"|".join(answers)
    finally:
        await runner.cleanup()


def test_a_flood_of_refusals_logs_a_few_lines(run: Run,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    got = run(_flood(12))
    assert got.split(b"|") == [b"HTTP/1.1 503"] * 12
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    # The 1st and the 10th refusal are logged, not every one.
    assert len(loud) == 2, caplog.text
    assert "Traceback" not in caplog.text


def test_max_connections_is_capped_by_the_open_file_limit() -> None:
    sc = ServerConfig(max_connections=4096)
    # Three ports (main, Ollama, LM Studio) under a soft limit of 1,024: each gets
    # its share, so clients on one port cannot take every descriptor.
    capped = Limits.of(sc, soft_nofile=1024)
    assert capped.max_connections == (1024 - 128) // 2 // 3
    assert Limits.of(sc, soft_nofile=1 << 20).max_connections == 4096
    assert Limits.of(sc, soft_nofile=16).max_connections == 1  # still answers, with 503s


def test_body_timeout_is_a_408_without_traceback(run: Run,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    got = run(_body_timeout("/echo"))
    assert got.startswith(b"HTTP/1.1 408"), got
    _one_warning_no_traceback(caplog, "server.body_timeout")


def test_an_unread_body_that_stalls_logs_no_traceback(
    run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    # The handler answers at once; aiohttp then drains the rest of the body, which
    # never comes: the timer ends that drain (it logged "Unhandled exception").
    caplog.set_level(logging.DEBUG)
    got = run(_body_timeout("/ignore"))
    assert got.startswith(b"HTTP/1.1 200"), got
    _one_warning_no_traceback(caplog, "server.body_timeout")
