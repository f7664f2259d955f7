"""Model lifecycle on the admin API: load cost in the wait (issue 27), operations,
cancel, replicas, events (issue 28)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from proxy.keys import SCHEDULER
from tests.conftest import make_config


def chat(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


async def test_retry_after_comes_from_the_median_load_time(corral, tmp_path: Path) -> None:
    # queue_size 0: a call that finds no free slot is refused at once, before it starts
    # a launch; its Retry-After is what a load of its model takes.
    cfg = make_config(tmp_path, [{"name": "m", "env": {"FAKE_LOAD_DELAY": "2.5"}}])
    client = await corral(cfg)
    sched = client.app[SCHEDULER]
    assert (await client.post("/v1/chat/completions", json=chat("m"))).status == 200
    expected, elapsed = sched.load_estimate("m")
    assert expected is not None and expected >= 2.5 and elapsed is None
    await sched.unload("m")
    await sched.apply_config(make_config(tmp_path, [{"name": "m", "env": {
        "FAKE_LOAD_DELAY": "2.5"}}], scheduler={"queue_size": 0}))
    for _ in range(200):
        if not sched.loaded("m"):
            break
        await asyncio.sleep(0.02)
    refused = await client.post("/v1/chat/completions", json=chat("m"))
    assert refused.status == 503
    # Not the fixed 5 s a model with no instance used to be told.
    assert refused.headers["Retry-After"] == str(max(1, round(expected)))
    status = (await (await client.get("/admin/models/m")).json())
    assert status["load_seconds_median"] == round(expected, 3)
