"""Leases across processes (scheduler/ipc/owner.py and worker.py; their frames:
scheduler/ipc/wire.py), both ends in one event loop: the owner's lease server and a
WorkerScheduler over a real Unix socket pair, a real Scheduler whose model is a remote
(an aiohttp app standing in for a health-checked server)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from scheduler.config.root import CorralConfig
from scheduler.errors import (
    ContextTooLong,
    CorralError,
    Overloaded,
    RateLimited,
    ShuttingDown,
    UnknownModel,
)
from scheduler.ipc import wire as ipc_wire
from scheduler.ipc.owner import Owner, _Peer, resolve_workers
from scheduler.ipc.worker import WorkerScheduler, connect
from scheduler.scheduling.scheduler import LeaseHints, Scheduler
from tests.conftest import wait_for


def test_resolve_workers() -> None:
    assert resolve_workers(3) == 3
    assert resolve_workers("auto", cores=8) == 8
    assert resolve_workers("auto") >= 1


@pytest.mark.parametrize("error", [
    UnknownModel("x", ["a", "b"]), Overloaded("queue full", retry_after=2.5),
    CorralError("plain"), ContextTooLong("m", 9004, 8192, 100)])
def test_errors_cross_with_their_class_and_fields(error: CorralError) -> None:
    back = ipc_wire.error_of(ipc_wire.error_frame(7, error))
    assert type(back) is type(error)
    assert (back.message, back.status, back.code, str(back)) == (
        error.message, error.status, error.code, str(error))
    if isinstance(error, Overloaded):
        assert isinstance(back, Overloaded) and back.retry_after == 2.5
    if isinstance(error, ContextTooLong):
        # The worker words it in its caller's family from these.
        assert isinstance(back, ContextTooLong)
        assert (back.tokens, back.maximum, back.output) == (9004, 8192, 100)


@contextlib.asynccontextmanager
async def pair(slots: int = 2, keys: list[dict[str, Any]] | None = None, **remote: Any
               ) -> AsyncIterator[tuple[Scheduler, WorkerScheduler, Any]]:
    async def ok(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/health", ok)
    server = TestServer(app)
    await server.start_server()
    url = str(server.make_url(""))
    cfg = CorralConfig.model_validate({"keys": keys or [], "models": [{
        "name": "m", "remote_slots": slots,
        "remotes": [{"url": url, **remote} if remote else url]}]})
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
            yield sched, worker, (serving, owner, peer)
        finally:
            await worker.close()
            for t in (reading, serving):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            owner._drop(peer)
            await sched.close()
            await server.close()


def in_flight(sched: Scheduler) -> int:
    return sum(r.in_flight for r in sched.remotes())


async def test_a_lease_from_a_worker_is_held_and_released() -> None:
    async with pair() as (sched, worker, _):
        assert worker.resolve("m").name == "m"
        async with worker.lease("m") as up:
            assert up.model == "m" and up.base_url.startswith("http://")
            assert in_flight(sched) == 1
        await wait_for(lambda: in_flight(sched) == 0, within=2)
        with pytest.raises(UnknownModel) as info:
            async with worker.lease("nope"):
                pass
        assert info.value.status == 404 and "available models: m" in info.value.message


async def test_a_worker_s_lease_carries_the_context_it_needs() -> None:
    async with pair() as (sched, worker, _):
        seen: list[LeaseHints] = []
        lease_now = sched.lease_now

        def recording(name: str, hints: LeaseHints) -> Any:
            seen.append(hints)
            return lease_now(name, hints)

        sched.lease_now = recording  # type: ignore[method-assign]
        async with worker.lease("m", LeaseHints(need_ctx=5000, want_ctx=8192)) as up:
            assert up.ctx == 0  # a remote: its context is its own business
        assert [(h.need_ctx, h.want_ctx) for h in seen] == [(5000, 8192)]


async def test_a_closed_socket_releases_every_lease() -> None:
    async with pair(slots=4) as (sched, worker, (serving, owner, peer)):
        held = [worker.lease("m") for _ in range(3)]
        for cm in held:
            await cm.__aenter__()
        assert in_flight(sched) == 3
        # The worker dies without a word: its end of the socket closes.
        worker._line.writer.transport.abort()
        await asyncio.wait_for(serving, 2)
        owner._drop(peer)
        await wait_for(lambda: in_flight(sched) == 0, within=2)
        # Meanwhile the worker side fails what it still waits for, cleanly.
        await wait_for(worker.lost.is_set, within=2)
        with pytest.raises(ShuttingDown):
            async with worker.lease("m"):
                pass


async def test_a_waiting_lease_cancelled_by_the_worker_leaves_nothing_behind() -> None:
    async with pair(slots=1) as (sched, worker, _):
        async with worker.lease("m"):
            waiting = asyncio.create_task(worker.lease("m").__aenter__())
            await asyncio.sleep(0.05)
            assert not waiting.done()  # queued behind the first
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
        await wait_for(lambda: in_flight(sched) == 0, within=2)
        async with worker.lease("m"):  # the slot is free again
            assert in_flight(sched) == 1


async def test_a_release_right_behind_its_lease_leaves_no_task_and_no_lease() -> None:
    async with pair() as (sched, worker, (_serving, _owner, peer)):
        for cid in range(100, 110):
            # Both frames in one read: the lease task is cancelled before its first step.
            worker._line.send({"op": "lease", "id": cid, "model": "m"})
            worker._line.send({"op": "release", "id": cid})
        worker._line.send({"op": "suspect", "iid": "nope", "reason": "test"})
        worker._line.send({"op": "bogus"})
        worker._line.send({"op": "lease"})  # a bad frame is logged, the rest still served
        await wait_for(lambda: not peer.tasks, within=2)
        assert in_flight(sched) == 0
        async with worker.lease("m"):
            assert in_flight(sched) == 1


async def test_a_remote_s_key_headers_name_and_api_reach_the_worker() -> None:
    async with pair(api_key="sk-remote-secret", headers={"X-Org": "o1"}, model="theirs",
                    api=["chat"], tls_verify=False) as (_sched, worker, _):
        # The config crossed with its secret intact (the worker's log scrubber needs it).
        remote = worker.config.models[0].remotes[0]
        assert remote.api_key is not None
        assert remote.api_key.get_secret_value() == "sk-remote-secret"
        async with worker.lease("m") as up:
            e = up.egress
            assert e.headers == {"X-Org": "o1", "Authorization": "Bearer sk-remote-secret"}
            assert (e.rename, e.ssl, up.apis) == ("theirs", False, frozenset({"chat"}))


def test_a_tls_context_crosses_as_its_ca_certificates(tmp_path: Any) -> None:
    import ssl as ssl_mod

    from scheduler.engines.egress import Egress
    from scheduler.scheduling.scheduler import Upstream

    ca = ssl_mod.get_default_verify_paths().cafile
    if ca is None:
        pytest.skip("no system CA bundle here to load as a ca_file")
    ctx = ssl_mod.create_default_context(cafile=ca)
    up = Upstream("https://r", "r#1", "m", 0.0, None, Egress(ssl=ctx))
    back = ipc_wire.upstream_of(msgspec_roundtrip(ipc_wire.upstream_frame(up)))
    assert isinstance(back.egress.ssl, ssl_mod.SSLContext)
    assert back.egress.ssl.get_ca_certs(True) == ctx.get_ca_certs(True)


def test_a_chain_and_a_slot_cross_the_frames() -> None:
    from scheduler.scheduling.scheduler import Upstream

    chain = ((1, 100), ((1 << 63) - 1, 5000))
    frame = msgspec_roundtrip({"op": "lease", "chain": chain})
    assert ipc_wire.chain_of_frame(frame["chain"]) == chain
    assert ipc_wire.chain_of_frame(None) == ()
    up = Upstream("http://i", "m#1", "m", 0.0, None, slot=3)
    assert ipc_wire.upstream_of(msgspec_roundtrip(ipc_wire.upstream_frame(up))).slot == 3


def msgspec_roundtrip(value: Any) -> Any:
    import msgspec

    return msgspec.json.decode(msgspec.json.encode(value))


async def test_a_free_slot_is_leased_without_a_task_and_a_full_one_waits_in_one() -> None:
    async with pair(slots=1) as (sched, worker, (_serving, owner, peer)):
        async with worker.lease("m"):  # the first waits for the remote's health check
            pass
        await wait_for(lambda: in_flight(sched) == 0 and not peer.tasks, within=2)
        owner.peers[peer.index] = peer  # as Owner._run registers it
        async with worker.lease("m"):
            # The fast path (Scheduler.lease_now): held in the peer's table, no task.
            assert len(peer.held) == 1 and not peer.tasks and owner.leases_held() == 1
            second = worker.lease("m")
            waiting = asyncio.create_task(second.__aenter__())
            await wait_for(lambda: len(peer.tasks) == 1, within=2)
            assert not waiting.done() and owner.leases_held() == 2
        await asyncio.wait_for(waiting, 2)  # granted by the task once the slot is free
        assert not peer.held and in_flight(sched) == 1
        await second.__aexit__(None, None, None)
        await wait_for(lambda: in_flight(sched) == 0 and not peer.tasks, within=2)


async def test_a_key_s_limits_are_counted_in_the_owner_for_every_worker() -> None:
    keys = [{"name": "k", "key": "sk-test-k", "max_concurrent": 1}]
    async with pair(keys=keys) as (sched, worker, (serving, owner, peer)):
        key = worker.tenants.named("k")
        assert key is not None
        usage = sched.tenants.usage["k"]
        async with worker.admitted(key):
            assert usage.in_flight == 1  # counted where every worker's calls are
            with pytest.raises(RateLimited) as info:
                async with worker.admitted(key):  # over max_concurrent, from any process
                    pass
            assert info.value.status == 429 and "max_concurrent" in info.value.message
            # The refused one's unadmit (sent on every exit) releases nothing.
            await asyncio.sleep(0.05)
            assert usage.in_flight == 1 and len(peer.admitted) == 1
            worker.charge(key, 7)
        await wait_for(lambda: usage.in_flight == 0 and not peer.admitted, within=2)
        assert usage.tokens_total == 7 and usage.rejected_total == 1
        # A call cancelled while its admission is on the way gives it back all the same.
        waiting = asyncio.create_task(worker.admitted(key).__aenter__())
        await asyncio.sleep(0)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        await wait_for(lambda: usage.in_flight == 0 and not peer.admitted, within=2)
        # A worker that dies gives back what it had admitted, as it does its leases.
        held = worker.admitted(key)
        await held.__aenter__()
        assert usage.in_flight == 1
        worker._line.writer.transport.abort()
        await asyncio.wait_for(serving, 2)
        owner._drop(peer)
        assert usage.in_flight == 0 and not peer.admitted


async def test_a_reloaded_config_changes_the_keys_a_worker_accepts() -> None:
    async with pair(keys=[{"name": "old", "key": "sk-old-key"}]) as (_, worker, _peer):
        assert worker.tenants.lookup(b"sk-old-key") is not None
        worker.set_config(CorralConfig.model_validate({
            "keys": [{"name": "new", "key": "sk-new-key"}],
            "models": [m.model_dump() for m in worker.config.models]}))
        assert worker.tenants.lookup(b"sk-old-key") is None
        assert worker.tenants.lookup(b"sk-new-key") is not None


async def test_the_models_loading_in_the_owner_reach_the_worker() -> None:
    async with pair() as (sched, worker, (_serving, owner, peer)):
        owner.peers[peer.index] = peer
        owner._config_poll = 0.02
        now: frozenset[str] = frozenset({"m", "m-alias"})
        sched.loading = lambda: now  # type: ignore[method-assign]
        pushing = asyncio.create_task(owner._push_config())
        try:
            await wait_for(lambda: worker.loading() == {"m", "m-alias"}, within=2)
            now = frozenset()
            await wait_for(lambda: not worker.loading(), within=2)
        finally:
            pushing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pushing
