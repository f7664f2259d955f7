"""Connection limits aiohttp does not have: request-head and request-body read
timeouts, and caps on connections per listener and per client address.

aiohttp closes idle keep-alive connections (``keepalive_timeout``) but will wait
forever for a client that trickles its request line and headers a byte at a time
(slowloris), or that declares a body and never sends it. Each such client holds a
descriptor and, for bodies, a handler task and its buffers.

The rules, per connection:

- **Head**: from the first byte of a request head (or the accept, for the first
  request) until the head is parsed, at most ``header_timeout`` seconds; past it
  the client gets ``408`` and the connection is closed. A connection that sends
  nothing at all after the accept is the keep-alive timer's to close.
- **Body**: from the parsed head until the body's last byte, at most
  ``body_timeout`` seconds; past it the body stream fails with ``BodyTimeout`` (a
  CorralError), so the handler reading it answers 408 in the caller's dialect
  through the error middleware, and the connection is closed after.
- **Caps**: a connection over ``max_connections`` on this listener (at most its
  share of the open-file limit, ``Limits.of``), or over
  ``max_connections_per_client`` from one address, gets ``503`` with
  ``Retry-After`` and is closed before any request is read.

Each refusal and timeout is counted; the 1st, 10th, 100th and every 1,000th of a
kind on a listener also get one WARNING line (never a traceback), so that clients
that need no key cannot flood the log.

Upgraded connections (the LM Studio SDK's websockets) are exempt from the head
timer once upgraded: their frames are not request heads.

This hooks aiohttp's ``RequestHandler`` (a protocol) and ``Server`` (its factory)
through a few private attributes (``_request_count``, ``_messages``,
``_payload_parser``, ``_upgraded``, ``_lingering_time``, ``_current_request``,
``_kwargs``); ``tests/integration/test_listener.py`` and ``test_listener_loops.py``
(under asyncio's loop and uvloop's) exercise every one, so an aiohttp upgrade that
moves them fails there, not in production.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from scheduler.config.root import ServerConfig
from scheduler.errors import CorralError
from scheduler.process import limits as fds

log = logging.getLogger(__name__)


def _answer(status: str, text: str, *headers: str) -> bytes:
    body = text.encode() + b"\n"
    head = [f"HTTP/1.1 {status}", *headers, "Connection: close",
            "Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}"]
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


_REFUSED = _answer("503 Service Unavailable", "too many connections; retry", "Retry-After: 1")
_HEAD_TIMEOUT = _answer("408 Request Timeout", "request headers took too long to send")


class BodyTimeout(CorralError):
    status = 408
    code = "request_timeout"
    type = "invalid_request_error"


@dataclass(frozen=True, slots=True)
class Limits:
    header_timeout: float
    body_timeout: float
    max_connections: int
    max_per_client: int | None

    @classmethod
    def of(cls, sc: ServerConfig, soft_nofile: int | None = None) -> Limits:
        """The configured limits, with ``max_connections`` lowered to this port's share
        of the open-file limit (``fds.port_share``): past it a client gets a clean
        503 instead of the accept failing with EMFILE on every port."""
        soft = fds.nofile()[0] if soft_nofile is None else soft_nofile
        share = fds.port_share(soft, fds.ports_of(sc))
        return cls(sc.header_timeout, sc.body_timeout, min(sc.max_connections, share),
                   sc.max_connections_per_client)


Event = Literal["refused", "head_timeout", "body_timeout"]


def _worth_a_line(n: int) -> bool:
    """The 1st, 10th, 100th and every 1,000th of an event get a log line: an
    unauthenticated client must not be able to flood the log."""
    return n in (1, 10, 100) or n % 1000 == 0


class Counts:
    """Refusals and timeouts on one listener; ``on_event`` feeds the metrics."""

    def __init__(self, on_event: Callable[[str], None] | None = None) -> None:
        self.refused = 0
        self.head_timeouts = 0
        self.body_timeouts = 0
        self._on_event = on_event

    def add(self, event: Event) -> int:
        """Count one event; the number of its kind so far."""
        if event == "refused":
            self.refused += 1
            n = self.refused
        elif event == "head_timeout":
            self.head_timeouts += 1
            n = self.head_timeouts
        else:
            self.body_timeouts += 1
            n = self.body_timeouts
        if self._on_event is not None:
            self._on_event(event)
        return n


class _Handler(RequestHandler):
    __slots__ = ("_body_timer", "_guard", "_head_timer", "_in_body", "_peer")

    def __init__(self, guard: GuardedServer, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._in_body = False
        self._peer: str | None = None

    # -- accept --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else None
        if not self._guard.admit(self, self._peer):
            # Refused before aiohttp sees it: no handler task, no keep-alive timer.
            # uvloop's transports are not asyncio.Transport subclasses (an isinstance
            # assert here reset every refused client under uvloop, with a traceback);
            # both loops' TCP transports can write and close.
            writer = cast(asyncio.WriteTransport, transport)
            writer.write(_REFUSED)
            writer.close()
            return
        super().connection_made(transport)
        self._arm_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guard.forget(self, self._peer)
        self._disarm()
        super().connection_lost(exc)

    # -- reads ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._upgraded or self._payload_parser is not None:
            super().data_received(data)
            return
        # aiohttp's resume_reading() calls data_received(b"") while a handler runs:
        # no bytes, no new head (arming here cut every call longer than
        # header_timeout with a 408).
        if data and not self._in_body and self._head_timer is None:
            self._arm_head()  # these bytes start a request head
        before = self._request_count
        super().data_received(data)
        if self._request_count == before:
            return
        # A head was parsed (maybe several, pipelined): the last one's body counts now.
        self._cancel_head()
        if self._messages:
            _, payload = self._messages[-1]
            if not payload.is_eof():
                self._in_body = True
                self._body_timer = self._loop.call_later(
                    self._guard.limits.body_timeout, self._body_expired, payload)
                payload.on_eof(self._body_done)

    def _arm_head(self) -> None:
        self._head_timer = self._loop.call_later(self._guard.limits.header_timeout,
                                                 self._head_expired)

    def _cancel_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _body_done(self) -> None:
        self._in_body = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _disarm(self) -> None:
        self._cancel_head()
        self._body_done()

    def _head_expired(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        n = self._guard.counts.add("head_timeout")
        if _worth_a_line(n):
            log.warning("request head from %s took over %g s (server.header_timeout): "
                        "408, closed (%d so far on this port)", self._peer,
                        self._guard.limits.header_timeout, n)
        # Not an isinstance check: uvloop's transport is no asyncio.Transport, and
        # skipping the write there sent no 408 at all.
        cast(asyncio.WriteTransport, transport).write(_HEAD_TIMEOUT)
        self.force_close()
        transport.close()

    def _body_expired(self, payload: Any) -> None:
        self._body_timer = None
        self._in_body = False
        n = self._guard.counts.add("body_timeout")
        if _worth_a_line(n):
            log.warning("request body from %s took over %g s (server.body_timeout): 408, "
                        "closed (%d so far on this port)", self._peer,
                        self._guard.limits.body_timeout, n)
        if self._current_request is None:
            # The handler answered without reading the body, and aiohttp is draining
            # it ("lingering close"): that loop logged any other error with a
            # traceback, once per timeout; a TimeoutError just ends it.
            payload.set_exception(TimeoutError())
        else:
            # The handler reading the body gets the error and answers 408 in its
            # dialect. Nothing is drained after that answer (the same traceback).
            self._lingering_time = 0.0
            payload.set_exception(BodyTimeout(
                f"request body took over {self._guard.limits.body_timeout:g} s to send "
                "(server.body_timeout)"))
        # The connection ends once the answer is written.
        self.close()


class GuardedServer:
    """Stands in for aiohttp's ``web.Server`` as the listener's protocol factory,
    making guarded handlers; everything else is the wrapped server's."""

    def __init__(self, server: web.Server, limits: Limits,
                 on_event: Callable[[str], None] | None = None) -> None:
        self._server = server
        self.limits = limits
        self.counts = Counts(on_event)
        self._open: set[_Handler] = set()
        self._per_client: Counter[str] = Counter()

    def __call__(self) -> RequestHandler:
        server = self._server
        return _Handler(self, server, loop=server._loop, **server._kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)

    def admit(self, handler: _Handler, peer: str | None) -> bool:
        cap = self.limits.max_per_client
        if len(self._open) >= self.limits.max_connections or (
            cap is not None and peer is not None and self._per_client[peer] >= cap
        ):
            n = self.counts.add("refused")
            if _worth_a_line(n):
                per_client = len(self._open) < self.limits.max_connections
                log.warning("connection from %s refused with 503: over %s "
                            "(%d refused so far on this port)", peer,
                            f"max_connections_per_client ({cap})" if per_client else
                            f"{self.limits.max_connections} connections", n)
            return False
        self._open.add(handler)
        if peer is not None:
            self._per_client[peer] += 1
        return True

    def forget(self, handler: _Handler, peer: str | None) -> None:
        if handler not in self._open:
            return  # refused at accept
        self._open.discard(handler)
        if peer is not None:
            left = self._per_client[peer] - 1
            if left > 0:
                self._per_client[peer] = left
            else:
                del self._per_client[peer]


class GuardedRunner(web.AppRunner):
    """An AppRunner whose listeners apply ``Limits``."""

    def __init__(self, app: web.Application, limits: Limits,
                 on_event: Callable[[str], None] | None = None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._limits = limits
        self._on_event = on_event
        self.guard: GuardedServer | None = None

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        self.guard = GuardedServer(server, self._limits, self._on_event)
        return self.guard  # type: ignore[return-value]  # quacks like web.Server
