"""Hang-ups end the work (issue 23): on every route of every port, stream or not,
pass-through or translated, a client that goes away before its answer is complete
makes Corral close the upstream call; the lease is released and the call counted 499.

The upstream is a fake on port 0 that takes every call and never finishes it (a
non-streaming call waits; a stream sends a chunk every 20 ms), and records the moment
its connection to Corral closed. It is configured as a remote of two models: ``m``
speaks every family (Responses and Messages pass through), ``t`` only chat (they go
translated to chat).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.keys import SCHEDULER
from proxy.metrics.registry import METRICS
from proxy.metrics.scrape import UpstreamMetrics
from scheduler.process.instance import State
from tests.conftest import make_config, wait_for

# How long the fake holds a call at most: far past any bound the test waits for.
HOLD_S = 30.0


@dataclass
class Held:
    path: str
    stream: bool
    closed: asyncio.Event = field(default_factory=asyncio.Event)


def holding_upstream(calls: list[Held]) -> web.Application:
    """Takes every POST and never ends it; records each call and when it closed."""

    def chunk(i: int) -> bytes:
        event = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "x",
                 "choices": [{"index": 0, "delta": {"content": f"w{i} "},
                              "finish_reason": None}]}
        return b"data: " + json.dumps(event).encode() + b"\n\n"

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        call = Held(request.path, bool(body.get("stream")))
        calls.append(call)
        try:
            if not call.stream:
                await asyncio.sleep(HOLD_S)
                return web.json_response({"error": {"message": "held too long"}}, status=500)
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            for i in range(int(HOLD_S / 0.02)):
                await out.write(chunk(i))
                await asyncio.sleep(0.02)
            return out
        except (asyncio.CancelledError, ConnectionResetError):
            # aiohttp cancels the handler of a connection the peer closed.
            call.closed.set()
            raise

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    return app


@dataclass(frozen=True)
class Case:
    port: str
    path: str
    body: dict[str, Any]
    stream: bool

    @property
    def id(self) -> str:
        return f"{self.port}{self.path}{'-stream' if self.stream else ''}-{self.body['model']}"


USER = [{"role": "user", "content": "hello there"}]


def _cases() -> list[Case]:
    out: list[Case] = []
    for stream in (False, True):
        s = {"stream": stream}
        for model in ("m", "t"):  # pass-through, translated to chat
            out += [
                Case("openai", "/v1/responses", {"model": model, "input": "hi", **s}, stream),
                Case("openai", "/v1/messages", {"model": model, "max_tokens": 9000,
                                                 "messages": USER, **s}, stream),
            ]
        out += [
            Case("openai", "/v1/chat/completions", {"model": "m", "messages": USER, **s},
                 stream),
            Case("openai", "/v1/completions", {"model": "m", "prompt": "hi", **s}, stream),
            Case("ollama", "/api/chat", {"model": "m", "messages": USER, **s}, stream),
            Case("ollama", "/api/generate", {"model": "m", "prompt": "hi", **s}, stream),
            Case("ollama", "/v1/chat/completions", {"model": "m", "messages": USER, **s},
                 stream),
            Case("lmstudio", "/api/v0/chat/completions", {"model": "m", "messages": USER, **s},
                 stream),
            Case("lmstudio", "/api/v0/completions", {"model": "m", "prompt": "hi", **s},
                 stream),
            Case("lmstudio", "/api/v1/chat", {"model": "m", "input": "hi", **s}, stream),
            Case("lmstudio", "/v1/chat/completions", {"model": "m", "messages": USER, **s},
                 stream),
        ]
    out.append(Case("openai", "/completion", {"model": "m", "prompt": "hi"}, False))
    return out


CASES = _cases()


@pytest.fixture
async def served(corral_ports: Any, aiohttp_server: Any, tmp_path: Path) -> Any:
    calls: list[Held] = []
    up = await aiohttp_server(holding_upstream(calls))
    base = str(up.make_url("")).rstrip("/")
    everything = ["chat", "completions", "embeddings", "responses", "messages", "native"]
    cfg = make_config(tmp_path, [
        {"name": "m", "remotes": [{"url": base, "health": "none", "api": everything}]},
        {"name": "t", "remotes": [{"url": base, "health": "none", "api": ["chat"]}]},
    ])
    ports = await corral_ports(cfg)
    return ports, calls


def hang_ups(metrics: Any, path: str) -> int:
    return sum(st.count for (_, _, endpoint, status), st in metrics.calls.items()
               if endpoint == path and status == 499)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_a_client_that_hangs_up_closes_the_upstream_call(
    served: Any, case: Case, caplog: pytest.LogCaptureFixture
) -> None:
    ports, calls = served
    client = getattr(ports, case.port)
    sched = client.app[SCHEDULER]
    url = str(client.make_url(case.path))
    async with aiohttp.ClientSession() as session:
        if case.stream:
            resp = await session.post(url, json=case.body)
            assert resp.status == 200, await resp.text()
            await resp.content.readany()  # the answer has begun
            await wait_for(lambda: bool(calls))
            resp.close()  # the client goes away mid-stream
        else:
            sent = asyncio.ensure_future(session.post(url, json=case.body))
            await wait_for(lambda: bool(calls))
            await asyncio.sleep(0.05)
            sent.cancel()  # the client goes away before any byte of its answer
            with contextlib.suppress(asyncio.CancelledError):
                await sent
    assert len(calls) == 1
    # Bounded waits, not timings: each fails the test if it never happens.
    await asyncio.wait_for(calls[0].closed.wait(), 5)
    await wait_for(lambda: all(r.in_flight == 0 for r in sched.remotes()), within=5)
    await wait_for(lambda: hang_ups(ports.openai.app[METRICS], case.path) == 1, within=5)
    # A hang-up is no error of Corral's nor of the upstream's.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


async def test_a_hang_up_leaves_the_upstream_alone_for_a_moment(
    corral_ports: Any, tmp_path: Path
) -> None:
    """llama-server notices a non-streaming client gone only after a quiet second: a
    call that ended early keeps Corral's own /metrics reads off its instance."""
    cfg = make_config(tmp_path, [{"name": "m", "env": {"FAKE_TOKEN_DELAY": "0.05"}}])
    ports = await corral_ports(cfg)
    sched = ports.openai.app[SCHEDULER]
    url = str(ports.openai.make_url("/v1/chat/completions"))
    async with aiohttp.ClientSession() as session:
        sent = asyncio.ensure_future(session.post(url, json={
            "model": "m", "max_tokens": 400, "messages": USER}))
        await wait_for(lambda: any(i.in_flight for i in sched.instances()))
        inst = sched.instances()[0]
        assert not sched.quiet(inst.id)
        sent.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sent
    await wait_for(lambda: inst.in_flight == 0, within=5)
    assert sched.quiet(inst.id)
    await wait_for(lambda: not sched.quiet(inst.id), within=5)  # and then no longer


