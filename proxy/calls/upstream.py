"""The one upstream call path: every dialect sends upstream through ``call()``.

``call()`` owns what every path must get right in the same way: the lease (queue,
launch, fallbacks, affinity), the time limits, what happens when an upstream fails,
and the loading feedback of a stream that waits. The dialect supplies a *consumer*,
which turns the upstream response into the client's answer (a relay, a translation).

The rule for failures is one for every family: while the client has received no
byte of the answer, a call whose upstream failed (refused, reset, died, timed out) is
sent again, to another replica or a relaunch, up to ``ATTEMPTS`` times: generation
has no side effects on the server. The resend avoids the upstreams the call failed on
while another is ready or starting (``LeaseHints.avoid``), and the failure is reported
first, so a remote that reset or refused leaves the rotation until a good check. Once
the client has bytes, the consumer ends the answer with a clean error in its dialect.
A consumer says when it commits by setting ``Client.answered`` just before its first
write.

Time limits, per model: ``connect_timeout``; ``first_byte_timeout`` from sending the
call to the first byte of the answer (a launch or a queue wait is not counted: the
lease is granted only once an instance is ready); ``stall_timeout`` between two reads
once the answer flows. Both read limits are aiohttp's own per-socket read timer, set
once per call, so a chunk costs nothing extra. An upstream that trips one is reported
to the scheduler, which checks its health at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from proxy.calls import context, egress, policy, usage
from proxy.calls.tracking import CANCELLED, Cancelled, Entry, InFlight
from proxy.edge import jsonc
from proxy.edge.errors import Family, stream_error_event
from proxy.edge.reqlog import note_model
from proxy.keys import CALLS, SCHEDULER, SESSION
from scheduler.aio import cancel_and_wait
from scheduler.config.root import ModelConfig
from scheduler.engines.remote import COOLDOWN_STATUSES
from scheduler.errors import ContextTooLong, CorralError, UpstreamFailed, UpstreamStalled
from scheduler.keys import tenants
from scheduler.scheduling.scheduler import LeaseHints, Scheduler, Upstream

log = logging.getLogger(__name__)

T = TypeVar("T")

# A call is sent at most this many times (the first try included).
ATTEMPTS = 3
# ... plus this many times when a consumer asks (SendAgain).
SEND_AGAIN = 8
# The first loading-feedback line goes out after this long without a lease.
FEEDBACK_AFTER = 1.0
FEEDBACK_EVERY = 1.0

# What a failed upstream looks like from here: no answer, a broken one, or silence.
BROKE = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError)

JSON_HEADERS: Mapping[str, str] = {"Content-Type": "application/json"}


class ClientLeft(ConnectionResetError):
    """The client went away while its answer was written (counted 499)."""


@dataclass(slots=True)
class Client:
    """The client side of one call, across its attempts."""

    # None for a caller that answers over something else (the LM Studio SDK's
    # websocket): it has no HTTP response to prepare.
    request: web.Request | None
    family: Family
    # Headers sent: by loading feedback, or by the answer itself.
    response: web.StreamResponse | None = None
    # Bytes of the answer have gone out: a failure can no longer be resent.
    answered: bool = False
    # The upstream answer being read: what an operator's cancel closes once the answer
    # flows (proxy/calls/tracking.py).
    upstream: aiohttp.ClientResponse | None = None
    # What the last attempt sent (after translation and request policy): a capture
    # records this body, not the one the client wrote.
    sent: Any = None


Consume = Callable[[Upstream, aiohttp.ClientResponse, Client], Awaitable[T]]


class FormData(Protocol):
    """A body built per attempt (a multipart form), with its ``model`` field set to
    ``rename`` for an upstream that names the model differently."""

    def __call__(self, rename: str | None = None) -> Any: ...


@dataclass(slots=True)
class Call:
    """One call to send upstream. Exactly one body: ``body`` (bytes as they came),
    ``payload`` (a translated body to encode), or ``data`` (built per attempt).

    Treated as immutable (changed with ``dataclasses.replace``) but not frozen: a
    frozen dataclass sets each of these fields through ``object.__setattr__``, a cost
    every call paid."""

    model: str
    path: str
    body: bytes | bytearray | None = None
    payload: Any = None
    data: FormData | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: JSON_HEADERS)
    hints: LeaseHints | None = None
    method: Literal["GET", "POST"] = "POST"
    query: str = ""
    # False for a body that is streamed through and cannot be sent twice.
    replayable: bool = True
    # Loading feedback for a stream that waits: None, "comments" or "visible".
    feedback: Literal["comments", "visible"] | None = None
    # The call to send instead to the upstream leased for an attempt (None: this one):
    # a family the upstream lacks goes as a translated chat call (proxy.dialects.families).
    via: Callable[[Upstream], Call | None] | None = None
    # Whether the prompt fits the leased instance's context (proxy/calls/context.py);
    # None: a call that generates nothing.
    fit: context.Fit | None = None
    # Another id the call answers to in the in-flight table, besides its request id:
    # the ``request_id`` an Xinference client put in the body.
    call_id: str | None = None


class SendAgain(Exception):
    """Raised by a consumer that has learned, before answering, that the call must be
    sent differently (a family its upstream lacks goes translated): sent again at once,
    up to ``SEND_AGAIN`` times besides ``ATTEMPTS``; the upstream is not reported as
    failing."""


@functools.lru_cache(maxsize=64)
def _timeout(connect: float, first_byte: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=first_byte)


async def call(request: web.Request, family: Family, spec: Call, consume: Consume[T]) -> T:
    """Send ``spec`` upstream and let ``consume`` answer the client; see the module."""
    return await _call(request.app, Client(request, family), spec, consume)


async def call_app(app: web.Application, spec: Call, consume: Consume[T]) -> T:
    """``call()`` for a caller that is not answering an HTTP request of its own."""
    return await _call(app, Client(None, "openai"), spec, consume)


async def _call(app: web.Application, client: Client, spec: Call, consume: Consume[T]) -> T:
    calls = app.get(CALLS)
    entry = None if calls is None else calls.enter(client, spec.model, spec.path, spec.body,
                                                    app[SCHEDULER], spec.call_id)
    if calls is None or entry is None:
        return await _admitted(app, client, spec, consume)
    return await _tracked(app, calls, entry, client, spec, consume)


async def _tracked(app: web.Application, calls: InFlight, entry: Entry, client: Client,
                   spec: Call, consume: Consume[T]) -> T:
    """A call in flight: cancellable by its request id, captured when captures are on
    (proxy/calls/tracking.py)."""
    if entry.record is not None:
        consume = entry.record.wrap(consume)
    error: BaseException | None = None
    try:
        return await _admitted(app, client, spec, consume)
    except BaseException as e:
        error = e
        if not (isinstance(e, asyncio.CancelledError) and entry.cancelled):
            raise
        # An operator's cancel, not the client's hang-up nor a shutdown.
        entry.task.uncancel()
        err = Cancelled(CANCELLED)
        if client.response is not None and not client.answered:
            # Loading feedback had begun the stream: the error is its last event.
            await client.response.write(stream_error_event(err, client.family))
            client.answered = True
            raise _Ended(err, client.response) from None
        raise err from None
    finally:
        calls.leave(entry, error)


async def _admitted(app: web.Application, client: Client, spec: Call,
                    consume: Consume[T]) -> T:
    scheduler = app[SCHEDULER]
    session = app[SESSION]
    key = tenants.current()
    if key is None:
        return await _attempts(scheduler, session, client, spec, consume, None)
    # Once per call, before it queues (a resend is the same call): RateLimited, a 429.
    async with scheduler.admitted(key):
        return await _attempts(scheduler, session, client, spec, consume, key)


async def _attempts(scheduler: Scheduler, session: aiohttp.ClientSession, client: Client,
                    spec: Call, consume: Consume[T], key: tenants.Key | None) -> T:
    attempt = again = 0
    hints = spec.hints
    while True:
        attempt += 1
        async with _leased(scheduler, spec, hints, client) as up:
            # Request policy and variants (proxy/calls/policy.py): none, no work.
            shape = (policy.shape_for(scheduler.shapes, spec.model, up.model)
                     if scheduler.shapes else None)
            note_model(shape.label if shape else up.model)
            cfg = scheduler.resolve(up.model)
            try:
                sent = spec.via(up) if spec.via is not None else None
                out = policy.shaped(sent or spec, shape) if shape else sent or spec
                # The context check counts the body as shaped (a clamped max_tokens).
                fit = policy.refit(spec.fit, out) if shape and sent is None else spec.fit
                if fit is not None and sent is None:
                    await context.check(session, up, fit, spec.hints)
                client.sent = out
                resp = client.upstream = await _send(session, up, out, cfg)
                if resp.status == 400 and fit is not None and sent is None:
                    try:
                        await context.refused(resp, up, fit, spec.hints, up.model)
                    except BaseException:
                        resp.release()
                        raise
                if resp.status in COOLDOWN_STATUSES:
                    # A cloud that rate-limits or fails sits out its cooldown.
                    scheduler.upstream_answered(up.instance_id, resp.status,
                                                resp.headers.get("Retry-After"))
                # A counted key's tokens are read off the answer's end as the consumer
                # reads it, whatever the dialect (proxy/calls/usage.py).
                tap = usage.Tap(resp) if key is not None else None
                try:
                    result = await consume(up, resp, client)
                    if key is not None and tap is not None:
                        scheduler.charge(key, tap.tokens())
                    return result
                except ConnectionResetError as e:
                    # A write to a client that went away: a consumer only reads the
                    # upstream (which fails as a payload error or a disconnect), so this
                    # is the client's end. aiohttp's "Cannot write to closing
                    # transport" is also a ClientConnectionError, and was taken for the
                    # upstream failing: a 502, a WARNING, the instance reported (seen
                    # when Codex hung up as its first chunk was written).
                    resp.close()
                    raise ClientLeft(str(e) or type(e).__name__) from None
                except BaseException:
                    # An unread stream must end at the server, which then stops
                    # generating: close the connection, don't pool it.
                    resp.close()
                    raise
                finally:
                    if tap is not None:
                        tap.untap()
                    resp.release()
            except context.Larger as e:
                # The instance's context is too small: another, or a larger one launched
                # (the scheduler's choice), takes the call; no attempt spent, within a bound.
                again += 1
                if again > SEND_AGAIN:
                    raise UpstreamFailed(f"model '{up.model}': {e}") from None
                attempt -= 1
                spec = dataclasses.replace(spec, hints=e.hints, fit=e.fit)
                # What the call failed on before still holds for the larger lease.
                hints = e.hints if hints is None or e.hints is None else replace(
                    e.hints, avoid=hints.avoid)
                log.info("model '%s': %s; leasing a larger context", up.model, e)
            except SendAgain as e:
                # Not a failure of the upstream: nothing to report, and no attempt spent
                # (each replica of a model may have to learn once), within a bound.
                again += 1
                if again > SEND_AGAIN:
                    raise UpstreamFailed(f"model '{up.model}': {e}") from None
                attempt -= 1
                log.info("model '%s': %s; sending again", up.model, e)
            except (*BROKE, UpstreamFailed) as e:
                reason = _describe(e)
                if client.answered:
                    # The consumer had begun the answer and ended it in its dialect.
                    raise UpstreamFailed(
                        f"model '{up.model}': upstream {up.instance_id} failed: {reason}"
                    ) from None
                await _report(scheduler, up, e, reason)
                # The resend goes to another upstream while one is ready or starting.
                sent_with = hints or LeaseHints()
                hints = replace(sent_with, avoid=sent_with.avoid | {up.instance_id})
                if attempt >= ATTEMPTS or not spec.replayable:
                    raise UpstreamFailed(
                        f"model '{up.model}': upstream {up.instance_id} failed: {reason}"
                    ) from None
                log.info("model '%s': upstream %s failed before answering (%s); sending "
                         "again", up.model, up.instance_id, reason)


def _describe(e: BaseException) -> str:
    if isinstance(e, CorralError):
        return e.message
    if isinstance(e, TimeoutError):
        return "timed out"
    return str(e) or type(e).__name__


async def _report(scheduler: Scheduler, up: Upstream, e: BaseException, reason: str) -> None:
    """Tell the scheduler; it retires a wedged child or sidelines a failing remote."""
    if isinstance(e, TimeoutError | UpstreamStalled):
        await scheduler.suspect(up.instance_id, reason)
        return
    await scheduler.upstream_failed(
        up.instance_id, reason, connect=isinstance(e, aiohttp.ClientConnectorError)
    )


async def _send(
    session: aiohttp.ClientSession, up: Upstream, spec: Call, cfg: ModelConfig
) -> aiohttp.ClientResponse:
    out = up.egress
    url = up.base_url + out.path(spec.path) + (f"?{spec.query}" if spec.query else "")
    if spec.data is not None:
        data: Any = spec.data(out.rename)
    elif spec.payload is not None:
        data = jsonc.dumps(egress.payload_in_slot(egress.renamed_payload(spec.payload, out),
                                                  up.slot))
    else:
        data = _payload(egress.in_slot(egress.renamed_body(spec.body, out), up.slot))
    resp = await session.request(
        spec.method, url, data=data, headers=egress.headers(spec.headers, out), ssl=out.ssl,
        timeout=_timeout(cfg.connect_timeout, out.first_byte_timeout or cfg.first_byte_timeout),
    )
    conn = resp.connection
    if conn is not None and conn.protocol is not None:
        # From the first byte on, the read timer means "no chunk for this long".
        conn.protocol.read_timeout = cfg.stall_timeout
        conn.protocol.start_timeout()
    return resp


_SLICE = 1 << 20


class _Slices(aiohttp.BytesPayload):
    """A large body written a slice at a time, waiting for the socket in between: one
    big write would be copied whole into the transport's buffer."""

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        view = memoryview(self._value)
        if content_length is not None:
            view = view[:content_length]
        for i in range(0, len(view), _SLICE):
            await writer.write(view[i:i + _SLICE])


