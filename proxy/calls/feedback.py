"""A call's lease, and the loading feedback of a stream that waits for it.

``leased()`` is the lease ``proxy.calls.upstream`` takes for each attempt: the
scheduler's, its ContextTooLong given the call's own counts, and for a stream whose
model asks for loading feedback (``Call.feedback``), SSE lines while the wait lasts
(comments, or reasoning deltas an OpenAI chat client shows). A failure once those
lines began is the stream's last event (``Ended``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from types import TracebackType

from aiohttp import web

from proxy.calls import context
from proxy.calls.call import Call, Client
from proxy.edge import jsonc
from proxy.edge.errors import stream_error_event
from scheduler.aio import cancel_and_wait
from scheduler.errors import ContextTooLong, CorralError
from scheduler.scheduling.scheduler import LeaseHints, Scheduler, Upstream

# The first loading-feedback line goes out after this long without a lease.
FEEDBACK_AFTER = 1.0
FEEDBACK_EVERY = 1.0


def leased(scheduler: Scheduler, spec: Call, hints: LeaseHints | None,
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
        raise Ended(e, client.response) from None
    finally:
        if feedback.stop_now():
            await feedback.stop()


class Ended(Exception):
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
