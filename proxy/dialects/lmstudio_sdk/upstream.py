"""Where the SDK protocol and REST v1 chat call llama-server.

Predictions and small calls go through the one upstream call path
(``proxy.calls.upstream.call_app``): leases, time limits, resending while nothing has
reached the client. Cancelling the caller closes the upstream response, which makes
llama-server stop the slot at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from proxy.calls import context
from proxy.calls.call import Call, Client
from proxy.calls.streaming import upstream_batches
from proxy.calls.upstream import call_app
from proxy.dialects.translate import upstream_error_body
from proxy.edge import jsonc
from proxy.keys import SCHEDULER
from scheduler.aio import cancel_and_wait
from scheduler.scheduling.scheduler import LeaseHints, Upstream


async def stream_events(
    app: web.Application, model: str, path: str, payload: dict[str, Any],
    on_batch: Callable[[list[dict[str, Any]]], Awaitable[None]],
    hints: LeaseHints | None = None,
) -> None:
    """POST ``payload`` (a stream) to an instance of ``model`` through the one upstream
    call path; ``on_batch`` gets llama-server's events as they arrive. A call that
    fails before its first event is resent; after it, the failure is raised. Without
    ``hints``, the call's chain of prefixes is the payload's (replica choice, slot
    cache)."""

    async def consume(up: Upstream, resp: aiohttp.ClientResponse, client: Client) -> None:
        if resp.status != 200:
            raise upstream_error_body(resp.status, await resp.read())
        async for batch in upstream_batches(resp, up.instance_id):
            client.answered = True
            await on_batch(batch)

    if hints is None and app[SCHEDULER].balanced(model):
        hints = LeaseHints(chain=jsonc.chain_of(payload))
    # A prompt longer than the instance's context gets a larger one (proxy/calls/context.py).
    fit = context.of(path, payload=payload, family="lmstudio")
    await call_app(app, Call(model=model, path=path, payload=payload, hints=hints, fit=fit),
                   consume)


async def call_json(
    app: web.Application, model: str, path: str, payload: dict[str, Any]
) -> dict[str, Any]:
    """A small JSON answer (tokenize, apply-template, embeddings), resent on failure."""

    async def consume(up: Upstream, resp: aiohttp.ClientResponse, client: Client) -> Any:
        raw = await resp.read()
        if resp.status != 200:
            raise upstream_error_body(resp.status, raw)
        return jsonc.loads(raw)

    body = await call_app(app, Call(model=model, path=path, payload=payload), consume)
    return body if isinstance(body, dict) else {}


async def event_batches(
    app: web.Application, model: str, path: str, payload: dict[str, Any],
    hints: LeaseHints | None = None,
) -> AsyncGenerator[list[dict[str, Any]], None]:
    """``stream_events`` as an async generator, for REST v1 chat, whose event
    generator reads the answer in its own steps. Closing it cancels the call (and so
    the upstream request)."""
    queue: asyncio.Queue[list[dict[str, Any]] | BaseException | None] = asyncio.Queue()

    async def put(batch: list[dict[str, Any]]) -> None:
        queue.put_nowait(batch)

    async def run() -> None:
        try:
            await stream_events(app, model, path, payload, put, hints)
        except Exception as e:
            queue.put_nowait(e)
        else:
            queue.put_nowait(None)

    task = asyncio.create_task(run())
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        await cancel_and_wait(task)
