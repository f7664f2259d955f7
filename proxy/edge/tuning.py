"""Process-level tuning of the HTTP side: the garbage collector and the listen backlog.

**GC freeze.** After start-up Corral holds ~70,000 long-lived container objects (the
apps, routers, pydantic models, the scheduler, imported modules). CPython's full
(generation-2) collection walks all of them: measured 60–95 ms per pass, 5–6 passes
per 8 s at 32 connections, and every connection stalls meanwhile (p99 1.6–2× the bare
proxy's). ``gc.freeze()`` moves every object alive at that moment into a permanent
generation the collector never visits, so a pass walks only what calls allocate.
Freezing again after a reload takes in the new config's objects. The cost: a cycle
among objects frozen while alive is never reclaimed once it becomes garbage; the
objects frozen are long-lived by choice (what a reload replaces is small).

**GC threshold.** Python starts a young collection every 700 net container
allocations. A call's objects live as long as the call, so under load every pass
finds hundreds of them alive, promotes them, and the older generations fill and are
walked in turn: 2,196 passes and 273 ms of pauses in 5 s of non-streaming calls at 32
connections (5% of Corral's CPU), 222 passes and 53 ms in one 1,000-stream burst of
~290 ms. ``[server] gc_threshold`` (default 50,000) makes a pass rare: none in the
same 5 s, 2 (24 ms) in the burst. Objects freed by reference counting, nearly all of
them, never wait for a pass; only garbage cycles do, at most 50,000 objects' worth.

**Backlog.** aiohttp listens with a backlog of 128: a burst of a thousand new streams
overflowed it (``TcpExtListenOverflows``), and each dropped SYN cost its client a 1 s
retransmission. ``[server] backlog`` (default 4,096) is asked for on every listener,
capped by ``net.core.somaxconn`` (the kernel would truncate it silently).
"""

from __future__ import annotations

import gc
import logging

from aiohttp import web

from scheduler.config.root import CorralConfig
from scheduler.process import limits

log = logging.getLogger(__name__)


def freeze_long_lived() -> int:
    """Collect what is garbage now, then freeze the survivors; the frozen count."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def tune_gc(cfg: CorralConfig) -> int:
    """The collector as ``[server]`` says, once the apps are built and after a reload:
    long-lived objects frozen, the young threshold raised. The frozen count (0: none)."""
    frozen = freeze_long_lived() if cfg.server.gc_freeze else 0
    if cfg.server.gc_threshold:
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(cfg.server.gc_threshold, older, oldest)
    return frozen


def listen_backlog(cfg: CorralConfig) -> int:
    return limits.backlog(cfg.server.backlog, limits.somaxconn())


def tcp_site(
    runner: web.BaseRunner, cfg: CorralConfig, port: int, *, reuse_port: bool | None = None
) -> web.TCPSite:
    """A listener of ``runner`` on the configured host with the configured backlog."""
    return web.TCPSite(runner, cfg.server.host, port, reuse_address=True,
                       reuse_port=reuse_port, backlog=listen_backlog(cfg))
