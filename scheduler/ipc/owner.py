"""Leases across processes, the owner's side: one owner scheduler, worker processes
that relay (their side: ``scheduler.ipc.worker``).

With ``[server] workers = N`` the process started by ``corral serve`` (the *owner*)
keeps everything that decides: the scheduler, its instances, queues and leases.
N *worker* processes listen on its ports (SO_REUSEPORT) and do the per-call HTTP
work; each asks the owner for a lease over its own Unix socket and gives it back
the same way (see docs/design.md, "Workers", for the designs considered).

The contract that matters (contract 1, across processes): a lease granted to a worker
is held in the owner (in a table when a slot was free at once, by a task when the call
had to wait), released when the worker says so *or when its socket closes* — a worker
that dies, however it dies, gives back every lease it held, because the kernel closes
its end of the socket.

The frames on that socket, and how they are encoded: ``scheduler.ipc.wire``.

This module never imports aiohttp.web: the HTTP side of a worker is ``proxy.workers.owner``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from scheduler.config.root import CorralConfig
from scheduler.errors import CorralError
from scheduler.ipc.wire import (
    FRAME_LIMIT,
    Line,
    chain_of_frame,
    config_frame,
    error_frame,
    upstream_frame,
)
from scheduler.keys import tenants
from scheduler.process.children import CHILD_PREEXEC
from scheduler.scheduling.scheduler import LeaseHints, Scheduler, Servable

log = logging.getLogger(__name__)


def resolve_workers(value: int | str, cores: int | None = None) -> int:
    """``[server] workers``: a count, or "auto" = the cores this process may use."""
    if value == "auto":
        if cores is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
                os.cpu_count() or 1)
        return max(1, cores)
    assert isinstance(value, int)
    return max(1, value)


class _Peer:
    """One worker's connection in the owner, and the leases it holds."""

    def __init__(self, index: int, line: Line) -> None:
        self.index = index
        self.line = line
        # Hard references: a lease task is held here until it ends.
        self.tasks: dict[int, asyncio.Task[None]] = {}
        # Granted leases: resolving the future ends the lease normally (cheaper than
        # cancelling its task, which is for those still waiting and for a dead worker).
        self.granted: dict[int, asyncio.Future[None]] = {}
        # Leases taken on the fast path (Scheduler.lease_now): released directly.
        self.held: dict[int, Servable] = {}
        # Calls admitted for an API key and not yet ended, by the worker's call id.
        self.admitted: dict[int, tenants.Key] = {}
        self.config: CorralConfig | None = None
        self.loading: frozenset[str] = frozenset()


