"""The dashboard's charts: a bounded ring of per-second samples kept by Corral itself.

No Prometheus needed. Once a second a sampler reads what the process already keeps
(``Metrics.calls``: plain counters and histogram buckets per label set; the token
totals read from each active llama-server's counters; the queue-wait histogram;
the scheduler's queues and instances; RAM, instance RSS and VRAM) and stores the
*difference* since the previous second. The hot path pays nothing: nothing here is
called per request (measured in docs/dashboard.md).

The pure part (totals, differences, quantiles, the ring, the layout as columns)
is ``proxy/ops/samples.py``; this module reads the process and serves
``GET /admin/timeseries``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping

import psutil
from aiohttp import web

from proxy.keys import SCHEDULER, SESSION
from proxy.metrics.registry import METRICS, Metrics
from proxy.ops.samples import NO_MODEL, InstanceSecond, Memory, Ring, Sample, series, totals
from scheduler.aio import cancel_and_wait
from scheduler.errors import BadRequest

log = logging.getLogger(__name__)

# Laid out on the event loop up to this many samples (a few ms); beyond, in a thread.
_ON_LOOP = 300


def queue_waits(metrics: Metrics) -> dict[str, tuple[float, float]]:
    """Sum and count of queue waits per model, every outcome together."""
    out: dict[str, tuple[float, float]] = {}
    for family in metrics.queue_wait.collect():
        for s in family.samples:
            model = s.labels.get("model", "")
            total, count = out.get(model, (0.0, 0.0))
            if s.name.endswith("_sum"):
                out[model] = (total + s.value, count)
            elif s.name.endswith("_count"):
                out[model] = (total, count + s.value)
    return out


def probe_memory(
    pids: Mapping[str, int], gpus: bool
) -> tuple[dict[str, int], int, int, int, int, bool]:
    """RSS per instance, RAM used and total, VRAM used and total, and whether to look
    for GPUs again (not after a probe found no NVML). Blocking: reads /proc, NVML."""
    from proxy.metrics.scrape import resident_memory
    from scheduler.models.resources import probe_gpus

    vm = psutil.virtual_memory()
    found, note = probe_gpus() if gpus else ([], "")
    vram_total = sum(g.vram_total for g in found)
    vram_used = sum(g.vram_total - g.vram_free for g in found)
    again = gpus and (bool(found) or not note.startswith("NVML not available"))
    return (resident_memory(dict(pids)), int(vm.total - vm.available), int(vm.total),
            vram_used, vram_total, again)


class Sampler:
    """Takes one sample a second into ``ring``, from the app's metrics and scheduler."""

    def __init__(self, app: web.Application, ring: Ring,
                 clock: Callable[[], float] = time.time) -> None:
        self._app = app
        self.ring = ring
        self._clock = clock
        self._gpus = True  # off once a probe finds no NVML: it will not appear later
        self._skipped = 0

    async def sample(self, t: int | None = None) -> Sample:
        """Take the sample of unix second ``t`` (now's when not given)."""
        app = self._app
        metrics, scheduler = app[METRICS], app[SCHEDULER]
        instances = scheduler.instances()
        # Token totals come from the llama-servers' counters: read the ones that
        # served since the last read (idle instances cost nothing).
        try:
            await metrics.upstream.refresh(app[SESSION], instances, only_active=True,
                                           within=0.5, quiet=scheduler.quiet)
        except Exception:  # the rest of the sample is still worth taking
            log.debug("reading llama-server token counters failed", exc_info=True)
        pids = {i.id: i.pid for i in instances if i.pid is not None}
        rss, ram_used, ram_total, vram_used, vram_total, self._gpus = await asyncio.to_thread(
            probe_memory, pids, self._gpus)
        now = totals(metrics.calls, metrics.upstream.prompt_tokens,
                     metrics.upstream.completion_tokens, queue_waits(metrics))
        queued = {str(m["name"]): int(str(m["queued"])) for m in scheduler.model_status()
                  if m["queued"]}
        insts = [InstanceSecond(i.id, i.model, str(i.state), i.in_flight, i.slots,
                                rss.get(i.id, 0)) for i in instances]
        memory = Memory(ram_used, ram_total, scheduler.memory_budget or 0, vram_used,
                        vram_total, scheduler.vram_budget or 0)
        return self.ring.add(int(self._clock()) if t is None else t, now, queued, insts,
                             memory)

    async def run(self) -> None:
        while True:
            # On the second's boundary, so two browsers see the same samples; stamped
            # with the boundary just reached, read as the sampler wakes (a timer may
            # fire a little before it: the stamp is still the new second's).
            await asyncio.sleep(1.0 - self._clock() % 1.0)
            try:
                await self.sample(round(self._clock()))
            except OSError as e:
                # Out of descriptors, /proc unreadable: the system's trouble, already
                # reported elsewhere; skip the second, say so once a minute.
                if self._skipped % 60 == 0:
                    log.warning("dashboard sample skipped: %s", e)
                self._skipped += 1
            except Exception:  # one bad second must not end the charts
                log.exception("taking a dashboard sample failed")


RING = web.AppKey("timeseries_ring", Ring)


def timeseries_ctx(
    seconds: int,
) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    """Makes the ring and runs its sampler; after metrics_ctx (it reads the metrics
    once they are bound to the scheduler)."""

    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        ring = app[RING] = Ring(seconds)
        task = asyncio.create_task(Sampler(app, ring).run(), name="corral-dashboard-sampler")
        try:
            yield
        finally:
            await cancel_and_wait(task)

    return ctx


async def handle(request: web.Request) -> web.Response:
    """GET /admin/timeseries?window=300&model=NAME[&since=T]: the last ``window``
    seconds (only the samples after unix second ``since`` when given)."""
    ring = request.app[RING]
    try:
        window = int(request.query.get("window", "300"))
        since = int(request.query["since"]) if "since" in request.query else None
    except ValueError:
        raise BadRequest("window and since must be whole numbers of seconds") from None
    if not 1 <= window <= ring.capacity:
        raise BadRequest(f"window must be between 1 and {ring.capacity} seconds")
    model = request.query.get("model") or None
    if model is not None and model != NO_MODEL:
        model = request.app[SCHEDULER].resolve(model).name  # 404 for an unknown name
    configured = [m.name for m in request.app[SCHEDULER].config.models]
    rows = ring.window(window, since)  # a copy of immutable samples: safe in a thread
    if len(rows) > _ON_LOOP:
        # An hour's layout takes ~100 ms: in a thread, calls keep flowing meanwhile.
        body = await asyncio.to_thread(series, rows, model, configured)
    else:
        body = series(rows, model, configured)
    body["capacity"] = ring.capacity
    return web.json_response(body)


def add_routes(app: web.Application, seconds: int) -> None:
    app.cleanup_ctx.append(timeseries_ctx(seconds))
    app.router.add_get("/admin/timeseries", handle)
