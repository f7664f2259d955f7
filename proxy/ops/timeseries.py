"""The dashboard's charts: a bounded ring of per-second samples kept by Corral itself.

No Prometheus needed. Once a second a sampler reads what the process already keeps
(``Metrics.calls``: plain counters and histogram buckets per label set; the token
totals read from each active llama-server's counters; the queue-wait histogram;
the scheduler's queues and instances; RAM, instance RSS and VRAM) and stores the
*difference* since the previous second. The hot path pays nothing: nothing here is
called per request (measured in docs/dashboard.md).

A sample keeps only the models that did something that second, so an idle hour
costs a few hundred kilobytes. ``series()`` turns the ring into columns, one array
per chart line, filtered by model, for ``GET /admin/timeseries``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import psutil
from aiohttp import web

from proxy.keys import SCHEDULER, SESSION
from proxy.metrics import _DURATION_BUCKETS, _TTFT_BUCKETS, METRICS, CallStats, Metrics
from scheduler.errors import BadRequest
from scheduler.instance import State

log = logging.getLogger(__name__)

# Endpoints left out of the request charts: the dashboard itself polls them.
QUIET = ("/admin", "/metrics", "/dashboard", "/health")
NO_MODEL = "(none)"
# Statuses counted as errors: everything the caller did not get an answer from.
ERROR_STATUS = 400
STATES = tuple(str(s) for s in State)

CallKey = tuple[str, str, str, int]  # model, dialect, endpoint, status (Metrics.calls)


@dataclass(slots=True)
class ModelTotals:
    """Cumulative figures of one model at one instant."""

    requests: int = 0
    errors: int = 0
    dur: list[int] = field(default_factory=lambda: [0] * (len(_DURATION_BUCKETS) + 1))
    ttft: list[int] = field(default_factory=lambda: [0] * (len(_TTFT_BUCKETS) + 1))
    prompt: float = 0.0
    completion: float = 0.0
    wait_sum: float = 0.0
    wait_count: float = 0.0


@dataclass(frozen=True, slots=True)
class ModelSecond:
    """What one model did during one second."""

    requests: int = 0
    errors: int = 0
    dur: tuple[int, ...] = ()
    ttft: tuple[int, ...] = ()
    prompt: float = 0.0
    completion: float = 0.0
    wait_sum: float = 0.0
    wait_count: float = 0.0
    queued: int = 0


@dataclass(frozen=True, slots=True)
class InstanceSecond:
    id: str
    model: str
    state: str
    in_flight: int
    slots: int
    rss: int


@dataclass(frozen=True, slots=True)
class Memory:
    ram_used: int = 0
    ram_total: int = 0
    budget: int = 0
    vram_used: int = 0
    vram_total: int = 0
    vram_budget: int = 0


Quantiles = tuple[float | None, float | None, float | None, float | None]
NO_QUANTILES: Quantiles = (None, None, None, None)


@dataclass(frozen=True, slots=True)
class Sample:
    t: int
    models: Mapping[str, ModelSecond]
    instances: tuple[InstanceSecond, ...]
    memory: Memory
    # TTFT p50, p95, duration p50, p95 over every model: worked out once, when the
    # sample is taken, not on every poll of a long window.
    overall: Quantiles = NO_QUANTILES


def quantiles(dur: Sequence[int], ttft: Sequence[int]) -> Quantiles:
    return (percentile(ttft, _TTFT_BUCKETS, 0.5), percentile(ttft, _TTFT_BUCKETS, 0.95),
            percentile(dur, _DURATION_BUCKETS, 0.5), percentile(dur, _DURATION_BUCKETS, 0.95))


# -- pure: totals, differences, percentiles ---------------------------------------------


def totals(
    calls: Mapping[CallKey, CallStats],
    prompt: Mapping[str, float],
    completion: Mapping[str, float],
    waits: Mapping[str, tuple[float, float]],
) -> dict[str, ModelTotals]:
    """Per-model cumulative figures from the metrics' own tables."""
    out: dict[str, ModelTotals] = {}

    def of(model: str) -> ModelTotals:
        t = out.get(model)
        if t is None:
            t = out[model] = ModelTotals()
        return t

    for (model, _dialect, endpoint, status), st in calls.items():
        if endpoint == "/" or endpoint.startswith(QUIET):
            continue
        t = of(model or NO_MODEL)
        t.requests += st.count
        if status >= ERROR_STATUS:
            t.errors += st.count
        t.dur = [a + b for a, b in zip(t.dur, st.dur, strict=True)]
        t.ttft = [a + b for a, b in zip(t.ttft, st.ttft, strict=True)]
    for model, v in prompt.items():
        of(model).prompt = v
    for model, v in completion.items():
        of(model).completion = v
    for model, (s, n) in waits.items():
        t = of(model)
        t.wait_sum, t.wait_count = s, n
    return out


