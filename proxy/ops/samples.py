"""The dashboard's samples, pure: per-model totals, one second's difference, histogram
quantiles, the bounded ring and its layout as chart columns. No I/O, no clock: the
sampler (``proxy/ops/timeseries.py``) feeds it, the unit tests drive it directly.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from proxy.metrics.scrape import _DURATION_BUCKETS, _TTFT_BUCKETS, CallStats
from scheduler.process.instance import State

# Endpoints left out of the request charts: the dashboard itself polls them. The
# playground's Ollama calls (/admin/ollama/...) are model calls and count.
QUIET = ("/admin", "/metrics", "/dashboard", "/health")
COUNTED = ("/admin/ollama/",)
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
        if endpoint == "/" or (endpoint.startswith(QUIET) and not endpoint.startswith(COUNTED)):
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


def _summed(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b, strict=True)) if a and b else a or b


def _joined(a: ModelSecond, b: ModelSecond) -> ModelSecond:
    """Two differences of one model as one: the counts added, the queue as last seen."""
    return ModelSecond(
        requests=a.requests + b.requests, errors=a.errors + b.errors,
        dur=_summed(a.dur, b.dur), ttft=_summed(a.ttft, b.ttft),
        prompt=a.prompt + b.prompt, completion=a.completion + b.completion,
        wait_sum=a.wait_sum + b.wait_sum, wait_count=a.wait_count + b.wait_count,
        queued=b.queued)


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


# -- the ring -------------------------------------------------------------


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
        if self.samples and self.samples[-1].t >= t:
            # A second tick for a second already sampled (the clock stepped back): its
            # differences add to that second's. Replacing it would lose the calls the
            # earlier tick counted, for good: ``_last`` has moved past them.
            earlier = self.samples.pop()
            t = earlier.t
            models = {**earlier.models, **{
                name: _joined(earlier.models[name], ms) if name in earlier.models else ms
                for name, ms in models.items()}}
        dur = [0] * (len(_DURATION_BUCKETS) + 1)
        ttft = [0] * (len(_TTFT_BUCKETS) + 1)
        for ms in models.values():
            _add(dur, ms.dur)
            _add(ttft, ms.ttft)
        sample = Sample(t, models, tuple(instances), memory, quantiles(dur, ttft))
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
