"""Pinned models and priorities with fake llama-servers: a pinned model is loaded at
start and survives eviction pressure and its TTL; a higher-priority model's queue is
served first when room frees up."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from proxy.keys import SCHEDULER
from scheduler.process.instance import State
from tests.conftest import make_config, wait_for


def chat(model: str, **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **kw}


async def test_pinned_model_is_loaded_at_start_and_never_evicted_or_expired(
    corral: Any, tmp_path: Path
) -> None:
    cfg = make_config(tmp_path, [{"name": "p", "evictable": False, "ttl": 0.1},
                                 {"name": "a", "ttl": 30}, {"name": "b", "ttl": 30}],
                      scheduler={"max_instances": 2})
    client = await corral(cfg)
    sched = client.app[SCHEDULER]
    await wait_for(lambda: [i.state for i in sched.loaded("p")] == [State.READY])
    pinned = sched.loaded("p")[0]
    for model in ("a", "b", "a"):
        resp = await client.post("/v1/chat/completions", json=chat(model))
        assert resp.status == 200
    # Each swap evicted the other unpinned model, though p was the least recently used.
    assert sched.loaded("p") == [pinned] and pinned.state is State.READY
    assert pinned.stats.served == 0
    await asyncio.sleep(0.5)  # far past p's ttl
    assert pinned.state is State.READY


async def test_higher_priority_model_takes_the_freed_room_first(
    corral: Any, tmp_path: Path
) -> None:
    cfg = make_config(tmp_path, [
        {"name": "busy", "env": {"FAKE_TOKEN_DELAY": "0.05"}},
        {"name": "low", "priority": 0}, {"name": "high", "priority": 5}],
        scheduler={"max_instances": 1})
    client = await corral(cfg)
    sched = client.app[SCHEDULER]
    first = asyncio.ensure_future(client.post("/v1/chat/completions",
                                              json=chat("busy", max_tokens=10)))
    await wait_for(lambda: any(i.in_flight for i in sched.loaded("busy")))
    low = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat("low")))
    await asyncio.sleep(0.05)
    high = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat("high")))
    order: list[str] = []
    low.add_done_callback(lambda _: order.append("low"))
    high.add_done_callback(lambda _: order.append("high"))
    assert (await first).status == 200
    assert (await high).status == 200 and (await low).status == 200
    # high queued later but is dispatched (and launched) first.
    assert order == ["high", "low"]