async def test_a_quiet_instance_is_not_read(aiohttp_server: Any) -> None:
    """The reader of llama-server's /metrics skips an instance the scheduler keeps quiet,
    and keeps what it read of it before."""
    reads: list[str] = []

    async def metrics(_: web.Request) -> web.Response:
        reads.append("read")
        return web.Response(text="llamacpp:prompt_tokens_total 5\n"
                                  "llamacpp:tokens_predicted_total 7\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    server = await aiohttp_server(app)
    inst: Any = SimpleNamespace(id="m#1", model="m", state=State.READY, in_flight=1,
                                base_url=str(server.make_url("")).rstrip("/"),
                                stats=SimpleNamespace(served=0))
    upstream = UpstreamMetrics()
    async with aiohttp.ClientSession() as session:
        await upstream.refresh(session, [inst], only_active=True)
        assert reads == ["read"] and upstream.completion_tokens["m"] == 7
        await upstream.refresh(session, [inst], only_active=True, quiet=lambda _: True)
        await upstream.refresh(session, [inst], quiet=lambda _: True)  # a scrape too
        assert reads == ["read"] and "m#1" in upstream.latest
        await upstream.refresh(session, [inst], quiet=lambda _: False)
        assert reads == ["read", "read"] and upstream.completion_tokens["m"] == 7


async def test_a_write_to_a_client_gone_is_not_the_upstreams_failure(
    served: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's "Cannot write to closing transport" (a client that hung up as its
    answer's first chunk went out) is also a ClientConnectionError: it was taken for
    the upstream failing, a 502 with a WARNING, the call resent and the upstream
    reported (seen when Codex hung up). It is the client's end: 499, no resend, the
    upstream left in rotation."""
    ports, calls = served
    from proxy.calls import routes

    async def writes_to_a_closed_client(up: Any, resp: aiohttp.ClientResponse,
                                        client: Any) -> web.StreamResponse:
        await resp.content.readany()
        raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")

    monkeypatch.setattr(routes, "relay", writes_to_a_closed_client)
    caplog.set_level(logging.INFO)
    metrics = ports.openai.app[METRICS]
    before = hang_ups(metrics, "/v1/chat/completions")
    r = await ports.openai.post("/v1/chat/completions",
                                json={"model": "m", "messages": USER, "stream": True})
    r.release()
    assert hang_ups(metrics, "/v1/chat/completions") == before + 1
    assert len(calls) == 1  # not sent again
    remote = ports.openai.app[SCHEDULER].remotes()[0]
    assert remote.state is State.READY
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING], [
        rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING]
