"""Open-file limits: every client connection, upstream connection and child pipe is a
descriptor, and systemd's default soft limit (1,024) is reached by a thousand idle
clients, after which every accept fails with EMFILE and every port goes dark.

``raise_nofile()`` lifts the soft limit to the hard one at start; ``shortfall()`` is the
warning ``corral serve`` logs when even that cannot hold ``max_connections`` on every
port plus the children, and ``port_share()`` the cap each listener then applies, so
that a flood of clients is refused with 503 on one port while accepts still succeed
(at the limit itself every accept on every port fails). Running out is then
reported, counted and logged at most once per ``every`` seconds, by whichever way the
event loop allows: asyncio's loop reports each failed accept to its exception handler
(``AcceptErrors``); uvloop's libuv instead accepts and closes the excess connections
itself and reports nothing, so ``watch()`` samples the process's open descriptors
and treats reaching the limit as refused accepts.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scheduler.config.sections import ServerConfig

log = logging.getLogger(__name__)

_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)


def nofile() -> tuple[int, int]:
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the soft limit now in force."""
    soft, hard = nofile()
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-file limit from %d to %d: %s",
                        soft, target, e)
    return soft


def needed(max_instances: int, max_connections: int, ports: int) -> int:
    """A rough need: client connections on every port, plus per instance its pipes,
    pooled upstream connections and health probes, plus Corral's own files."""
    return max_connections * ports + 64 * max_instances + 64


# Descriptors kept out of the client share: Corral's own files, listeners, log, the
# scheduler's sockets.
_FIXED = 128


def ports_of(sc: ServerConfig) -> int:
    """The ports one process listens on (the main one always)."""
    return (1 + sc.ollama_enabled + sc.lmstudio_enabled
            + (sc.lmstudio_sdk_port is not None))


def port_share(soft: int, ports: int) -> int:
    """The most client connections one port may hold under a soft limit of ``soft``.

    Half of what is left after the fixed reserve goes to clients: every client call
    may hold an upstream connection too, and children's pipes come out of the other
    half. At least 1, so that a port still answers (with 503s) under any limit."""
    return max(1, (soft - _FIXED) // 2 // max(1, ports))


def shortfall(soft: int, max_instances: int, max_connections: int, ports: int) -> str | None:
    """A warning when the open-file limit cannot hold every port's ``max_connections``
    plus the children; None when it can."""
    need = needed(max_instances, max_connections, ports)
    share = port_share(soft, ports)
    if soft >= need and share >= max_connections:
        return None
    return (f"the open-file limit ({soft}) cannot hold max_connections ({max_connections}) "
            f"× {ports} port(s) plus {max_instances} instance(s) (about {need} needed): "
            f"each port refuses connections past {min(share, max_connections)} with 503; "
            "raise LimitNOFILE (systemd) or ulimit -n")


SOMAXCONN = "/proc/sys/net/core/somaxconn"


def somaxconn() -> int | None:
    """The kernel's cap on any listen backlog; None where it cannot be read."""
    try:
        with open(SOMAXCONN) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def backlog(configured: int, cap: int | None) -> int:
    """The backlog to ask for: the kernel silently truncates a larger one to
    somaxconn, so asking for more only hides what is really in force."""
    return configured if cap is None or cap <= 0 else min(configured, cap)


def out_of_fds(context: dict[str, Any]) -> bool:
    exc = context.get("exception")
    return isinstance(exc, OSError) and exc.errno in _OUT_OF_FDS


def open_fds() -> int:
    """Descriptors open in this process (reading the count takes one more)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError as e:
        # Not even one descriptor left to look: that is the answer.
        return nofile()[0] if e.errno in _OUT_OF_FDS else 0


class AcceptErrors:
    """``loop.set_exception_handler(AcceptErrors(...))``; ``watch()`` for uvloop."""

    def __init__(self, count: Callable[[], None] | None = None, every: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total = 0
        self._count = count
        self._every = every
        self._clock = clock
        self._last = float("-inf")
        self._since = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not out_of_fds(context):
            loop.default_exception_handler(context)
            return
        self.refused()

    async def watch(self, interval: float = 0.5, margin: int = 4) -> None:
        """Sample the open descriptors; at the limit, accepts are being refused."""
        while True:
            await asyncio.sleep(interval)
            if open_fds() >= nofile()[0] - margin:
                self.refused()

    def refused(self) -> None:
        self.total += 1
        self._since += 1
        if self._count is not None:
            self._count()
        now = self._clock()
        if now - self._last >= self._every:
            soft, _ = nofile()
            log.error("cannot accept connections: out of file descriptors (limit %d); "
                      "%d failed accept(s) since the last report", soft, self._since)
            self._last = now
            self._since = 0
