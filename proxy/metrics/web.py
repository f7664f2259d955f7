"""The aiohttp side of the metrics: the request middleware and response hook every
port installs, the ``/metrics`` handler, and the poller that reads the instances'
llama-server counters between scrapes. The numbers themselves live in
``proxy.metrics.registry``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from proxy.edge.reqlog import CURRENT, HEADER, RequestInfo
from proxy.metrics.registry import METRICS, Metrics
from scheduler.aio import cancel_and_wait

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The text format Prometheus 2.x parses; prometheus_client's own CONTENT_TYPE_LATEST
# moved to version 1.0.0, which older scrapers do not announce they accept.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

REQUEST_INFO = web.RequestKey("corral_request", RequestInfo)


# -- the request middleware ---------------------------------------------------------


def request_middleware(metrics: Metrics, dialect: str) -> Middleware:
    """Outermost middleware: request id, call metrics, the recent-requests ring.

    Sees the final status (after error rendering and auth). Keep it cheap: it runs
    on every call of every port, and the main port's budget is a few µs per call.
    """
    ids = metrics.ids
    record = metrics.record
    clock = time.perf_counter

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = clock()
        info = RequestInfo(ids.accept(request.headers.get(HEADER)), start)
        request[REQUEST_INFO] = info
        token = CURRENT.set(info)
        status = 500
        resp: web.StreamResponse | None = None
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as e:
            status = e.status
            raise
        except asyncio.CancelledError:
            # The client went away (nginx's code for it), unless it had the whole answer.
            status = info.status if info.ended and info.status else 499
            raise
        except ConnectionResetError:
            # The same, noticed by a write: aiohttp would log it with a traceback at
            # ERROR; an answer to a closed connection it drops quietly.
            status = info.status if info.ended and info.status else 499
            return web.Response(status=499)
        finally:
            CURRENT.reset(token)
            record(request, info, dialect, status, clock() - start, resp)

    return middleware


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Stamp the request id on every response just before its headers go out, and
    time the first body byte of streamed ones.

    Done here rather than in the middleware because a stream is sent from inside the
    handler, and a middleware placed outside ours may answer with a response of its
    own: both are prepared where only this hook sees them.
    """
    info = request.get(REQUEST_INFO)
    if info is None:
        return
    response.headers[HEADER] = info.id
    info.status = response.status
    if type(response) is web.StreamResponse:
        _time_first_write(response, info)


def _time_first_write(response: web.StreamResponse, info: RequestInfo) -> None:
    # Wrappers on this one response, removed by the first call of either: the later
    # chunks of a stream go straight to aiohttp and cost nothing extra. A stream whose
    # whole answer came in one read goes out with its end (write_eof with data).
    write, write_eof = response.write, response.write_eof

    def unwrap() -> None:
        del response.write
        del response.write_eof

    async def first_write(data: bytes | bytearray | memoryview) -> None:
        info.first_byte = time.perf_counter()
        unwrap()
        await write(data)

    async def first_eof(data: bytes = b"") -> None:
        if data:
            info.first_byte = time.perf_counter()
        unwrap()
        await write_eof(data)

    response.write = first_write  # type: ignore[method-assign]
    response.write_eof = first_eof  # type: ignore[method-assign]


def install(app: web.Application) -> None:
    """Per-app wiring the middleware cannot do alone (every port's app calls it)."""
    app.on_response_prepare.append(on_response_prepare)


async def handle_metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    await metrics.refresh()
    return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})


def metrics_ctx(
    metrics: Metrics, poll_interval: float = 2.0
) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    """Binds the metrics to the core's scheduler and runs the upstream poller.

    Goes after the core's cleanup_ctx (it needs the scheduler) and so stops first.
    """

    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        from proxy.keys import SCHEDULER, SESSION

        metrics.bind(app[SCHEDULER], app[SESSION])
        poller = asyncio.create_task(_poll_upstreams(metrics, poll_interval),
                                     name="corral-metrics-poller")
        try:
            yield
        finally:
            await cancel_and_wait(poller)

    return ctx


async def _poll_upstreams(metrics: Metrics, interval: float) -> None:
    # Token totals come from llama-server's counters, which die with the process:
    # reading the instances that served calls since the last read keeps what an
    # instance counted before it is stopped, even when nobody scrapes for a while.
    while True:
        await asyncio.sleep(interval)
        try:
            await metrics.refresh(only_active=True)
        except Exception:  # a poller that dies silently loses every later token
            log.exception("reading llama-server metrics failed")