def _payload(body: bytes | bytearray | None) -> Any:
    if body is None or len(body) <= _SLICE:
        return body
    # aiohttp warns on bytes bodies over 1 MiB, against exactly what _Slices avoids.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        return _Slices(body)


# --- leases and loading feedback -------------------------------------------------------


def _leased(scheduler: Scheduler, spec: Call, hints: LeaseHints | None,
            client: Client) -> contextlib.AbstractAsyncContextManager[Upstream]:
    if spec.feedback is None or context.quiet(scheduler, spec.model, spec.fit):
        return _Explained(scheduler.lease(spec.model, hints), spec.fit)
    return _with_feedback(scheduler, spec, hints, client)


class _Explained:
    """The scheduler's lease, a ContextTooLong given the call's own counts: a class, not
    one more generator-based context manager around it on every call."""

    __slots__ = ("_fit", "_lease")

    def __init__(self, lease: contextlib.AbstractAsyncContextManager[Upstream],
                 fit: context.Fit | None) -> None:
        self._lease = lease
        self._fit = fit

    async def __aenter__(self) -> Upstream:
        try:
            return await self._lease.__aenter__()
        except ContextTooLong as e:
            raise context.explained(e, self._fit) from None

    async def __aexit__(self, kind: type[BaseException] | None, err: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        if isinstance(err, ContextTooLong):
            context.explained(err, self._fit)  # in place: it goes on as it is
        try:
            return await self._lease.__aexit__(kind, err, tb)
        except ContextTooLong as e:
            raise context.explained(e, self._fit) from None


@contextlib.asynccontextmanager
async def _with_feedback(scheduler: Scheduler, spec: Call, hints: LeaseHints | None,
                         client: Client) -> AsyncIterator[Upstream]:
    feedback = _Feedback(scheduler, spec, client)
    try:
        async with scheduler.lease(spec.model, hints) as up:
            if feedback.stop_now():
                await feedback.stop()
            yield up
    except CorralError as e:
        if isinstance(e, ContextTooLong):
            e = context.explained(e, spec.fit)
        await feedback.stop()
        if client.response is None or client.answered:
            raise
        # The status line is gone: the failure is the stream's last event.
        await client.response.write(stream_error_event(e, client.family))
        client.answered = True
        raise _Ended(e, client.response) from None
    finally:
        if feedback.stop_now():
            await feedback.stop()


class _Ended(Exception):
    """A failure already written to the client as a stream event."""

    def __init__(self, err: CorralError, response: web.StreamResponse) -> None:
        super().__init__(err.message)
        self.err = err
        self.response = response


class _Feedback:
    """SSE lines for a stream that waits for its lease: started by a timer only when
    the wait lasts, so a call that gets a slot at once costs one timer handle."""

    def __init__(self, scheduler: Scheduler, spec: Call, client: Client) -> None:
        self._scheduler = scheduler
        self._spec = spec
        self._client = client
        self._started = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            FEEDBACK_AFTER, self._start
        )

    def _start(self) -> None:
        self._timer = None
        self._task = asyncio.ensure_future(self._run())

    def stop_now(self) -> bool:
        """Cancels the timer; whether lines are being sent (then ``stop()`` them): a
        call leased at once, nearly every call, needs no coroutine for this."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return self._task is not None

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)

    def _what(self) -> str:
        model = self._spec.model
        loading = model in self._scheduler.loading()
        waited = time.monotonic() - self._started
        if not loading:
            return f"waiting for a free slot on {model} {waited:.1f} s"
        expected, elapsed = self._scheduler.load_estimate(model)
        if expected is None or elapsed is None:
            return f"loading {model} {waited:.1f} s"
        # The model's median load time: an honest "about how long" (issue 27).
        return f"loading {model} {waited:.1f} s (loads take about {expected:.0f} s)"

    async def _run(self) -> None:
        client = self._client
        assert client.request is not None, "feedback needs an HTTP response"
        if client.response is None:
            out = web.StreamResponse(headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
            out.content_type = "text/event-stream"
            await out.prepare(client.request)
            client.response = out
        out = client.response
        visible = self._spec.feedback == "visible" and client.family == "openai"
        while True:
            what = self._what()
            if visible:
                await out.write(_reasoning_chunk(self._spec.model, what))
            else:
                await out.write(f": {what}\n\n".encode())
            await asyncio.sleep(FEEDBACK_EVERY)


def _reasoning_chunk(model: str, text: str) -> bytes:
    chunk = {
        "id": "corral-loading", "object": "chat.completion.chunk", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": {"reasoning_content": text + "\n"},
                     "finish_reason": None}],
    }
    return b"data: " + jsonc.dumps(chunk) + b"\n\n"


async def answer(request: web.Request, family: Family, spec: Call,
                 consume: Consume[web.StreamResponse]) -> web.StreamResponse:
    """``call()`` for a handler: a failure already written into a stream ends it."""
    try:
        return await call(request, family, spec, consume)
    except _Ended as e:
        log.warning("%s %s failed while waiting: %s", request.method, request.path,
                    e.err.message.splitlines()[0])
        await e.response.write_eof()
        return e.response
