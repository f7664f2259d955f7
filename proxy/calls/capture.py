"""Captures: what a model-routed call received, sent upstream and answered, and where
its time went, kept for the operator (``[server.capture]``; docs/admin-api.md).

Off by default, and then nothing here runs: the call path asks for a record only
when a store exists (``proxy.calls.tracking``). A record is filled by wrapping the
call's consumer (the answer is copied as the consumer reads it, by a tap like the
per-key token tap) and its ``via`` (the body a translated family really sent).

Memory is bounded by bytes, not by count: each body and answer is cut at
``body_limit`` (and at an eighth of ``memory``) with a marker, and the ring drops its
oldest records once the records' sizes add up past ``memory``. A record's size is
counted when it is opened and again as its answer grows, so a flood of big calls,
finished or still streaming, keeps the ring under its cap whatever their number.
With ``dir`` set, each finished record is also written as one JSON file by a single
writer task, and the oldest files are deleted once the folder passes ``dir_max``.

Secrets never enter a record: request headers that carry keys (Authorization,
X-Api-Key, cookies, the configured extras) are replaced by ``[redacted]``, and what
goes upstream is recorded before a remote's own headers are added.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp

from proxy.calls import egress
from proxy.calls.tap import ContentTap
from proxy.edge import jsonc
from scheduler.aio import cancel_and_wait
from scheduler.config.root import CaptureConfig
from scheduler.scheduling.scheduler import Upstream

log = logging.getLogger(__name__)

T = TypeVar("T")

REDACTED = "[redacted]"
# Request headers that carry a caller's credentials, whatever the key config says.
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "api-key",
                            "cookie", "set-cookie", "x-goog-api-key"})
# What a record costs besides its bodies: its dict, headers, timings.
_OVERHEAD = 2048
# Finished records waiting for the disk writer; past this they are kept in memory only.
_WRITE_QUEUE = 256
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def cut(data: bytes | bytearray | None, limit: int) -> tuple[bytes, int]:
    """At most ``limit`` bytes of ``data``, and how many were left out."""
    if data is None:
        return b"", 0
    if len(data) <= limit:
        return bytes(data), 0
    return bytes(data[:limit]), len(data) - limit


def redact_headers(headers: Iterable[tuple[str, str]], extra: frozenset[str]) -> list[list[str]]:
    # str(): aiohttp's header names are istr, which no JSON encoder takes.
    return [[str(k), REDACTED if k.lower() in SECRET_HEADERS or k.lower() in extra else v]
            for k, v in headers]


class _Spec(Protocol):
    """What a record reads of ``proxy.calls.upstream.Call`` (imported the other way)."""

    @property
    def body(self) -> bytes | bytearray | None: ...
    @property
    def payload(self) -> Any: ...
    @property
    def data(self) -> object: ...
    @property
    def path(self) -> str: ...


Consume = Callable[[Upstream, aiohttp.ClientResponse, Any], Awaitable[T]]


class Record:
    """One captured call. Filled while it runs; read through ``view()``."""

    def __init__(self, store: Captures, request_id: str, start: float, meta: dict[str, Any],
                 received: bytes | bytearray | None) -> None:
        self.store = store
        self.id = request_id
        self.time = time.time()
        self.start = start  # perf_counter() at the call's arrival (RequestInfo.start)
        self.meta = meta
        self.received, self.received_cut = cut(received, store.body_limit)
        self.sent = b""
        self.sent_cut = 0
        self.sent_path = ""
        self.answer = bytearray()
        self.answer_cut = 0
        self.status = 0
        self.content_type = ""
        self.upstream: dict[str, Any] = {}
        self.launched = False  # no instance of the model was ready when it arrived
        self.granted = self.first = self.last = self.end = 0.0
        self.error = ""
        self.cancelled = False
        # The MCP tool calls of a tool loop run for this call (proxy/tools/loop.py):
        # the loop's own list, shared by the record each of its model turns opens.
        self.tools: list[dict[str, Any]] | None = store.tool_logs.get(request_id)
        self.size = self.cost()

    def cost(self) -> int:
        return _OVERHEAD + len(self.received) + len(self.sent) + len(self.answer)

    # -- filled by the call path -----------------------------------------------------

    def wrap(self, consume: Consume[T]) -> Consume[T]:
        """The call's consumer, observed by this record: what each attempt sent (the
        call path's ``Client.sent``: translated, request policy applied) and read."""

        async def consumer(up: Upstream, resp: aiohttp.ClientResponse, client: Any) -> T:
            self._sent(client.sent, up, resp)
            tap = _Tap(resp, self)
            try:
                return await consume(up, resp, client)
            finally:
                tap.untap()
        return consumer

    def _sent(self, spec: _Spec, up: Upstream, resp: aiohttp.ClientResponse) -> None:
        self.granted = time.perf_counter() if not self.granted else self.granted
        out = up.egress
        # The body as proxy.calls.upstream._send() encodes it, before a remote's headers.
        if spec.data is not None:
            body: bytes | bytearray | None = b"(multipart form)"
        elif spec.payload is not None:
            body = jsonc.dumps(egress.payload_in_slot(egress.renamed_payload(spec.payload,
                                                                             out), up.slot))
        else:
            body = egress.in_slot(egress.renamed_body(spec.body, out), up.slot)
        self.sent, self.sent_cut = cut(body, self.store.body_limit)
        self.sent_path = out.path(spec.path)
        self.upstream = {"model": up.model, "instance": up.instance_id,
                         "waited_seconds": round(up.waited, 4)}
        self.status = resp.status
        self.content_type = resp.content_type
        self.answer.clear()
        self.answer_cut = 0
        self.store.resize(self)

    def read(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.first:
            self.first = now
        self.last = now
        room = self.store.body_limit - len(self.answer)
        if room >= len(data):
            self.answer += data
        else:
            self.answer += data[:max(room, 0)]
            self.answer_cut += len(data) - max(room, 0)
        if room > 0:
            self.store.resize(self)

    def finish(self, error: BaseException | None) -> None:
        self.end = time.perf_counter()
        if error is not None and not self.error:
            self.error = str(error) or type(error).__name__
        self.store.finished(self)

    # -- read by the admin API ---------------------------------------------------------

    def timings(self) -> dict[str, float | None]:
        def since(a: float, b: float) -> float | None:
            return round(b - a, 4) if a and b else None
        waited = float(self.upstream.get("waited_seconds", 0.0))
        return {
            "queue_seconds": 0.0 if self.launched else waited,
            "launch_seconds": waited if self.launched else 0.0,
            "first_token_seconds": since(self.start, self.first),
            "generation_seconds": since(self.first, self.last),
            "total_seconds": since(self.start, self.end or time.perf_counter()),
        }

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "time": round(self.time, 3), **self.meta,
                "status": self.status, "in_flight": not self.end,
                "cancelled": self.cancelled, "size_bytes": self.size}


