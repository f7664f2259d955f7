"""A worker process of ``[server] workers = N`` (``proxy.workers.owner`` has the design).

Run as ``python -m proxy.workers.main --fd N --index I --sockets DIR --ports main=P,...``;
the owner does that (``scheduler.ipc.owner.Owner``), never a user. The worker reads its
config from the owner's first frame, builds the same apps as the owner with a
``WorkerScheduler`` in place of the scheduler, listens with SO_REUSEPORT on the ports
the owner bound, and runs until SIGTERM or until the owner's socket closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy.app import health, middlewares, port_apps
from proxy.dialects import openai
from proxy.dialects.families.learned import FamilyState
from proxy.edge import guard, tuning
from proxy.edge.body import BodyBudget
from proxy.edge.listener import GuardedRunner, Limits
from proxy.keys import BODY_BUDGET, CONFIG, FAMILIES, SCHEDULER, SESSION
from proxy.metrics import web as metrics_http
from proxy.metrics.registry import METRICS, Metrics, labels
from proxy.ops import admin
from proxy.workers.owner import (
    ACCEPT_ERROR,
    PORT_KINDS,
    STATS_EVERY,
    Events,
    Forwarder,
    take_stats,
)
from scheduler.aio import cancel_and_wait
from scheduler.config.root import CorralConfig
from scheduler.config.secrets import ScrubFilter
from scheduler.ipc import wire as ipc_wire
from scheduler.ipc.worker import WorkerScheduler, connect
from scheduler.process import limits

log = logging.getLogger(__name__)


def _worker_core(cfg: CorralConfig, sched: WorkerScheduler,
                 session: aiohttp.ClientSession, stats: Metrics,
                 forward: Forwarder) -> web.Application:
    app = web.Application(middlewares=[forward.middleware, *middlewares(cfg, "openai", stats)],
                          client_max_size=64 << 20)
    app[CONFIG] = cfg
    app[METRICS] = stats
    app[SCHEDULER] = sched
    app[SESSION] = session
    app[BODY_BUDGET] = BodyBudget(cfg.server.max_body_bytes_in_flight)
    # The families this worker learned an upstream lacks (each process learns once).
    app[FAMILIES] = FamilyState()
    metrics_http.install(app)
    app.on_response_prepare.append(guard.on_response_prepare)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_http.handle_metrics)
    openai.add_routes(app, "main")
    admin.add_routes(app)
    return app


async def run_worker(fd: int, index: int, sockets: Path, ports: Mapping[str, int]) -> None:
    line = await connect(fd)
    first = await line.next()
    if first is None or first.get("op") != "config":
        raise SystemExit(f"worker {index}: the owner sent no config")
    cfg = ipc_wire.config_of(first)
    from proxy.cli import setup_logging

    setup_logging(cfg.server.log_level, cfg.server.log_format)
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    session = aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
    sched = WorkerScheduler(cfg, session, line)
    # As in the owner: no secret of the running config reaches a log line.
    scrubber = ScrubFilter(lambda: sched.config)
    for h in logging.getLogger().handlers:
        h.addFilter(scrubber)
    stats = Metrics()
    stats.set_models(*labels(cfg))
    reader = asyncio.create_task(
        sched.run(lambda c: stats.set_models(*labels(c))), name="corral-ipc")
    forwarders = [Forwarder(str(sockets / "main.sock"))]
    core = _worker_core(cfg, sched, session, stats, forwarders[0])
    sites: list[tuple[web.Application, str]] = [(core, "main")]
    for label, _port, papp in port_apps(core):
        kind = PORT_KINDS.get(label)
        if kind is None:
            continue  # the SDK discovery port stays the owner's alone
        forwarders.append(Forwarder(str(sockets / f"{kind}.sock")))
        papp.middlewares.insert(0, forwarders[-1].middleware)
        sites.append((papp, kind))
    runners: list[web.AppRunner] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # Ctrl-C reaches the whole process group: the owner decides and SIGTERMs us.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    # Listener events and refused accepts go to the owner's /metrics with the calls.
    events: Events = Counter()
    refused = limits.AcceptErrors(lambda: events.update([("", ACCEPT_ERROR)]))
    loop.set_exception_handler(refused)
    fd_watch = asyncio.create_task(refused.watch(), name="corral-fd-watch")
    pusher = asyncio.create_task(_push_stats(sched, stats, events), name="corral-stats")
    try:
        for papp, kind in sites:
            # The workers accept every client connection: the listener limits are theirs
            # (proxy/edge/listener.py).
            r = GuardedRunner(papp, Limits.of(cfg.server),
                              _counter(events, str(ports[kind])), handler_cancellation=True,
                              shutdown_timeout=cfg.scheduler.drain_timeout, access_log=None,
                              keepalive_timeout=cfg.server.keepalive_timeout)
            await r.setup()
            runners.append(r)
            await tuning.tcp_site(r, cfg, ports[kind], reuse_port=True).start()
        tuning.tune_gc(cfg)
        log.info("worker %d (pid %d) relaying on %s", index, os.getpid(),
                 ", ".join(f"{k}:{ports[k]}" for _, k in sites))
        lost = asyncio.create_task(sched.lost.wait())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([lost, stopped], return_when=asyncio.FIRST_COMPLETED)
        lost.cancel()
        stopped.cancel()
    finally:
        for done in reversed(runners):
            await done.cleanup()
        for task in (pusher, fd_watch):
            await cancel_and_wait(task)
        data = take_stats(stats, events)
        if data is not None:
            sched.send_stats(data)
        with contextlib.suppress(Exception):
            await line.writer.drain()
        await sched.close()
        await cancel_and_wait(reader)
        for f in forwarders:
            await f.close()
        await session.close()


def _counter(events: Events, port: str) -> Callable[[str], None]:
    def count(event: str) -> None:
        events[(port, event)] += 1

    return count


async def _push_stats(sched: WorkerScheduler, stats: Metrics, events: Events) -> None:
    while True:
        await asyncio.sleep(STATS_EVERY)
        data = take_stats(stats, events)
        if data is not None:
            sched.send_stats(data)


def _ports(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (p.split("=", 1) for p in text.split(",") if p)}


def main(argv: Iterable[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="corral-worker")
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--sockets", type=Path, required=True)
    p.add_argument("--ports", type=_ports, required=True)
    args = p.parse_args(list(argv) if argv is not None else None)
    try:
        import uvloop
    except ImportError:
        asyncio.run(run_worker(args.fd, args.index, args.sockets, args.ports))
    else:
        uvloop.run(run_worker(args.fd, args.index, args.sockets, args.ports))



if __name__ == "__main__":
    main()
