"""The one upstream call path: every dialect sends upstream through ``call()``.

``call()`` owns what every path must get right in the same way: the lease (queue,
launch, fallbacks, affinity), the time limits, what happens when an upstream fails,
and the loading feedback of a stream that waits (proxy/calls/feedback.py). The dialect
supplies a *consumer*, which turns the upstream response into the client's answer (a
relay, a translation).

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
import dataclasses
import functools
import logging
import warnings
from dataclasses import replace
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from proxy.calls import context, egress, feedback, policy, usage
from proxy.calls.call import Call, Client, ClientLeft, Consume, T
from proxy.calls.tracking import CANCELLED, Cancelled, Entry, InFlight
from proxy.edge import jsonc
from proxy.edge.errors import Family, stream_error_event
from proxy.edge.reqlog import note_model
from proxy.keys import CALLS, SCHEDULER, SESSION
from scheduler.config.root import ModelConfig
from scheduler.engines.remote import COOLDOWN_STATUSES
from scheduler.errors import CorralError, UpstreamFailed, UpstreamStalled
from scheduler.keys import tenants
from scheduler.scheduling.scheduler import LeaseHints, Scheduler, Upstream

log = logging.getLogger(__name__)

# A call is sent at most this many times (the first try included).
ATTEMPTS = 3
# ... plus this many times when a consumer asks (SendAgain).
SEND_AGAIN = 8

# What a failed upstream looks like from here: no answer, a broken one, or silence.
BROKE = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError)

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
            raise feedback.Ended(err, client.response) from None
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
        async with feedback.leased(scheduler, spec, hints, client) as up:
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


async def answer(request: web.Request, family: Family, spec: Call,
                 consume: Consume[web.StreamResponse]) -> web.StreamResponse:
    """``call()`` for a handler: a failure already written into a stream ends it."""
    try:
        return await call(request, family, spec, consume)
    except feedback.Ended as e:
        log.warning("%s %s failed while waiting: %s", request.method, request.path,
                    e.err.message.splitlines()[0])
        await e.response.write_eof()
        return e.response
