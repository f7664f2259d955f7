"""What tracking a call in flight (cancel by id, proxy/calls/tracking.py) adds to each
call with captures off: the table's enter and leave around the consumer, timed
in a loop on one event loop. Run by hand:

    PYTHONPATH=. .venv/bin/python tests/bench/bench_tracking.py

Prints microseconds per call; never asserts (figures depend on the machine).
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from proxy.calls.call import Client
from proxy.calls.tracking import InFlight
from proxy.edge import reqlog

N = 50_000


async def consume(up: Any, resp: Any, client: Any) -> int:
    return 1


async def run(calls: InFlight, n: int, wrapped: bool) -> float:
    scheduler = SimpleNamespace(instances=lambda: [])
    client = Client(None, "openai")
    ids = reqlog.RequestIds()
    resp = SimpleNamespace(status=200, content_type="application/json", content=None)
    up = SimpleNamespace(model="m", instance_id="m#1", waited=0.0, egress=None, slot=None)
    start = time.perf_counter()
    for _ in range(n):
        token = reqlog.CURRENT.set(reqlog.RequestInfo(ids.new(), time.perf_counter()))
        if wrapped:
            entry = calls.enter(client, "m", "/v1/chat/completions", b"{}", scheduler)  # type: ignore[arg-type]
            assert entry is not None
            await consume(up, resp, client)
            calls.leave(entry, None)
        else:
            await consume(up, resp, client)
        reqlog.CURRENT.reset(token)
    return (time.perf_counter() - start) / n * 1e6


async def main() -> None:
    base = min([await run(InFlight(), N, False) for _ in range(3)])
    tracked = min([await run(InFlight(), N, True) for _ in range(3)])
    print(f"per call, captures off: baseline {base:.2f} µs, tracked {tracked:.2f} µs, "
          f"added {tracked - base:.2f} µs")


if __name__ == "__main__":
    asyncio.run(main())
