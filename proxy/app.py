"""Builds the apps and runs them.

One scheduler and one upstream client session are shared by every port. They live
in the OpenAI app's cleanup_ctx: created before any port accepts a call, torn down
(every instance drained and stopped) after every port has stopped. The other ports'
apps are plain views onto the same objects.

Lifecycle of ``serve``: startup (root app, then the other ports), main loop (wait for
a signal), shutdown (stop accepting, let running calls finish within the grace
period, then drain the scheduler). A second signal stops waiting for calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware

from proxy.calls.capture import Captures
from proxy.calls.tracking import InFlight
from proxy.dialects import lmstudio, lmstudio_sdk, ollama, openai, xinference
from proxy.dialects.families.learned import FamilyState
from proxy.edge import guard, reqlog, tuning
from proxy.edge.body import BodyBudget
from proxy.edge.errors import Dialect
from proxy.edge.listener import GuardedRunner, Limits
from proxy.keys import (
    BODY_BUDGET,
    CALLS,
    CONFIG,
    DISCOVERY,
    FAMILIES,
    MCP_APPROVALS,
    MCP_SERVERS,
    PULL_LOCKS,
    SCHEDULER,
    SESSION,
)
from proxy.metrics import web as metrics_http
from proxy.metrics.registry import METRICS, Metrics
from proxy.metrics.web import request_middleware
from proxy.ops import admin, capture_view, cluster, lifecycle, passthrough, pulls
from proxy.ops.mount import add_dashboard_routes
from proxy.ops.reload import RELOADER, reload_ctx
from proxy.tools import server as mcp_server
from proxy.tools.calls import Approvals
from proxy.tools.servers import Servers
from proxy.workers import owner as workers
from scheduler.aio import cancel_and_wait
from scheduler.config.root import CorralConfig
from scheduler.config.secrets import ScrubFilter
from scheduler.ipc.owner import resolve_workers
from scheduler.process import limits
from scheduler.scheduling.scheduler import BinaryFinder, Scheduler, default_finder

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

Port = Literal["main", "ollama", "lmstudio", "lmstudio_sdk"]
PortKind = Literal["ollama", "lmstudio", "lmstudio_sdk"]

_route = guard.OpenRoute
_PROBES = (_route("GET", "/health"),)
_SDK = (_route("GET", "/lmstudio-greeting"),
        *(_route("GET", f"/{ns}", websocket=True) for ns in lmstudio_sdk.NAMESPACES))

# What each port serves without an API key; everything else (other methods, OPTIONS,
# a websocket namespace fetched as plain HTTP, any other port) needs one. Keep it
# short and keep docs/security.md ("Open routes") and tests/unit/test_open_routes.py,
# which enumerates every mounted route, in step with it. Why each is open: liveness
# probes work without secrets; "/" and "/dashboard" only redirect and the dashboard's
# static files hold no data (the page asks for the key and sends it with every admin
# call); Ollama's "/" is its "Ollama is running" probe; the LM Studio SDKs never send
# Authorization: their key is checked in the websocket's auth packet
# (proxy/dialects/lmstudio_sdk/socket.py), and they find the server by its greeting.
OPEN_ROUTES: dict[Port, frozenset[guard.OpenRoute]] = {
    # /v1/cluster/auth: xinference-client asks it, keyless, whether to send its key.
    "main": frozenset({*_PROBES, _route("GET", "/"), _route("GET", "/dashboard"),
                       _route("GET", "/v1/cluster/auth"),
                       *(_route("GET", p) for p in admin.DASHBOARD_PATHS)}),
    "ollama": frozenset({*_PROBES, _route("GET", "/")}),
    "lmstudio": frozenset({*_PROBES, *_SDK}),
    "lmstudio_sdk": frozenset({*_PROBES, *_SDK}),
}
_PORT_OF: dict[Dialect, Port] = {"openai": "main", "anthropic": "main", "ollama": "ollama",
                                  "lmstudio": "lmstudio"}


def middlewares(
    cfg: CorralConfig, dialect: Dialect, stats: Metrics | None = None,
    port: Port | None = None,
) -> list[Middleware]:
    """A port's middlewares; ``port`` (default: the dialect's own port) picks the routes
    open without a key (``OPEN_ROUTES``)."""
    # Host, Origin, errors and keys in one (proxy/edge/guard.py).
    mws = [guard.edge_middleware(cfg.server, dialect, OPEN_ROUTES[port or _PORT_OF[dialect]])]
    if stats is not None:
        # Outermost: sees the final status, auth failures and rendered errors included.
        mws.insert(0, request_middleware(stats, dialect))
    return mws


async def health(request: web.Request) -> web.Response:
    scheduler = request.app[SCHEDULER]
    return web.json_response(
        {"status": "ok", "models": len(scheduler.config.models),
         "instances": len(scheduler.instances())}
    )


@dataclass
class CoreOptions:
    """What tests change about the core: where llama-server comes from, how often
    the reaper looks for idle instances."""

    find_binary: BinaryFinder = default_finder
    reap_interval: float = 0.5


def _core_ctx(
    cfg: CorralConfig, opts: CoreOptions, events: Metrics
) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        # No total timeout: a generation may legitimately stream for many minutes.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
        session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            middlewares=cluster.client_middlewares(app) if cfg.cluster.role == "front" else (),
        )
        scheduler = Scheduler(
            cfg, session, find_binary=opts.find_binary, reap_interval=opts.reap_interval,
            events=events,
        )
        app[SESSION] = session
        app[SCHEDULER] = scheduler
        # The configured MCP servers follow the live config (a reload stops changed ones).
        servers = app[MCP_SERVERS] = Servers(lambda: scheduler.config, session,
                                             events.tool_called)
        app[MCP_APPROVALS] = Approvals()
        await scheduler.start()
        servers.start_reaper()
        try:
            yield
        finally:
            await servers.close()
            await scheduler.close()
            await session.close()

    return ctx


async def _captures_ctx(app: web.Application) -> AsyncIterator[None]:
    """The captures' disk writer, when [server.capture] dir is set."""
    store = app[CALLS].captures
    if store is not None:
        await store.start(capture_view.render)
    yield
    if store is not None:
        await store.close()


