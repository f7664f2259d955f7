"""Request ids: one per call, on every log line about it, returned in ``X-Request-Id``.

The request middleware (``proxy.metrics.web``) opens a ``RequestInfo`` for each call and
puts it in a context variable. Everything that runs in the handler's task sees it,
so a logging filter can stamp the id on every record logged while the call is
handled, whichever module logs. Tasks inherit the context they were created in: a
launch started by a call logs with that call's id, which is what an operator
following one slow request wants to see.

A client may send its own ``X-Request-Id`` (a tracing proxy in front of Corral);
it is kept when it is short printable ASCII, so it cannot smuggle anything into a
log line or a header.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from contextvars import ContextVar

from aiohttp.http_exceptions import HttpProcessingError

HEADER = "X-Request-Id"
# Long enough for a UUID or a W3C trace id with a span; short enough for a log line.
_MAX_CLIENT_ID = 128


class RequestInfo:
    """What Corral learns about one call while it runs. Mutable on purpose: the
    handler fills in ``model`` once the scheduler has resolved it."""

    __slots__ = ("ended", "first_byte", "id", "model", "start", "status")

    def __init__(self, request_id: str, start: float) -> None:
        self.id = request_id
        # perf_counter() at arrival and at the first body byte of a streamed answer.
        self.start = start
        self.first_byte = 0.0
        # The configured name of the model that served the call ("" until known).
        self.model = ""
        # A streamed answer's status once its headers are out, and whether its end
        # (the dialect's last event) was written: a client that hangs up after that,
        # as many do on reading the end, got the whole answer and is not counted 499.
        self.status = 0
        self.ended = False


CURRENT: ContextVar[RequestInfo | None] = ContextVar("corral_request", default=None)


def current() -> RequestInfo | None:
    return CURRENT.get()


def mark_ended() -> None:
    """The current call's answer has been written to its end (see RequestInfo.ended)."""
    info = CURRENT.get()
    if info is not None:
        info.ended = True


def note_model(name: str) -> None:
    """Record which configured model serves the current call (for its labels).

    Dialect handlers call this with ``Upstream.model`` once a lease is granted, when
    their response does not carry ``X-Corral-Model``.
    """
    info = CURRENT.get()
    if info is not None:
        info.model = name


class RequestIds:
    """Mints ids: a random prefix per process and a counter. Unique across restarts
    without paying for a UUID (a urandom call) on every request."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(4)
        self._count = itertools.count(1)

    def new(self) -> str:
        return f"{self._prefix}-{next(self._count):x}"

    def accept(self, given: str | None) -> str:
        """The client's id if it is safe to log and echo, else a new one."""
        if given and len(given) <= _MAX_CLIENT_ID and given.isascii() and given.isprintable():
            return given
        return self.new()


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (or None) and ``request_tag`` (" [id]" or "") to records.

    Attach it to the handler, not a logger: a logger's filters do not see records
    that propagate up from child loggers.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        info = CURRENT.get()
        record.request_id = info.id if info is not None else None
        record.request_tag = f" [{info.id}]" if info is not None else ""
        return True


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s%(request_tag)s: %(message)s"


class ProtocolErrorFilter(logging.Filter):
    """aiohttp logs every malformed request (bad request line, header, chunk) at ERROR
    with a traceback: a client's mistake, and a way to flood the log. Such records
    become one WARNING line each, without the traceback (aiohttp closes the connection
    after one, so this is once per connection). Attach to the ``aiohttp.server``
    logger, where aiohttp logs them."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "malformed request refused: %s", (
                str(exc).replace("\n", " ")[:300],)
            record.exc_info = record.exc_text = None
        return True


def quiet_protocol_errors() -> None:
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ProtocolErrorFilter) for f in logger.filters):
        logger.addFilter(ProtocolErrorFilter())
