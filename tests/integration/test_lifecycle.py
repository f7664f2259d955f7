"""Model lifecycle on the admin API: load cost in the wait (issue 27), operations,
cancel, replicas, events (issue 28)."""

from __future__ import annotations

import asyncio
import json
import os
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


async def follow(client, op_id: str, until: set[str], within: float = 10.0) -> dict:
    """GET the operation until its state is one of ``until`` (bounded in time)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        op = await (await client.get(f"/admin/operations/{op_id}")).json()
        if op["state"] in until:
            return op
        assert loop.time() < deadline, op
        await asyncio.sleep(0.05)


async def test_load_answers_at_once_and_the_operation_goes_loading_then_ready(
    corral, tmp_path: Path
) -> None:
    cfg = make_config(tmp_path, [{"name": "m", "env": {"FAKE_LOAD_DELAY": "1.0"}}])
    client = await corral(cfg)
    resp = await client.post("/admin/models/m/load")
    assert resp.status == 202
    op = (await resp.json())["operation"]
    assert op["model"] == "m" and op["state"] in ("queued", "loading")
    loading = await follow(client, op["id"], {"loading", "ready"})
    assert loading["state"] == "loading"
    assert loading["estimate"]["remaining_seconds"] >= 1.0
    ready = await follow(client, op["id"], {"ready", "failed", "cancelled"})
    assert ready["state"] == "ready" and ready["instance"].startswith("m#")
    # A second load of a model whose operation is done starts a new one, ready at once.
    again = await (await client.post("/admin/models/m/load")).json()
    assert (await follow(client, again["operation"]["id"], {"ready"}))["state"] == "ready"
    listed = await (await client.get("/admin/operations")).json()
    assert {o["id"] for o in listed["operations"]} >= {op["id"], again["operation"]["id"]}


async def test_cancel_of_a_slow_launch_frees_it_and_answers_its_waiters_in_their_dialect(
    corral_ports, tmp_path: Path
) -> None:
    cfg = make_config(tmp_path, [{"name": "m", "env": {"FAKE_HANG": "1"}}],
                      scheduler={"load_timeout": 60})
    ports = await corral_ports(cfg)
    client = ports.openai
    sched = client.app[SCHEDULER]
    op = (await (await client.post("/admin/models/m/load")).json())["operation"]
    openai_call = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat("m")))
    ollama_call = asyncio.ensure_future(ports.ollama.post("/api/chat", json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False}))
    await follow(client, op["id"], {"loading"})
    for _ in range(250):
        inst = sched.instances()[0]
        if inst.pid is not None and sched.model_status()[0]["queued"] >= 3:
            break
        await asyncio.sleep(0.02)
    pid = inst.pid
    assert pid is not None
    used = sched._snapshot().instances
    assert sum(i.footprint for i in used) > 0
    resp = await client.post("/admin/models/m/cancel")
    assert resp.status == 200
    body = await resp.json()
    assert body["cancelled_launches"] == [inst.id]
    # Each waiter ends at once with a clean error in its own dialect.
    got = await openai_call
    assert got.status == 503
    assert (await got.json())["error"]["code"] == "model_load_cancelled"
    got = await ollama_call
    assert got.status == 503 and "cancelled" in (await got.json())["error"]
    assert (await follow(client, op["id"], {"cancelled", "failed", "ready"}))["state"] == \
        "cancelled"
    # The child is gone and its room given back; a cancel is no launch failure.
    for _ in range(250):
        if not sched.instances():
            break
        await asyncio.sleep(0.02)
    assert sched.instances() == [] and sched._snapshot().instances == []
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive
    status = (await (await client.get("/admin/models/m")).json())
    assert status["failures"] == 0 and status["last_error"] is None
    assert status["state"] == "not-loaded"


async def test_a_replica_added_and_removed_under_load_fails_no_call(
    corral, tmp_path: Path
) -> None:
    cfg = make_config(tmp_path, [{"name": "m", "parallel": 1,
                                  "env": {"FAKE_TOKEN_DELAY": "0.02"}}],
                      scheduler={"max_instances": 4})
    client = await corral(cfg)
    sched = client.app[SCHEDULER]
    assert (await client.post("/admin/models/m/load?wait=1")).status == 200

    async def calls() -> list[int]:
        out = []
        for _ in range(12):
            r = await client.post("/v1/chat/completions", json=chat("m", max_tokens=4))
            out.append(r.status)
        return out

    load = [asyncio.ensure_future(calls()) for _ in range(3)]
    added = await (await client.post("/admin/models/m/replicas")).json()
    assert added["instance"] is not None
    for _ in range(250):
        if len([i for i in sched.loaded("m") if i.state.value == "ready"]) == 2:
            break
        await asyncio.sleep(0.02)
    assert len(sched.loaded("m")) == 2
    # Both replicas serve while the load runs; then one drains away.
    removed = await client.post("/admin/models/m/replicas/remove")
    assert removed.status == 200
    assert (await removed.json())["remaining_replicas"] == 1
    statuses = [s for batch in await asyncio.gather(*load) for s in batch]
    assert statuses == [200] * len(statuses)
    for _ in range(250):
        if len(sched.loaded("m")) == 1:
            break
        await asyncio.sleep(0.02)
    assert len(sched.loaded("m")) == 1
    # The replica asked for is kept, not expired: an unload forgets it.
    assert sched.model_status()[0]["replicas"]["wanted"] == 1
    await sched.unload("m")
    assert sched.model_status()[0]["replicas"]["wanted"] is None


async def test_removing_a_replica_that_is_not_there_is_a_clean_400(corral, tmp_path: Path
                                                                   ) -> None:
    client = await corral(make_config(tmp_path, [{"name": "m"}]))
    resp = await client.post("/admin/models/m/replicas/remove")
    assert resp.status == 400
    assert "no running replica" in (await resp.json())["error"]["message"]


async def test_the_event_stream_follows_a_model_through_a_load(corral, tmp_path: Path
                                                               ) -> None:
    client = await corral(make_config(tmp_path, [{"name": "m"}]))
    resp = await client.get("/admin/models/m/events")
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    seen: list[tuple[str, dict]] = []

    async def read() -> None:
        event = ""
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                seen.append((event, json.loads(line[6:])))
                if event == "state" and seen[-1][1]["state"] == "loaded":
                    return

    reader = asyncio.ensure_future(read())
    for _ in range(100):
        if seen:
            break
        await asyncio.sleep(0.02)
    assert seen[0] == ("state", seen[0][1]) and seen[0][1]["state"] == "not-loaded"
    await client.post("/admin/models/m/load")
    await asyncio.wait_for(reader, 10)
    resp.close()
    kinds = [e for e, _ in seen]
    assert "scheduler" in kinds  # the launch event
    assert seen[-1][1]["instances"][0]["state"] == "ready"


async def test_a_replica_with_no_room_waits_for_it(corral, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "m", "env": {"FAKE_TOKEN_DELAY": "0.05"}},
                                 {"name": "busy", "env": {"FAKE_TOKEN_DELAY": "0.05"}}],
                      scheduler={"max_instances": 2})
    client = await corral(cfg)
    sched = client.app[SCHEDULER]
    assert (await client.post("/admin/models/m/load?wait=1")).status == 200
    assert (await client.post("/admin/models/busy/load?wait=1")).status == 200
    running = asyncio.ensure_future(client.post("/v1/chat/completions",
                                                json=chat("busy", max_tokens=40)))
    for _ in range(250):
        if any(i.in_flight for i in sched.loaded("busy")):
            break
        await asyncio.sleep(0.02)
    resp = await client.post("/admin/models/m/replicas")
    assert resp.status == 202
    assert (await resp.json())["pending"] is True
    assert len(sched.loaded("m")) == 1  # nothing busy was evicted for it
    assert (await running).status == 200
    # Room frees when the other model goes: the wanted replica launches then.
    await sched.unload("busy")
    for _ in range(500):
        if len(sched.loaded("m")) == 2:
            break
        await asyncio.sleep(0.02)
    assert len(sched.loaded("m")) == 2


async def test_a_launch_stopped_on_purpose_is_no_failure_and_its_waiters_wait_on(
    corral, tmp_path: Path
) -> None:
    # An unload (or a restart, a config change) while a launch runs: the calls that
    # waited for it are served by the next launch instead of failing "while loading".
    cfg = make_config(tmp_path, [{"name": "m", "env": {"FAKE_LOAD_DELAY": "0.5"}}])
    client = await corral(cfg)
    sched = client.app[SCHEDULER]
    call = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat("m")))
    for _ in range(250):
        if sched.instances() and sched.instances()[0].pid is not None:
            break
        await asyncio.sleep(0.02)
    first = sched.instances()[0].id
    assert await sched.unload("m") == 1
    resp = await call
    assert resp.status == 200
    assert [i.id for i in sched.loaded("m")] != [first]
    status = (await (await client.get("/admin/models/m")).json())
    assert status["failures"] == 0 and status["last_error"] is None
