"""Calls in flight, by request id: what ``POST /admin/requests/{id}/cancel`` ends, and
where a call's capture record is opened (``proxy.calls.capture``).

``proxy.calls.upstream`` enters every call it sends in the ``InFlight`` table of its
app (shared by every port) and leaves it on every exit path. An entry holds the task
that runs the call, the client side and the upstream answer being read, so that
``cancel()`` can end the call the way that leaves its client a clean answer:

* **nothing sent to the client yet** (queued, loading, waiting for the upstream's
  answer, reading a whole non-streaming answer): the task is cancelled; the call path
  turns that into ``Cancelled`` (499, in the caller's dialect), or into the error
  event of a stream whose loading feedback has begun.
* **an answer flowing**: the upstream answer is poisoned with a payload error and
  closed, which every consumer already handles as an upstream that broke
  mid-stream: the stream ends with an error event in its dialect, and the lease is
  released as the consumer returns.

Either way the upstream connection is closed, so llama-server stops generating and
frees the slot at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

import aiohttp

from proxy.calls.capture import Captures, Record, headers_meta
from proxy.edge import reqlog
from proxy.edge.body import received_body
from scheduler.errors import CorralError
from scheduler.keys import tenants
from scheduler.process.instance import State
from scheduler.scheduling.scheduler import Scheduler

CANCELLED = "cancelled by an operator"


class Cancelled(CorralError):
    """An operator ended the call (``POST /admin/requests/{id}/cancel``).

    499, nginx's "client closed request", because the call was closed on the
    client's behalf; not 409, which the OpenAI and Anthropic SDKs resend."""

    status = 499
    code = "cancelled"
    type = "cancelled"


class _Client(Protocol):
    """What the table reads of ``proxy.calls.upstream.Client``."""

    @property
    def answered(self) -> bool: ...
    @property
    def request(self) -> Any: ...
    @property
    def family(self) -> str: ...
    @property
    def upstream(self) -> aiohttp.ClientResponse | None: ...


class Entry:
    __slots__ = ("alias", "cancelled", "client", "id", "model", "record", "start", "task")

    def __init__(self, request_id: str, start: float, task: asyncio.Task[Any], client: _Client,
                 model: str, record: Record | None) -> None:
        self.id = request_id
        self.start = start
        self.task = task
        self.client = client
        self.model = model
        self.record = record
        self.cancelled = False
        self.alias: str | None = None


class InFlight:
    def __init__(self, captures: Captures | None = None) -> None:
        self.calls: dict[str, Entry] = {}
        self.captures = captures

    def enter(self, client: _Client, model: str, path: str, body: bytes | bytearray | None,
              scheduler: Scheduler, alias: str | None = None) -> Entry | None:
        info = reqlog.current()
        task = asyncio.current_task()
        if info is None or task is None:
            return None  # not an HTTP call (the LM Studio SDK's socket): no id to cancel
        record = None
        store = self.captures
        if store is not None:
            key = tenants.current()
            if not store.excluded(key.name if key is not None else None):
                record = _open(store, info, client, model, path, body, scheduler,
                               key.name if key is not None else None)
        entry = Entry(info.id, info.start, task, client, model, record)
        self.calls[info.id] = entry
        if alias is not None and alias != info.id and alias not in self.calls:
            entry.alias = alias
            self.calls[alias] = entry
        return entry

    def leave(self, entry: Entry, error: BaseException | None) -> None:
        if self.calls.get(entry.id) is entry:
            del self.calls[entry.id]
        if entry.alias is not None and self.calls.get(entry.alias) is entry:
            del self.calls[entry.alias]
        if entry.record is not None:
            entry.record.cancelled = entry.cancelled
            entry.record.finish(error)

    def cancel(self, request_id: str) -> bool:
        """End the call ``request_id`` if it is in flight (see the module)."""
        entry = self.calls.get(request_id)
        if entry is None or entry.cancelled:
            return False
        entry.cancelled = True
        resp = entry.client.upstream
        if entry.client.answered and resp is not None:
            resp.content.set_exception(aiohttp.ClientPayloadError(CANCELLED))
            resp.close()
        else:
            entry.task.cancel(CANCELLED)
        return True

    def describe(self) -> list[dict[str, Any]]:
        now = time.perf_counter()
        return [{"request_id": e.id, "model": e.model, "answering": e.client.answered,
                 "seconds": round(now - e.start, 3)}
                for rid, e in self.calls.items() if rid == e.id]


def _open(store: Captures, info: reqlog.RequestInfo, client: _Client, model: str, path: str,
          body: bytes | bytearray | None, scheduler: Scheduler, key: str | None) -> Record:
    request = client.request
    meta: dict[str, Any] = {"model": model, "path": path, "key": key,
                            "family": client.family}
    received = body
    if request is not None:
        meta.update(method=request.method, url_path=request.path,
                    query=request.query_string, host=request.host,
                    headers=headers_meta(request.headers, store.redacted))
        received = received_body(request) or body
    record = store.open(info.id, info.start, meta, received)
    record.launched = not any(i.model == model and i.state is State.READY
                              for i in scheduler.instances())
    return record
