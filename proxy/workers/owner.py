"""The HTTP side of ``[server] workers = N``: worker processes and what the owner adds.

The N workers listen on every port (SO_REUSEPORT: the kernel spreads new connections
over them); the owner only holds each port bound, so that its event loop answers
leases at once. A worker answers locally only the calls that are pure relay or
translation work — the rows of the route table, Ollama's chat, generate and embed,
LM Studio's /api/v0 chat and completions — with leases from the owner
(``scheduler.ipc.owner``). Every other request (admin, /metrics, the dashboard, model lists,
load and unload, the SDK websockets, stateful chats) is forwarded as it came to the
owner over a private Unix socket, so it behaves exactly as with one process.

A worker's call counts, recent requests and listener events reach the owner's
/metrics and dashboard every ``STATS_EVERY`` seconds (at most that much of a dying
worker's counts is lost).

The worker process itself is ``proxy.workers.main``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.calls import routes
from proxy.keys import SCHEDULER
from proxy.metrics.registry import METRICS, Metrics
from proxy.metrics.scrape import CallStats
from proxy.ops import pulls
from scheduler.ipc.owner import Owner, worker_argv

log = logging.getLogger(__name__)

STATS_EVERY = 0.5
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Served by a worker itself: per-call relay and translation work, nothing that reads
# the owner's state beyond resolving a name and taking a lease. Not /v1/responses: a
# translated Responses conversation is stored (previous_response_id) in the process
# that answered it, so every Responses call goes to the owner.
LOCAL_PATHS = frozenset({
    *(p for r in routes.ROUTES for p in r.paths if not p.startswith("/v1/responses")),
    "/api/chat", "/api/generate", "/api/embed", "/api/embeddings",
    "/api/v0/chat/completions", "/api/v0/completions",
})

# Hop-by-hop headers (RFC 9110 7.6.1) are the forwarding connection's, not the call's.
_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                  "transfer-encoding", "upgrade"})


def _end_to_end(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _HOP}


# -- forwarding to the owner ----------------------------------------------------------


class Forwarder:
    """``middleware``, outermost in a worker's app: anything not in LOCAL_PATHS goes to
    the owner's listener for the same port, over its Unix socket."""

    def __init__(self, socket_path: str) -> None:
        self._path = socket_path
        self._session: aiohttp.ClientSession | None = None

    def _owner(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self._path, limit=0),
                timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False)
        return self._session

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        if resource is not None and resource.canonical in LOCAL_PATHS:
            return await handler(request)
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await _forward_websocket(request, self._owner())
        return await _forward(request, self._owner())

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


async def _forward(request: web.Request, owner: aiohttp.ClientSession) -> web.StreamResponse:
    data = request.content if request.can_read_body else None
    async with owner.request(
        request.method, f"http://owner{request.raw_path}", headers=_end_to_end(request.headers),
        data=data, allow_redirects=False,
    ) as resp:
        out = web.StreamResponse(status=resp.status, reason=resp.reason,
                                 headers=_end_to_end(resp.headers))
        await out.prepare(request)
        async for chunk in resp.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
        return out