def _gain(now: float, before: float) -> float:
    # A counter that went down was reset (a metrics object rebuilt): count it from 0.
    return now - before if now >= before else now


def second(before: ModelTotals | None, now: ModelTotals, queued: int) -> ModelSecond | None:
    """The difference between two instants one second apart; None when nothing
    happened (the sample then leaves the model out)."""
    b = before or ModelTotals()
    dur = tuple(int(_gain(x, y)) for x, y in zip(now.dur, b.dur, strict=True))
    ttft = tuple(int(_gain(x, y)) for x, y in zip(now.ttft, b.ttft, strict=True))
    s = ModelSecond(
        requests=int(_gain(now.requests, b.requests)),
        errors=int(_gain(now.errors, b.errors)),
        dur=dur if any(dur) else (),
        ttft=ttft if any(ttft) else (),
        prompt=_gain(now.prompt, b.prompt),
        completion=_gain(now.completion, b.completion),
        wait_sum=_gain(now.wait_sum, b.wait_sum),
        wait_count=_gain(now.wait_count, b.wait_count),
        queued=queued,
    )
    idle = not (s.requests or s.errors or s.dur or s.ttft or s.prompt or s.completion
                or s.wait_count or s.queued)
    return None if idle else s


def percentile(counts: Sequence[int], bounds: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) of a histogram, interpolated linearly inside its bucket
    as Prometheus' histogram_quantile does. ``counts`` has one more entry than
    ``bounds`` (+Inf); a quantile there is reported as the last finite bound."""
    total = sum(counts)
    if total == 0:  # also an empty sequence: a second without such calls
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * (rank - seen) / n
        seen += n
    return bounds[-1]


def _add(into: list[int], counts: Sequence[int]) -> None:
    for i, n in enumerate(counts):
        into[i] += n


def series(samples: Iterable[Sample], model: str | None = None,
           configured: Iterable[str] = ()) -> dict[str, object]:
    """Columns for the charts: one array per line, aligned on ``t`` (unix seconds).
    ``model``: only that model's figures (and instances); the system's RAM and VRAM
    stay whole. ``configured`` models get a line even when idle all along."""
    rows = list(samples)
    n = len(rows)
    names = sorted({name for s in rows for name in s.models}
                   | {i.model for s in rows for i in s.instances} | set(configured))
    if model is not None:
        names = [model]
    requests = {name: [0] * n for name in names}
    errors = {name: [0] * n for name in names}
    prompt, completion = [0.0] * n, [0.0] * n
    ttft50: list[float | None] = [None] * n
    ttft95: list[float | None] = [None] * n
    dur50: list[float | None] = [None] * n
    dur95: list[float | None] = [None] * n
    depth = [0] * n
    wait: list[float | None] = [None] * n
    by_state = {st: [0] * n for st in STATES}
    rss = [0] * n
    load: dict[str, list[float | None]] = {}
    memory: dict[str, list[int]] = {k: [0] * n for k in Memory.__slots__}
    for x, s in enumerate(rows):
        wait_sum = wait_count = 0.0
        q = s.overall if model is None else NO_QUANTILES
        for name, ms in s.models.items():
            if model is not None and name != model:
                continue
            requests[name][x] = ms.requests
            errors[name][x] = ms.errors
            prompt[x] += ms.prompt
            completion[x] += ms.completion
            depth[x] += ms.queued
            wait_sum += ms.wait_sum
            wait_count += ms.wait_count
            if model is not None:
                q = quantiles(ms.dur, ms.ttft)
        ttft50[x], ttft95[x], dur50[x], dur95[x] = q
        wait[x] = wait_sum / wait_count if wait_count else None
        for inst in s.instances:
            if model is not None and inst.model != model:
                continue
            by_state[inst.state][x] += 1
            rss[x] += inst.rss
            column = load.get(inst.id)
            if column is None:
                column = load[inst.id] = [None] * n
            column[x] = round(inst.in_flight / inst.slots, 3) if inst.slots else 0.0
        for k in Memory.__slots__:
            memory[k][x] = getattr(s.memory, k)
    return {
        "interval": 1,
        "t": [s.t for s in rows],
        "models": names,
        "requests": requests,
        "errors": errors,
        "tokens": {"prompt": _rounded(prompt), "completion": _rounded(completion)},
        "ttft": {"p50": _rounded(ttft50), "p95": _rounded(ttft95)},
        "duration": {"p50": _rounded(dur50), "p95": _rounded(dur95)},
        "queue": {"depth": depth, "wait": _rounded(wait)},
        "instances": {st: v for st, v in by_state.items() if any(v)},
        "memory": {**memory, "instances_rss": rss},
        "load": load,
    }


def _rounded(values: Sequence[float | None]) -> list[float | None]:
    return [None if v is None or math.isnan(v) else round(v, 4) for v in values]


# -- the ring and its sampler -------------------------------------------------------------


class Ring:
    """The last ``seconds`` samples, oldest first, and the totals they came from."""

    def __init__(self, seconds: int = 3600) -> None:
        self.samples: deque[Sample] = deque(maxlen=seconds)
        self._last: dict[str, ModelTotals] = {}

    @property
    def capacity(self) -> int:
        return self.samples.maxlen or 0

    def add(self, t: int, now: Mapping[str, ModelTotals], queued: Mapping[str, int],
            instances: Sequence[InstanceSecond], memory: Memory) -> Sample:
        models = {}
        for name in now.keys() | queued.keys():
            ms = second(self._last.get(name), now.get(name) or ModelTotals(),
                        queued.get(name, 0))
            if ms is not None:
                models[name] = ms
        self._last = dict(now)
        dur = [0] * (len(_DURATION_BUCKETS) + 1)
        ttft = [0] * (len(_TTFT_BUCKETS) + 1)
        for ms in models.values():
            _add(dur, ms.dur)
            _add(ttft, ms.ttft)
        sample = Sample(t, models, tuple(instances), memory, quantiles(dur, ttft))
        if self.samples and self.samples[-1].t >= t:
            self.samples.pop()  # a late tick in the same second replaces the earlier one
        self.samples.append(sample)
        return sample

    def window(self, seconds: int, since: int | None = None) -> list[Sample]:
        """The samples of the last ``seconds``, or only those newer than ``since`` (a
        poller that has the rest asks for what it lacks: a second's worth, not an
        hour's, which takes ~100 ms to lay out)."""
        if seconds <= 0 or not self.samples:
            return []
        after = self.samples[-1].t - seconds
        if since is not None:
            after = max(after, since)
        out: list[Sample] = []
        for s in reversed(self.samples):  # newest first: a short tail stops early
            if s.t <= after:
                break
            out.append(s)
        out.reverse()
        return out


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
    from proxy.metrics import resident_memory
    from scheduler.resources import probe_gpus

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

    async def sample(self) -> Sample:
        app = self._app
        metrics, scheduler = app[METRICS], app[SCHEDULER]
        instances = scheduler.instances()
        # Token totals come from the llama-servers' counters: read the ones that
        # served since the last read (idle instances cost nothing).
        with contextlib.suppress(Exception):
            await metrics.upstream.refresh(app[SESSION], instances, only_active=True,
                                           within=0.5)
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
        return self.ring.add(int(self._clock()), now, queued, insts, memory)

    async def run(self) -> None:
        while True:
            # On the second's boundary, so two browsers see the same samples.
            await asyncio.sleep(1.0 - self._clock() % 1.0)
            try:
                await self.sample()
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
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

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
    body = series(ring.window(window, since), model, configured)
    body["capacity"] = ring.capacity
    return web.json_response(body)


def add_routes(app: web.Application, seconds: int) -> None:
    app.cleanup_ctx.append(timeseries_ctx(seconds))
    app.router.add_get("/admin/timeseries", handle)