class _Tap(ContentTap):
    """Every read passes through and is copied into the record (up to its limit)."""

    def __init__(self, resp: aiohttp.ClientResponse, record: Record) -> None:
        super().__init__(resp)
        self._record = record

    def _keep(self, data: bytes) -> bytes:
        if data:
            self._record.read(data)
        return data


class Captures:
    """The ring of records (by bytes) and its disk tier."""

    def __init__(self, config: CaptureConfig) -> None:
        self.config = config
        # A record holds three bodies at most: each is cut at an eighth of the ring too,
        # so that one record never outgrows the ring by itself.
        self.body_limit = min(config.body_limit, config.memory // 8)
        self.records: collections.OrderedDict[str, Record] = collections.OrderedDict()
        self.bytes = 0
        self.dropped = 0
        self._excluded = frozenset(config.exclude_keys)
        self.redacted = frozenset(h.lower() for h in config.redact_headers)
        self._queue: asyncio.Queue[Record] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._files: collections.deque[tuple[Path, int]] = collections.deque()
        self._disk = 0
        # Tool loops running, by request id: see Record.tools.
        self.tool_logs: dict[str, list[dict[str, Any]]] = {}

    def excluded(self, key_name: str | None) -> bool:
        return key_name is not None and key_name in self._excluded

    def open(self, request_id: str, start: float, meta: dict[str, Any],
             received: bytes | bytearray | None) -> Record:
        old = self.records.pop(request_id, None)
        if old is not None:  # a client that reuses its X-Request-Id: the newest wins
            self.bytes -= old.size
        rec = Record(self, request_id, start, meta, received)
        self.records[request_id] = rec
        self.bytes += rec.size
        self._trim()
        return rec

    def resize(self, rec: Record) -> None:
        """Count what a running call's record holds now (its answer grows as it streams),
        so that many calls in flight cannot hold more than the cap between them."""
        if self.records.get(rec.id) is not rec:
            return  # pushed out of the ring while it ran: no longer counted
        size = rec.cost()
        self.bytes += size - rec.size
        rec.size = size
        self._trim()

    def finished(self, rec: Record) -> None:
        if self.records.get(rec.id) is not rec:
            return
        self.resize(rec)
        if rec.id not in self.records:
            return
        self.records.move_to_end(rec.id)
        if self._queue is not None:
            try:
                self._queue.put_nowait(rec)
            except asyncio.QueueFull:
                self.dropped += 1

    def _trim(self) -> None:
        while self.bytes > self.config.memory and len(self.records) > 1:
            _, old = self.records.popitem(last=False)
            self.bytes -= old.size

    def get(self, request_id: str) -> Record | None:
        return self.records.get(request_id)

    def newest(self, limit: int) -> list[Record]:
        return list(reversed(self.records.values()))[:max(limit, 0)]

    # -- the disk tier ---------------------------------------------------------------

    def path_of(self, request_id: str) -> Path | None:
        if self.config.dir is None or not _SAFE_ID.match(request_id):
            return None
        return self.config.dir / f"{request_id}.json"

    async def start(self, render: Callable[[Record], dict[str, Any]]) -> None:
        if self.config.dir is None:
            return
        await asyncio.to_thread(self._scan)
        self._queue = asyncio.Queue(_WRITE_QUEUE)
        self._writer = asyncio.create_task(self._write_loop(render), name="corral-captures")

    async def close(self) -> None:
        if self._writer is not None:
            await cancel_and_wait(self._writer)

    def _scan(self) -> None:
        folder = self.config.dir
        assert folder is not None
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for p in folder.glob("*.json"):
            try:
                st = p.stat()
            except OSError:
                continue
            files.append((st.st_mtime, p, st.st_size))
        for _, p, size in sorted(files):
            self._files.append((p, size))
            self._disk += size
        self._prune()

    async def _write_loop(self, render: Callable[[Record], dict[str, Any]]) -> None:
        assert self._queue is not None
        while True:
            rec = await self._queue.get()
            path = self.path_of(rec.id)
            if path is None:
                continue
            data = jsonc.dumps(render(rec))
            try:
                await asyncio.to_thread(self._write, path, data)
            except OSError as e:
                log.warning("capture %s not written: %s", rec.id, e.strerror or e)

    def _write(self, path: Path, data: bytes) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self._files.append((path, len(data)))
        self._disk += len(data)
        self._prune()

    def _prune(self) -> None:
        """Oldest files first, until the folder is under ``dir_max``."""
        while self._disk > self.config.dir_max and self._files:
            path, size = self._files.popleft()
            self._disk -= size
            path.unlink(missing_ok=True)

    async def load(self, request_id: str) -> dict[str, Any] | None:
        """A record written to disk, once it has left the memory ring."""
        path = self.path_of(request_id)
        if path is None:
            return None
        try:
            raw = await asyncio.to_thread(path.read_bytes)
        except OSError:
            return None
        return jsonc.loads_object(raw)


def headers_meta(headers: Mapping[str, str], extra: frozenset[str]) -> list[list[str]]:
    return redact_headers(headers.items(), extra)
