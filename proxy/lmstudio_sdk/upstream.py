"""The one place where the SDK protocol and REST v1 chat call llama-server.

Every call takes a lease first, as every other Corral call does; the lease is held
while the response is read and released on every exit path. Cancelling the caller
closes the upstream response, which makes llama-server stop the slot at once.
Swap this function onto the shared upstream call path when that exists.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from proxy.keys import SCHEDULER, SESSION
from proxy.reqlog import note_model
from proxy.streaming import post_upstream
from scheduler.scheduler import LeaseHints, Upstream


@contextlib.asynccontextmanager
async def open_stream(
    app: web.Application, model: str, path: str, payload: dict[str, Any],
    hints: LeaseHints | None = None,
) -> AsyncIterator[tuple[Upstream, aiohttp.ClientResponse]]:
    """POST ``payload`` to an instance of ``model``; yield the lease and the 200 answer.

    Raises the scheduler's CorralErrors (UnknownModel, LoadFailed, Overloaded...) and
    llama-server's non-200 answers as CorralErrors with its status and message.
    """
    async with (
        app[SCHEDULER].lease(model, hints) as up,
        post_upstream(app[SESSION], up.base_url, up.instance_id, path, payload) as resp,
    ):
        note_model(up.model)
        yield up, resp


async def call_json(
    app: web.Application, model: str, path: str, payload: dict[str, Any]
) -> dict[str, Any]:
    """``open_stream`` for a small JSON answer (tokenize, apply-template, embeddings)."""
    async with open_stream(app, model, path, payload) as (_, resp):
        body = await resp.json(content_type=None)
    return body if isinstance(body, dict) else {}
