"""What a worker's call tells the owner about its upstream (issues 23 and 25): a lease
that ended early leaves the upstream quiet in the owner, and a resend's ``avoid``
reaches the owner's choice. Both ends in one event loop over a real socket pair, as in
test_ipc.py, with two remotes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from scheduler.config.root import CorralConfig
from scheduler.ipc import wire as ipc_wire
from scheduler.ipc.owner import Owner, _Peer
from scheduler.ipc.worker import WorkerScheduler, connect
from scheduler.scheduling.scheduler import LeaseHints, Scheduler
from tests.conftest import wait_for


@contextlib.asynccontextmanager
async def two_remotes() -> AsyncIterator[tuple[Scheduler, WorkerScheduler]]:
    async def ok(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    servers = []
    for _ in range(2):
        app = web.Application()
        app.router.add_get("/health", ok)
        servers.append(TestServer(app))
        await servers[-1].start_server()
    cfg = CorralConfig.model_validate({"models": [{
        "name": "m", "remotes": [str(s.make_url("")) for s in servers]}]})
    async with aiohttp.ClientSession() as session:
        sched = Scheduler(cfg, session)
        await sched.start()
        owner = Owner(sched, 1, lambda i, fd: [])
        a, b = socket.socketpair()
        ra, wa = await asyncio.open_unix_connection(sock=a)
        peer = _Peer(1, ipc_wire.Line(ra, wa))
        serving = asyncio.create_task(owner._serve(peer))
        line = await connect(b.detach())
        first = await line.next()
        assert first is not None and first["op"] == "config"
        worker = WorkerScheduler(ipc_wire.config_of(first), session, line)
        reading = asyncio.create_task(worker.run())
        try:
            await wait_for(lambda: all(str(r.state) == "ready" for r in sched.remotes()))
            yield sched, worker
        finally:
            await worker.close()
            for t in (reading, serving):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            owner._drop(peer)
            await sched.close()
            for s in servers:
                await s.close()


async def test_a_resend_from_a_worker_avoids_the_upstream_that_failed() -> None:
    async with two_remotes() as (sched, worker):
        first, second = (r.id for r in sched.remotes())
        for avoided, expected in ((first, second), (second, first)):
            for _ in range(3):
                async with worker.lease("m", LeaseHints(avoid=frozenset({avoided}))) as up:
                    assert up.instance_id == expected


async def test_a_worker_call_that_ended_early_leaves_its_upstream_quiet() -> None:
    async with two_remotes() as (sched, worker):
        async with worker.lease("m") as up:
            pass
        assert not sched.quiet(up.instance_id)
        with pytest.raises(asyncio.CancelledError):
            async with worker.lease("m") as up:
                raise asyncio.CancelledError  # the client hung up
        await wait_for(lambda: sched.quiet(up.instance_id), within=2)