class Owner:
    """Runs the workers and serves their leases from ``scheduler``.

    ``argv(index, fd)`` is the worker's command line (``fd``: its end of the socket);
    ``on_stats(index, data)`` receives what a worker reports about its calls. A worker
    that exits is started again after ``restart_delay`` unless Corral is closing.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        count: int,
        argv: Callable[[int, int], Sequence[str]],
        on_stats: Callable[[int, Any], None] = lambda i, d: None,
        on_ensure: Callable[[str], Awaitable[None]] | None = None,
        *,
        restart_delay: float = 0.5,
        config_poll: float = 0.25,
    ) -> None:
        self._scheduler = scheduler
        self._count = count
        self._argv = argv
        self._on_stats = on_stats
        self._on_ensure = on_ensure
        self._restart_delay = restart_delay
        self._config_poll = config_poll
        self._closing = False
        self._runners: list[asyncio.Task[None]] = []
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.peers: dict[int, _Peer] = {}
        self.started = 0  # worker processes started, restarts included

    def leases_held(self) -> int:
        return sum(len(p.tasks) + len(p.held) for p in self.peers.values())

    async def start(self) -> None:
        self._runners = [asyncio.create_task(self._run(i), name=f"corral-worker-{i}")
                         for i in range(1, self._count + 1)]
        self._runners.append(asyncio.create_task(self._push_config(), name="corral-workers-cfg"))

    async def close(self, grace: float) -> None:
        """Ask every worker to finish (SIGTERM: it drains its calls), then kill."""
        self._closing = True
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace + 1):
                await asyncio.gather(*(p.wait() for p in self.procs.values()))
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for task in self._runners:
            task.cancel()
        for task in self._runners:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, index: int) -> None:
        """One worker slot: start the process, serve it, start it again if it died."""
        delay = self._restart_delay
        while not self._closing:
            born = time.monotonic()
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self._argv(index, theirs.fileno()), pass_fds=(theirs.fileno(),),
                    preexec_fn=CHILD_PREEXEC, stdin=asyncio.subprocess.DEVNULL)
            except OSError as e:
                mine.close()
                theirs.close()
                log.error("cannot start worker %d: %s", index, e)
                await asyncio.sleep(self._restart_delay * 10)
                continue
            finally:
                theirs.close()
            self.procs[index] = proc
            self.started += 1
            reader, writer = await asyncio.open_unix_connection(sock=mine, limit=FRAME_LIMIT)
            peer = _Peer(index, Line(reader, writer))
            self.peers[index] = peer
            try:
                await self._serve(peer)
            finally:
                self._drop(peer)
                code = await proc.wait()
            if not self._closing:
                # One that dies at start (a broken install, a port taken) is retried
                # ever more slowly instead of in a tight loop.
                delay = min(30.0, delay * 2) if time.monotonic() - born < 5 else (
                    self._restart_delay)
                log.warning("worker %d (pid %d) exited with %s; its leases were released; "
                            "starting it again in %g s", index, proc.pid, code, delay)
                await asyncio.sleep(delay)

    def _drop(self, peer: _Peer) -> None:
        # The worker is gone: every lease it held is released now (contract 1).
        held, peer.held = peer.held, {}
        for inst in held.values():
            inst.release()
        admitted, peer.admitted = peer.admitted, {}
        for key in admitted.values():
            self._scheduler.tenants.release(key)
        for task in peer.tasks.values():
            task.cancel()
        self.peers.pop(peer.index, None)
        peer.line.close()

    async def _serve(self, peer: _Peer) -> None:
        self._send_config(peer)
        async for frame in peer.line.frames():
            try:
                self._handle(peer, frame)
            except (KeyError, ValueError, TypeError) as e:
                # A bug, not a reason to stop serving the worker's other leases.
                log.error("worker %d sent a bad frame (%s): %.200r", peer.index, e, frame)

    def _handle(self, peer: _Peer, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        if op == "lease":
            cid = int(frame["id"])
            hints = LeaseHints(chain=chain_of_frame(frame.get("chain")),
                               keep_alive=frame.get("keep_alive"),
                               avoid=frozenset(map(str, frame.get("avoid") or ())),
                               need_ctx=int(frame.get("need_ctx") or 0),
                               want_ctx=int(frame.get("want_ctx") or 0))
            model = str(frame["model"])
            now = self._scheduler.lease_now(model, hints)
            if now is not None:
                # A free slot now: held in a table, no task (most leases, under load).
                up, peer.held[cid] = now
                peer.line.send({"op": "leased", "id": cid, "up": upstream_frame(up)})
            else:
                key = self._key(frame.get("key"))  # its place in the queue
                self._hold(peer, cid, self._lease(peer, cid, model, hints, key))
        elif op == "release":
            cid = int(frame["id"])
            if (early := frame.get("early")) is not None:
                self._scheduler.hush(str(early))  # the worker's call ended early
            if (held := peer.held.pop(cid, None)) is not None:
                held.release()
                return
            granted = peer.granted.pop(cid, None)
            if granted is not None:
                if not granted.done():
                    granted.set_result(None)
            elif (task := peer.tasks.get(cid)) is not None:
                task.cancel()
        elif op == "suspect":
            iid, reason = str(frame["iid"]), str(frame["reason"])
            self._background(peer, lambda: self._scheduler.suspect(iid, reason))
        elif op == "failed":
            iid, reason = str(frame["iid"]), str(frame["reason"])
            connect = bool(frame.get("connect"))
            self._background(peer, lambda: self._scheduler.upstream_failed(
                iid, reason, connect=connect))
        elif op == "unload":
            model = str(frame["model"])
            self._answer(peer, int(frame["id"]), lambda: self._scheduler.unload(model))
        elif op == "ensure" and self._on_ensure is not None:
            ensure, model = self._on_ensure, str(frame["model"])
            self._answer(peer, int(frame["id"]), lambda: ensure(model))
        elif op == "stats":
            self._on_stats(peer.index, frame.get("data"))
        elif op == "admit":
            self._admit(peer, int(frame["id"]), self._key(frame.get("key")))
        elif op == "unadmit":
            # Also sent for an admission refused or still unanswered when the call was
            # cancelled: only one granted is released.
            if (key := peer.admitted.pop(int(frame["id"]), None)) is not None:
                self._scheduler.tenants.release(key)
        elif op == "charge" and (key := self._key(frame.get("key"))) is not None:
            self._scheduler.charge(key, int(frame["tokens"]))

    # -- API keys: one count of every process's calls, so that limits hold -----------

    def _key(self, name: object) -> tenants.Key | None:
        return self._scheduler.tenants.named(name) if isinstance(name, str) else None

    def _admit(self, peer: _Peer, cid: int, key: tenants.Key | None) -> None:
        # A key a reload removed meanwhile has no limits left to hold.
        if key is not None:
            try:
                self._scheduler.tenants.admit(key)
            except CorralError as e:
                peer.line.send(error_frame(cid, e))
                return
            peer.admitted[cid] = key
        peer.line.send({"op": "done", "id": cid, "value": None})

    async def _lease(self, peer: _Peer, cid: int, model: str, hints: LeaseHints,
                     key: tenants.Key | None) -> None:
        # The calling key places the waiter in the owner's one fair queue, by its
        # priority, as it would in one process (this task has its own context).
        tenants.CURRENT.set(key)
        try:
            async with self._scheduler.lease(model, hints) as up:
                released = peer.granted[cid] = asyncio.get_running_loop().create_future()
                peer.line.send({"op": "leased", "id": cid, "up": upstream_frame(up)})
                # Held until the worker releases it, or dies (this task is cancelled).
                await released
        except CorralError as e:
            peer.line.send(error_frame(cid, e))
        finally:
            peer.granted.pop(cid, None)

    @staticmethod
    def _hold(peer: _Peer, cid: int, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        peer.tasks[cid] = task
        # Not in the coroutine's own finally: a task cancelled before its first step
        # never runs its body, and would stay listed as a lease forever.
        task.add_done_callback(lambda _: peer.tasks.pop(cid, None))

    # The scheduler's coroutine is made inside the task (``call``, not a coroutine
    # object): a task cancelled before it starts would leave it never awaited.

    def _background(self, peer: _Peer, call: Callable[[], Awaitable[Any]]) -> None:
        async def run() -> None:
            try:
                await call()
            except CorralError as e:
                log.warning("worker %d: %s", peer.index, e.message)

        self._hold(peer, -next(_ids), run())

    def _answer(self, peer: _Peer, cid: int, call: Callable[[], Awaitable[Any]]) -> None:
        async def run() -> None:
            try:
                value = await call()
                if peer.config is not self._scheduler.config:
                    # Before the answer: what the call changed (a pulled model) must be
                    # known to the worker when it goes on.
                    self._send_config(peer)
                peer.line.send({"op": "done", "id": cid, "value": value})
            except CorralError as e:
                peer.line.send(error_frame(cid, e))

        self._hold(peer, cid, run())

    def _send_config(self, peer: _Peer) -> None:
        cfg = self._scheduler.config
        peer.config = cfg
        peer.line.send(config_frame(cfg))

    async def _push_config(self) -> None:
        # The scheduler replaces its config object on every reload and dynamic-model
        # change; a poll finds that without a hook in the scheduler. The models loading
        # now go along, for the loading feedback of a worker's waiting calls.
        while True:
            await asyncio.sleep(self._config_poll)
            loading = self._scheduler.loading()
            for peer in list(self.peers.values()):
                if peer.config is not self._scheduler.config:
                    self._send_config(peer)
                if peer.loading != loading:
                    peer.loading = loading
                    peer.line.send({"op": "loading", "models": sorted(loading)})


_ids = itertools.count(1)


# -- the worker's side ------------------------------------------------------------------


def worker_argv(module: str) -> Callable[[int, int], list[str]]:
    """A worker's command line: this interpreter running ``module``."""
    return lambda index, fd: [sys.executable, "-m", module, "--fd", str(fd),
                              "--index", str(index)]
