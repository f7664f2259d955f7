"""Leases across processes, a worker's side: the scheduler as a worker sees it, whose
names resolve from the owner's config and whose leases come from the owner
(``scheduler.ipc.owner``) over the Unix socket it was given. Frames:
``scheduler.ipc.wire``.

This module never imports aiohttp.web: the HTTP side of a worker is ``proxy.workers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from scheduler.config.root import CorralConfig
from scheduler.errors import ShuttingDown
from scheduler.ipc.wire import (
    FRAME_LIMIT,
    Line,
    config_of,
    error_of,
    upstream_of,
)
from scheduler.keys import tenants
from scheduler.scheduling.scheduler import LeaseHints, Scheduler, Upstream


class WorkerScheduler(Scheduler):
    """The scheduler as a worker sees it: names resolve from the owner's config (sent
    on every change), leases come from the owner. It launches nothing and holds no
    instance: ``instances()`` and ``loaded()`` are empty here, which is why the
    worker forwards every call that reads them to the owner (``proxy.workers.owner``).
    """

    def __init__(self, cfg: CorralConfig, session: aiohttp.ClientSession, line: Line) -> None:
        super().__init__(cfg, session)
        self._line = line
        self._calls = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._loading: frozenset[str] = frozenset()
        self.lost = asyncio.Event()

    def set_config(self, cfg: CorralConfig) -> None:
        self._cfg = self._configured = cfg
        self._models = {}
        self._apply_models(cfg)
        # The keys this worker accepts follow every reload, as the owner's do.
        self.tenants.configure(cfg)

    async def run(self, on_config: Callable[[CorralConfig], None] | None = None) -> None:
        """Read the owner's frames until its socket closes."""
        try:
            async for frame in self._line.frames():
                op = frame.get("op")
                if op == "config":
                    cfg = config_of(frame)
                    self.set_config(cfg)
                    if on_config is not None:
                        on_config(cfg)
                    continue
                if op == "loading":
                    self._loading = frozenset(map(str, frame.get("models") or ()))
                    continue
                fut = self._pending.get(int(frame.get("id", 0)))
                if fut is None or fut.done():
                    continue
                if op == "error":
                    fut.set_exception(error_of(frame))
                elif op == "leased":
                    fut.set_result(upstream_of(frame["up"]))
                else:
                    fut.set_result(frame.get("value"))
        finally:
            self.lost.set()
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ShuttingDown("the Corral owner process is gone"))

    async def _ask(self, cid: int, frame: dict[str, Any]) -> Any:
        if self.lost.is_set():
            raise ShuttingDown("the Corral owner process is gone")
        fut = asyncio.get_running_loop().create_future()
        self._pending[cid] = fut
        try:
            self._line.send(frame)
            return await fut
        finally:
            self._pending.pop(cid, None)

    @contextlib.asynccontextmanager
    async def lease(self, name: str, hints: LeaseHints | None = None) -> AsyncIterator[Upstream]:
        cid = next(self._calls)
        hints = hints or LeaseHints()
        release: dict[str, Any] = {"op": "release", "id": cid}
        try:
            key = tenants.current()
            up: Upstream = await self._ask(cid, {
                "op": "lease", "id": cid, "model": name, "chain": hints.chain,
                "keep_alive": hints.keep_alive, "key": key.name if key is not None else None,
                "avoid": sorted(hints.avoid), "need_ctx": hints.need_ctx,
                "want_ctx": hints.want_ctx})
            try:
                yield up
            except BaseException:
                # Ended early (a hang-up, a failure): the owner leaves it alone a while
                # (Scheduler.quiet), as for a call of its own.
                release["early"] = up.instance_id
                raise
        finally:
            # Also when the wait was cancelled: the owner may have granted it meanwhile.
            self._line.send(release)

    async def suspect(self, instance_id: str, reason: str) -> None:
        self._line.send({"op": "suspect", "iid": instance_id, "reason": reason})

    def loading(self) -> frozenset[str]:
        """The owner's, as it last said (within its config poll, 0.25 s)."""
        return self._loading

    # A key's calls are counted in the owner, with every other worker's.

    @contextlib.asynccontextmanager
    async def admitted(self, key: tenants.Key) -> AsyncIterator[None]:
        cid = next(self._calls)
        try:
            await self._ask(cid, {"op": "admit", "id": cid, "key": key.name})
            yield
        finally:
            # Also when refused or cancelled while waiting: the owner may have admitted
            # it meanwhile, and it releases only what it granted.
            self._line.send({"op": "unadmit", "id": cid})

    def charge(self, key: tenants.Key, tokens: int) -> None:
        if tokens > 0:
            self._line.send({"op": "charge", "key": key.name, "tokens": tokens})

    async def upstream_failed(self, instance_id: str, reason: str, connect: bool) -> bool:
        self._line.send({"op": "failed", "iid": instance_id, "reason": reason,
                         "connect": connect})
        return True

    async def unload(self, name: str) -> int:
        cid = next(self._calls)
        return int(await self._ask(cid, {"op": "unload", "id": cid, "model": name}))

    async def ensure_pulled(self, name: str) -> None:
        """``auto_pull`` from a worker: the owner pulls (one download for every
        process) and answers once the new model's config has reached this worker."""
        cid = next(self._calls)
        await self._ask(cid, {"op": "ensure", "id": cid, "model": name})

    def send_stats(self, data: Any) -> None:
        self._line.send({"op": "stats", "data": data})

    async def start(self) -> None:
        """Nothing to start: the owner runs the instances."""

    async def close(self) -> None:
        self._line.close()


async def connect(fd: int) -> Line:
    """The worker's end of the socket the owner passed it."""
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=FRAME_LIMIT)
    return Line(reader, writer)
