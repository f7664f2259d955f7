"""What the dashboard's per-second sample ring costs. Run by hand, never by the suite::

    PYTHONPATH=. .venv/bin/python tests/bench/bench_timeseries.py

Nothing here runs per request: the figures are the sampler's work once a second, the
memory an hour of samples holds, and the layout of a window for GET /admin/timeseries.
Synthetic load: 200 label sets (10 models × 4 endpoints × 5 statuses), 20 of them
gaining a call every second, 10 ready instances. Reported, not asserted.
"""

from __future__ import annotations

import json
import os
import random
import time
import tracemalloc

from proxy.metrics.scrape import CallStats
from proxy.ops.samples import InstanceSecond, Memory, ModelTotals, Ring, series, totals

MODELS = [f"m{i}" for i in range(10)]
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/api/chat")
STATUSES = (200, 400, 404, 499, 500)


def fill(ring: Ring, calls: dict[tuple[str, str, str, int], CallStats], seconds: int) -> float:
    insts = [InstanceSecond(f"{m}#1", m, "ready", 1, 4, 1 << 30) for m in MODELS]
    rng = random.Random(1)
    spent = 0.0
    for t in range(seconds):
        for st in rng.sample(list(calls.values()), 20):
            st.count += 1
            st.dur[3] += 1
            st.ttft[2] += 1
        start = time.perf_counter()
        now: dict[str, ModelTotals] = totals(
            calls, {m: t * 10.0 for m in MODELS}, {m: t * 5.0 for m in MODELS}, {})
        ring.add(t, now, {"m1": 2}, insts, Memory(1, 2, 3))
        spent += time.perf_counter() - start
    return spent / seconds


def main() -> None:
    print(f"load average: {os.getloadavg()[0]:.2f}")
    calls = {(m, "openai", e, s): CallStats()
             for m in MODELS for e in ENDPOINTS for s in STATUSES}
    ring = Ring(3600)
    per = fill(ring, calls, 3600)
    # Memory apart: tracing allocations slows the timing above several times over.
    tracemalloc.start()
    other = Ring(3600)
    fill(other, {k: CallStats() for k in calls}, 3600)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(f"sample (totals + add): {per * 1e6:.0f} µs, once a second")
    print(f"an hour of samples (and the 200 counters): {held / 2**20:.1f} MiB")
    for window in (1, 300, 3600):
        start = time.perf_counter()
        body = series(ring.window(window))
        took = time.perf_counter() - start
        size = len(json.dumps(body)) / 1024
        print(f"layout of {window:>4} s: {took * 1e3:6.1f} ms, {size:.0f} KiB")


if __name__ == "__main__":
    main()
