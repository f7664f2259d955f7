"""Corral's OpenAI port against fake llama-servers run as real child processes."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.app import CoreOptions, build_openai_app
from proxy.keys import SCHEDULER
from scheduler.process.instance import State
from tests.conftest import make_config, wait_for


def chat(model: str, stream: bool = False, **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}],
            "stream": stream, **kw}


async def sse_chunks(resp: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    out = []
    async for line in resp.content:
        line = line.strip()
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


async def test_models_lists_names_and_aliases(corral, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "a", "aliases": ["a1", "a2"]}, {"name": "b"}])
    client = await corral(cfg)
    resp = await client.get("/v1/models")
    assert resp.status == 200
    ids = [m["id"] for m in (await resp.json())["data"]]
    assert ids == ["a", "a1", "a2", "b"]
    # Listing must not launch anything.
    assert client.app[SCHEDULER].instances() == []


async def test_chat_launches_on_demand_and_answers(corral, tmp_path: Path) -> None:
    client = await corral(make_config(tmp_path, [{"name": "m", "aliases": ["alias"]}]))
    resp = await client.post("/v1/chat/completions", json=chat("alias"))
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "alias"
    assert body["choices"][0]["message"]["content"]
    insts = client.app[SCHEDULER].instances()
    assert [i.state for i in insts] == [State.READY]
    assert insts[0].in_flight == 0


async def test_streaming_is_relayed_chunk_by_chunk(corral, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "m", "env": {"FAKE_TOKEN_DELAY": "0.05"}}])
    client = await corral(cfg)
    resp = await client.post("/v1/chat/completions", json=chat("m", True, max_tokens=6))
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    loop = asyncio.get_running_loop()
    arrivals = []
    async for line in resp.content:
        if line.startswith(b"data: {"):
            arrivals.append(loop.time())
    # Six tokens 50 ms apart: had Corral buffered, they would arrive together.
    assert len(arrivals) >= 6
    assert arrivals[-1] - arrivals[0] > 0.2


async def test_unknown_model_is_404_with_known_names(corral, tmp_path: Path) -> None:
    client = await corral(make_config(tmp_path, [{"name": "m", "aliases": ["x"]}]))
    resp = await client.post("/v1/chat/completions", json=chat("nope"))
    assert resp.status == 404
    err = (await resp.json())["error"]
    assert err["code"] == "model_not_found"
    assert err["src"] == "corral"
    assert "'nope'" in err["message"] and "m, x" in err["message"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [(b"{not json", "not valid JSON"), (b"[1]", "JSON object"), (b"", "missing"),
     (b'{"messages": []}', "'model' is required")],
)
async def test_bad_requests_are_400_in_openai_shape(corral, tmp_path: Path, body: bytes,
                                                    needle: str) -> None:
    client = await corral(make_config(tmp_path, [{"name": "m"}]))
    resp = await client.post("/v1/chat/completions", data=body,
                             headers={"Content-Type": "application/json"})
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert needle in err["message"]
    assert err["type"] == "invalid_request_error"


async def test_unknown_route_is_json_404(corral, tmp_path: Path) -> None:
    client = await corral(make_config(tmp_path, [{"name": "m"}]))
    resp = await client.get("/v1/nothing")
    assert resp.status == 404
    assert "error" in await resp.json()


async def test_concurrent_callers_join_one_slow_launch(corral, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "m", "parallel": 4,
                                  "env": {"FAKE_LOAD_DELAY": "0.5"}}])
    client = await corral(cfg)
    resps = await asyncio.gather(
        *(client.post("/v1/chat/completions", json=chat("m")) for _ in range(4))
    )
    assert [r.status for r in resps] == [200] * 4
    insts = client.app[SCHEDULER].instances()
    assert len(insts) == 1
    assert insts[0].stats.served == 4


async def test_crash_at_start_fails_fast_with_log_lines(corral, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "m", "env": {"FAKE_CRASH_AT_START": "1"}}],
                      scheduler={"load_timeout": 30})
    client = await corral(cfg)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    resps = await asyncio.gather(
        *(client.post("/v1/chat/completions", json=chat("m")) for _ in range(3))
    )
    assert loop.time() - t0 < 10  # not the 30 s deadline
    for r in resps:
        assert r.status == 503
        err = (await r.json())["error"]
        assert err["code"] == "model_load_failed"
        assert "exited with status 1" in err["message"]
        assert "failed to load model" not in err["message"]  # the log is for /admin
    r = await client.get("/admin/models")
    detail = json.dumps(await r.json())
    assert "failed to load model" in detail  # the child's own words


async def test_hang_hits_the_load_deadline(corral, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "m", "env": {"FAKE_HANG": "1"}, "load_timeout": 1}])
    client = await corral(cfg)
    resp = await client.post("/v1/chat/completions", json=chat("m"))
    assert resp.status == 503
    assert "not ready after 1 s" in (await resp.json())["error"]["message"]
    await wait_for(lambda: client.app[SCHEDULER].instances() == [])


async def test_crash_mid_stream_ends_with_an_error_event(corral, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "m", "env": {"FAKE_CRASH_AFTER_CHUNKS": "2"}}])
    client = await corral(cfg)
    resp = await client.post("/v1/chat/completions", json=chat("m", True, max_tokens=10))
    assert resp.status == 200
    chunks = await sse_chunks(resp)
    assert "error" in chunks[-1]
    assert chunks[-1]["error"]["src"] == "corral"
    sched = client.app[SCHEDULER]
    await wait_for(lambda: sched.instances() == [])
    # The next call relaunches the model.
    resp = await client.post("/v1/chat/completions", json=chat("m", max_tokens=1))
    assert resp.status == 200


async def test_max_instances_one_swaps_models(corral, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "a"}, {"name": "b"}],
                      scheduler={"max_instances": 1})
    client = await corral(cfg)
    sched = client.app[SCHEDULER]
    for model in ("a", "b", "a"):
        resp = await client.post("/v1/chat/completions", json=chat(model))
        assert resp.status == 200
        alive = [i for i in sched.instances() if i.state is not State.STOPPED]
        assert len(alive) == 1 and alive[0].model == model


async def test_busy_instance_is_not_evicted_newcomer_waits(corral, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "a", "env": {"FAKE_TOKEN_DELAY": "0.1"}},
                                 {"name": "b"}], scheduler={"max_instances": 1})
    client = await corral(cfg)
    sched = client.app[SCHEDULER]
    slow = asyncio.ensure_future(client.post("/v1/chat/completions",
                                             json=chat("a", max_tokens=10)))
    await wait_for(lambda: any(i.in_flight for i in sched.instances()))
    fast = await client.post("/v1/chat/completions", json=chat("b"))
    # b could only start once a's call had finished.
    assert slow.done()
    assert (await slow).status == 200
    assert fast.status == 200


async def test_ttl_unloads_idle_instances(corral, tmp_path: Path) -> None:
    client = await corral(make_config(tmp_path, [{"name": "m", "ttl": 0.3}]))
    sched = client.app[SCHEDULER]
    assert (await client.post("/v1/chat/completions", json=chat("m"))).status == 200
    assert len(sched.instances()) == 1
    await wait_for(lambda: sched.instances() == [], within=5)


async def test_calls_beyond_slots_queue_then_run(corral, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "m", "parallel": 2,
                                  "env": {"FAKE_TOKEN_DELAY": "0.02"}}])
    client = await corral(cfg)
    resps = await asyncio.gather(
        *(client.post("/v1/chat/completions", json=chat("m", max_tokens=5)) for _ in range(8))
    )
    assert [r.status for r in resps] == [200] * 8
    inst = client.app[SCHEDULER].instances()[0]
    stats = await (await client.session.get(inst.base_url + "/fake/stats")).json()
    assert stats["max_concurrent"] == 2  # Corral never sent more than the slots


async def test_full_queue_answers_at_once_with_retry_after(corral, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "m", "env": {"FAKE_TOKEN_DELAY": "0.2"}}],
                      scheduler={"queue_size": 1})
    client = await corral(cfg)
    sched = client.app[SCHEDULER]
    first = asyncio.ensure_future(client.post("/v1/chat/completions",
                                              json=chat("m", max_tokens=5)))
    await wait_for(lambda: any(i.in_flight for i in sched.instances()))
    second = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat("m")))
    await wait_for(lambda: sched.model_status()[0]["queued"] == 1)
    third = await client.post("/v1/chat/completions", json=chat("m"))
    assert third.status == 503
    assert int(third.headers["Retry-After"]) >= 1
    assert (await third.json())["error"]["code"] == "overloaded"
    assert (await first).status == 200 and (await second).status == 200


async def test_disconnect_mid_stream_frees_the_slot(corral, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "m", "env": {"FAKE_TOKEN_DELAY": "0.05"}}])
    client = await corral(cfg)
    sched = client.app[SCHEDULER]
    # No loading feedback: on a busy machine the first line read would be its comment,
    # sent before the instance is ready.
    resp = await client.post("/v1/chat/completions", json=chat("m", True, max_tokens=200),
                             headers={"X-Corral-Loading": "off"})
    await resp.content.readline()
    # The first line may be loading feedback, sent before the lease while the fake
    # starts (seen on a loaded machine): the call is mid-stream once it holds the slot.
    await wait_for(lambda: [i.in_flight for i in sched.instances()] == [1], within=30)
    inst = sched.instances()[0]
    resp.close()  # the client goes away mid-stream
    await wait_for(lambda: inst.in_flight == 0, within=5)

    async def cancelled() -> int:
        r = await client.session.get(inst.base_url + "/fake/stats")
        return int((await r.json())["cancelled"])

    for _ in range(100):
        if await cancelled() == 1:
            break
        await asyncio.sleep(0.05)
    assert await cancelled() == 1  # the upstream saw the disconnect too


async def test_waiting_client_that_leaves_does_not_hold_a_place(corral, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "m", "env": {"FAKE_TOKEN_DELAY": "0.1"}}])
    client = await corral(cfg)
    sched = client.app[SCHEDULER]
    first = asyncio.ensure_future(client.post("/v1/chat/completions",
                                              json=chat("m", max_tokens=5)))
    await wait_for(lambda: any(i.in_flight for i in sched.instances()))
    waiting = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat("m")))
    await wait_for(lambda: sched.model_status()[0]["queued"] == 1)
    waiting.cancel()
    await wait_for(lambda: sched.model_status()[0]["queued"] == 0)
    assert (await first).status == 200
    await wait_for(lambda: sched.instances()[0].in_flight == 0)


async def test_api_key_required_except_health(corral, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "m"}], server={"api_keys": ["s3cret", "other"]})
    client = await corral(cfg)
    assert (await client.get("/health")).status == 200
    resp = await client.get("/v1/models")
    assert resp.status == 401
    assert (await resp.json())["error"]["type"] == "authentication_error"
    assert (await client.get("/v1/models", headers={"Authorization": "Bearer nope"})).status == 401
    assert (await client.get("/v1/models",
                             headers={"Authorization": "Bearer s3cret"})).status == 200
    assert (await client.get("/v1/models", headers={"X-API-Key": "other"})).status == 200


async def test_embeddings_are_forwarded(corral, tmp_path: Path) -> None:
    client = await corral(make_config(tmp_path, [{"name": "e", "embedding": True}]))
    resp = await client.post("/v1/embeddings", json={"model": "e", "input": ["a", "b"]})
    assert resp.status == 200
    assert len((await resp.json())["data"]) == 2


async def test_shutdown_stops_every_child(aiohttp_client: Any, fake_llama: Path,
                                          tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "a"}, {"name": "b"}])
    app = build_openai_app(cfg, CoreOptions(find_binary=lambda _: fake_llama))
    client = await aiohttp_client(app)
    for model in ("a", "b"):
        assert (await client.post("/v1/chat/completions", json=chat(model))).status == 200
    pids = [i.pid for i in app[SCHEDULER].instances()]
    assert len(pids) == 2
    await client.close()
    for pid in pids:
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped: not even a zombie is left