def build_openai_app(
    cfg: CorralConfig, opts: CoreOptions | None = None, *, config_path: Path | None = None
) -> web.Application:
    """The main port's app; it owns the scheduler, the upstream session, the metrics
    and the config reloader (``config_path``: the file to watch and reload)."""
    stats = Metrics()
    app = web.Application(middlewares=middlewares(cfg, "openai", stats),
                          client_max_size=64 << 20)
    app[CONFIG] = cfg
    app[METRICS] = stats
    app[BODY_BUDGET] = BodyBudget(cfg.server.max_body_bytes_in_flight)
    app[FAMILIES] = FamilyState()
    capture = cfg.server.capture
    app[CALLS] = InFlight(Captures(capture) if capture.enabled else None)
    metrics_http.install(app)
    app.on_response_prepare.append(guard.on_response_prepare)
    # In start order; torn down in reverse, so the scheduler stops last.
    app.cleanup_ctx.append(_core_ctx(cfg, opts or CoreOptions(), stats))
    app.cleanup_ctx.append(metrics_http.metrics_ctx(stats))
    app.cleanup_ctx.append(reload_ctx(config_path, stats))
    app.cleanup_ctx.append(pulls.discovery_ctx)
    app.cleanup_ctx.append(_captures_ctx)
    app.cleanup_ctx.append(lifecycle.lifecycle_ctx(config_path))
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_http.handle_metrics)
    # Xinference's lifecycle routes first: OpenAI's GET /v1/models/{model:.+} would take them.
    xinference.add_routes(app)
    openai.add_routes(app, "main")
    admin.add_routes(app)
    passthrough.add_routes(app)
    mcp_server.add_routes(app)
    cluster.setup(app, cfg)
    add_dashboard_routes(app, cfg)
    return app


def build_port_app(
    core: web.Application, dialect: Dialect, port: Port | None = None
) -> web.Application:
    """An app for another port, sharing the core's scheduler and session.

    Call after the core app has started (its cleanup_ctx made those objects).
    """
    cfg = core[CONFIG]
    stats = core.get(METRICS)
    app = web.Application(middlewares=middlewares(cfg, dialect, stats, port),
                          client_max_size=64 << 20)
    if stats is not None:
        metrics_http.install(app)
    app.on_response_prepare.append(guard.on_response_prepare)
    app[CONFIG] = cfg
    app[SCHEDULER] = core[SCHEDULER]
    app[SESSION] = core[SESSION]
    app[BODY_BUDGET] = core[BODY_BUDGET]
    app[FAMILIES] = core[FAMILIES]
    # Absent in tests that build the core app by hand, and in a worker process (its
    # calls are not tracked: cancel and captures are the owner's, docs/admin-api.md).
    if CALLS in core:
        app[CALLS] = core[CALLS]
    if MCP_SERVERS in core:
        app[MCP_SERVERS] = core[MCP_SERVERS]
        app[MCP_APPROVALS] = core[MCP_APPROVALS]
    if DISCOVERY in core:
        app[DISCOVERY] = core[DISCOVERY]
    if PULL_LOCKS in core:
        app[PULL_LOCKS] = core[PULL_LOCKS]
    # Every port answers its own liveness probe.
    app.router.add_get("/health", health)
    return app


def port_apps(core: web.Application) -> list[tuple[str, int, web.Application]]:
    """The enabled extra ports: (label, port, app)."""
    server = core[CONFIG].server
    out = []
    if server.ollama_enabled:
        out.append(("Ollama API", server.ollama_port, port_app(core, "ollama")))
    if server.lmstudio_enabled:
        out.append(("LM Studio API", server.lmstudio_port, port_app(core, "lmstudio")))
    if server.lmstudio_sdk_port is not None:
        # The SDKs' zero-configuration scan finds this port (41343); a real LM Studio
        # on the same host holds it too.
        out.append(("LM Studio SDK (server.lmstudio_sdk_port)", server.lmstudio_sdk_port,
                    port_app(core, "lmstudio_sdk")))
    return out