async def _forward_websocket(
    request: web.Request, owner: aiohttp.ClientSession
) -> web.StreamResponse:
    headers = {k: v for k, v in _end_to_end(request.headers).items()
               if not k.lower().startswith("sec-websocket")}
    async with owner.ws_connect(f"http://owner{request.raw_path}", headers=headers,
                                autoping=False, max_msg_size=0) as up:
        down = web.WebSocketResponse(autoping=False, max_msg_size=0)
        await down.prepare(request)

        async def pump(src: Any, dst: Any) -> None:
            async for msg in src:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await dst.send_str(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await dst.send_bytes(msg.data)
                elif msg.type == aiohttp.WSMsgType.PING:
                    await dst.ping(msg.data)
                elif msg.type == aiohttp.WSMsgType.PONG:
                    await dst.pong(msg.data)
            await dst.close()

        tasks = [asyncio.create_task(pump(up, down)), asyncio.create_task(pump(down, up))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return down


# -- metrics: worker -> owner ---------------------------------------------------------


# A worker's listener events by (port, event), and ("", ACCEPT_ERROR) for accepts that
# failed for lack of descriptors.
Events = Counter[tuple[str, str]]
ACCEPT_ERROR = "accept_error"


def take_stats(stats: Metrics, events: Events) -> dict[str, Any] | None:
    """The calls and listener events recorded since the last take (and forgets them);
    None when there were none."""
    calls, stats.calls = stats.calls, {}
    recent = list(stats.recent)
    stats.recent.clear()
    happened = [[port, event, n] for (port, event), n in events.items()]
    events.clear()
    if not calls and not recent and not happened:
        return None
    return {
        "calls": [[*key, s.count, s.dur, s.dur_sum, s.ttft, s.ttft_sum, s.ttft_count,
                   s.translated] for key, s in calls.items()],
        "recent": [list(r) for r in recent],
        "events": happened,
    }


def merge_stats(into: Metrics, data: Any) -> None:
    """Add a worker's ``take_stats`` to the owner's metrics."""
    if not isinstance(data, dict):
        return
    for (model, dialect, endpoint, status, count, dur, dur_sum, ttft, ttft_sum, ttft_count,
         translated) in data.get("calls") or ():
        key = (model, dialect, endpoint, int(status))
        st = into.calls.get(key)
        if st is None:
            st = into.calls[key] = CallStats()
        st.count += count
        st.translated += translated
        st.dur = [a + b for a, b in zip(st.dur, dur, strict=False)]
        st.dur_sum += dur_sum
        st.ttft = [a + b for a, b in zip(st.ttft, ttft, strict=False)]
        st.ttft_sum += ttft_sum
        st.ttft_count += ttft_count
    for port, event, n in data.get("events") or ():
        if event == ACCEPT_ERROR:
            into.accept_errors.inc(n)
        else:
            into.listener_events.labels(port, event).inc(n)
    for r in data.get("recent") or ():
        into.recent.append(tuple(r))
    # Newest last, as if recorded here: the ring is ordered by time.
    ordered = sorted(into.recent, key=lambda r: r[0])
    into.recent.clear()
    into.recent.extend(ordered)


# The listeners a worker shares, by the label serve() logs them with.
PORT_KINDS = {"Ollama API": "ollama", "LM Studio API": "lmstudio"}


# -- the owner's side in serve() ------------------------------------------------------


class OwnerSide:
    """What ``serve()`` adds with workers > 1: Unix listeners the workers forward to,
    and the workers themselves."""

    def __init__(self, root: web.Application, count: int) -> None:
        self.root = root
        self.count = count
        self._dir = tempfile.TemporaryDirectory(prefix="corral-workers-")
        os.chmod(self._dir.name, 0o700)  # the sockets skip TCP's Host/port checks
        self.dir = Path(self._dir.name)
        self.owner: Owner | None = None
        self.reported: dict[int, int] = {}  # worker index -> calls it reported
        self._reserved: list[socket.socket] = []
        self._runners: dict[str, web.AppRunner] = {}
        self._ports: dict[str, int] = {}
        root.router.add_get("/admin/workers", self.handle_admin)

    async def handle_admin(self, request: web.Request) -> web.Response:
        """``GET /admin/workers``: each worker process, its leases and its calls."""
        owner = self.owner
        rows: list[dict[str, Any]] = [{"index": 0, "pid": os.getpid(), "role": "owner"}]
        if owner is not None:
            for i in range(1, self.count + 1):
                proc, peer = owner.procs.get(i), owner.peers.get(i)
                rows.append({
                    "index": i, "role": "worker",
                    "pid": proc.pid if proc is not None and proc.returncode is None else None,
                    "connected": peer is not None,
                    "leases": len([t for t in peer.tasks if t > 0]) if peer else 0,
                    "calls_reported": self.reported.get(i, 0),
                })
        return web.json_response({"workers": rows,
                                  "started": owner.started if owner else 0})

    def _stats(self, index: int, data: Any) -> None:
        merge_stats(self.root[METRICS], data)
        if isinstance(data, dict):
            self.reported[index] = self.reported.get(index, 0) + sum(
                int(c[4]) for c in data.get("calls") or ())

    def reserve(self, kind: str, runner: web.AppRunner, host: str, port: int) -> int:
        """Bind ``host:port`` for the workers without listening (so the kernel sends
        no connection here, and port 0 becomes one port every worker shares); the
        owner's own app for it listens on a Unix socket, for what workers forward."""
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        self._reserved.append(sock)
        self._runners[kind] = runner
        self._ports[kind] = int(sock.getsockname()[1])
        return self._ports[kind]

    async def start(self) -> None:
        """Listen on a Unix socket per shared port, then start the workers."""
        for kind, runner in self._runners.items():
            await web.UnixSite(runner, str(self.dir / f"{kind}.sock")).start()
        ports_arg = ",".join(f"{k}={v}" for k, v in self._ports.items())

        def argv(index: int, fd: int) -> list[str]:
            return [*worker_argv("proxy.workers.main")(index, fd),
                    "--sockets", str(self.dir), "--ports", ports_arg]

        root = self.root
        self.owner = Owner(root[SCHEDULER], self.count, argv, self._stats,
                               lambda name: pulls.ensure(root, name))
        await self.owner.start()

    async def close(self, grace: float) -> None:
        if self.owner is not None:
            await self.owner.close(grace)
        for sock in self._reserved:
            sock.close()
        self._dir.cleanup()
