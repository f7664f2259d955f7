"""The configured MCP servers' lifecycle: started on first use, stopped when idle.

One ``Servers`` per process, owned by the main app's cleanup_ctx. A server is started
(and initialized, and its tools listed) by the first call that names it, under a lock
so that concurrent calls share one start; it is stopped after ``idle_stop`` seconds
unused, when its config entry changes or goes (a reload), when it dies (the next use
starts it again), and when Corral stops. Tools are listed once per start: a server
whose tools change is seen anew after its next idle stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from proxy.tools.client import Http, McpError, Session, Stdio, Tool, Transport
from scheduler.aio import cancel_and_wait
from scheduler.config.root import CorralConfig
from scheduler.config.tools import McpServerConfig

log = logging.getLogger(__name__)

REAP_EVERY = 5.0


@dataclass(slots=True)
class Running:
    cfg: McpServerConfig
    session: Session
    tools: list[Tool]
    used: float = field(default_factory=time.monotonic)
    # Calls in flight: a server is never stopped under one.
    busy: int = 0

    @property
    def offered(self) -> list[Tool]:
        """The tools its config lets models see."""
        allowed = self.cfg.allowed_tools
        return self.tools if allowed is None else [t for t in self.tools if t.name in allowed]


class Servers:
    def __init__(self, config: Callable[[], CorralConfig], session: aiohttp.ClientSession,
                 on_call: Callable[[str, str, str, float], None] | None = None) -> None:
        self._config = config
        self._http = session
        # (server, tool, outcome, seconds) per tool call: the metrics.
        self.on_call = on_call
        self._running: dict[str, Running] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._reaper: asyncio.Task[None] | None = None

    def configured(self, name: str) -> McpServerConfig | None:
        return next((s for s in self._config().mcp_servers if s.name == name), None)

    def names(self) -> list[str]:
        return [s.name for s in self._config().mcp_servers]

    def running(self) -> list[str]:
        return sorted(self._running)

    def start_reaper(self) -> None:
        self._reaper = asyncio.ensure_future(self._reap())

    async def get(self, name: str) -> Running:
        """The running server ``name`` (configured: the caller checked), started if need be."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            cfg = self.configured(name)
            if cfg is None:
                raise McpError(f"no MCP server named {name!r} is configured")
            run = self._running.get(name)
            if run is not None and (run.cfg != cfg or not run.session.transport.alive):
                await self._stop(name)
                run = None
            if run is None:
                run = await self._start(cfg)
                self._running[name] = run
            run.used = time.monotonic()
            return run

    async def _start(self, cfg: McpServerConfig) -> Running:
        transport: Transport
        if cfg.command is not None:
            stdio = Stdio(cfg.name, cfg.command, cfg.env)
            await stdio.start()
            transport = stdio
        else:
            assert cfg.url is not None
            headers = dict(cfg.headers)
            if cfg.api_key_env:
                key = os.environ.get(cfg.api_key_env)
                if not key:
                    raise McpError(f"the environment variable {cfg.api_key_env} is not set")
                headers["Authorization"] = f"Bearer {key}"
            transport = Http(self._http, cfg.url, headers)
        session = Session(transport)
        try:
            await session.initialize(cfg.start_timeout)
            tools = await session.tools(cfg.start_timeout)
        except BaseException:
            await transport.close()
            raise
        log.info("mcp server %s started: %d tools", cfg.name, len(tools))
        return Running(cfg, session, tools)

    async def _stop(self, name: str) -> None:
        run = self._running.pop(name, None)
        if run is not None:
            await run.session.transport.close()
            log.info("mcp server %s stopped", name)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(REAP_EVERY)
            now = time.monotonic()
            for name, run in list(self._running.items()):
                gone = self.configured(name) != run.cfg
                if run.busy == 0 and (gone or now - run.used > run.cfg.idle_stop):
                    lock = self._locks.setdefault(name, asyncio.Lock())
                    async with lock:
                        if self._running.get(name) is run and run.busy == 0:
                            await self._stop(name)

    async def close(self) -> None:
        if self._reaper is not None:
            await cancel_and_wait(self._reaper)
        for name in list(self._running):
            with contextlib.suppress(McpError, OSError):
                await self._stop(name)