def port_app(core: web.Application, kind: PortKind) -> web.Application:
    """The Ollama, LM Studio or LM Studio SDK listener's app, its routes mounted."""
    app = build_port_app(core, "ollama" if kind == "ollama" else "lmstudio", kind)
    {"ollama": ollama.setup, "lmstudio": lmstudio.setup, "lmstudio_sdk": lmstudio.setup_sdk}[
        kind](app)
    return app


async def serve(
    cfg: CorralConfig, opts: CoreOptions | None = None, config_path: Path | None = None
) -> None:
    """Run until SIGINT/SIGTERM; drain and return. SIGHUP reloads ``config_path``."""
    loop = asyncio.get_running_loop()
    log.info("open-file limit: %d", limits.raise_nofile())
    reqlog.quiet_protocol_errors()
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        stop.set()
        if signals > 1:
            # Forced exit: every child has PR_SET_PDEATHSIG, so the kernel kills them.
            log.warning("second signal: exiting now")
            os._exit(130)

    sc = cfg.scheduler
    host = cfg.server.host

    def runner(app: web.Application, port: str) -> web.AppRunner:
        # An idle keep-alive connection is closed after keepalive_timeout (aiohttp's
        # default, 3,630 s, let idle clients hold descriptors for an hour).
        # GuardedRunner adds head/body read timeouts and connection caps (listener.py).
        events = root[METRICS].listener_events
        return GuardedRunner(app, Limits.of(cfg.server),
                             lambda event: events.labels(port, event).inc(),
                             handler_cancellation=True,
                             shutdown_timeout=sc.drain_timeout, access_log=None,
                             keepalive_timeout=cfg.server.keepalive_timeout)

    root = build_openai_app(cfg, opts, config_path=config_path)
    # No secret of the running config reaches a log line (scheduler/config/secrets.py).
    scrubber = ScrubFilter(lambda: sched.config if (sched := root.get(SCHEDULER)) else cfg)
    handlers = list(logging.getLogger().handlers)
    for h in handlers:
        h.addFilter(scrubber)
    refused = limits.AcceptErrors(root[METRICS].accept_errors.inc)
    loop.set_exception_handler(refused)
    fd_watch = asyncio.create_task(refused.watch(), name="corral-fd-watch")
    # workers > 1: worker processes listen on the ports (proxy/workers/owner.py).
    count = resolve_workers(cfg.server.workers)
    if count > 1 and cfg.cluster.role != "none":
        # A front's node token and a node's drain live in this process; workers do not
        # carry them yet.
        log.warning("[server] workers = %s is not supported with [cluster] role = %r yet: "
                    "running one process", cfg.server.workers, cfg.cluster.role)
        count = 1
    side = workers.OwnerSide(root, count) if count > 1 else None
    main = runner(root, str(cfg.server.port))
    await main.setup()  # starts the scheduler (cleanup_ctx)
    runners = [main]

    async def listen(r: web.AppRunner, port: int, kind: str | None) -> int:
        if side is not None and kind is not None:
            return side.reserve(kind, r, host, port)
        await tuning.tcp_site(r, cfg, port).start()
        return _bound_port(r)

    try:
        bound = await listen(main, cfg.server.port, "main")
        log.info("OpenAI API on http://%s:%d", host, bound)
        for label, port, app in port_apps(root):
            r = runner(app, str(port))
            await r.setup()
            runners.append(r)
            try:
                bound = await listen(r, port, workers.PORT_KINDS.get(label))
            except OSError as e:
                raise OSError(e.errno, f"cannot listen on {host}:{port} for the {label}: "
                                       f"{e.strerror}") from None
            log.info("%s on http://%s:%d", label, host, bound)
        if side is not None:
            await side.start()
            log.info("%d worker processes serve the ports", count)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        loop.add_signal_handler(signal.SIGHUP, root[RELOADER].request, "SIGHUP")
        # Everything built so far lives as long as the process (proxy.edge.tuning).
        frozen = tuning.tune_gc(cfg)
        log.debug("gc: %d long-lived objects frozen, young threshold %d", frozen,
                  gc.get_threshold()[0])
        await stop.wait()
        await cluster.drain(root, sc.drain_timeout)
        log.info("shutting down: draining running calls (up to %g s)", sc.drain_timeout)
    finally:
        try:
            if side is not None:
                # Workers first: their calls hold leases on the owner's instances.
                await side.close(sc.drain_timeout)
            # Extra ports first; the core (and with it every instance) last. The
            # handlers stay installed meanwhile: a second signal forces the exit.
            for r in reversed(runners):
                await r.cleanup()
        finally:
            await cancel_and_wait(fd_watch)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            for h in handlers:
                h.removeFilter(scrubber)


def _bound_port(runner: web.AppRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            return int(addr[1])
    return 0
