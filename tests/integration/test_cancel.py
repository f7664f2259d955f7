"""Cancel by id (issue 27): ``POST /admin/requests/{id}/cancel`` ends a call in flight on
any port, stream or not, queued or generating; its client gets a clean error in its
dialect, the upstream connection is closed (the fake's slot is free again), the lease
is released. Against fake llama-servers that generate slowly (FAKE_TOKEN_DELAY)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from proxy.keys import CALLS, SCHEDULER
from proxy.ops.inflight import cancel
from tests.conftest import make_config, wait_for

SLOW = {"FAKE_TOKEN_DELAY": "0.05"}
LONG = 2000  # tokens: 100 s at the fake's pace, far past any bound here


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "go on"}],
            "max_tokens": LONG, **kw}


async def in_flight(client: Any, rid: str, answering: bool) -> None:
    async def seen() -> bool:
        body = await (await client.get("/admin/requests")).json()
        return any(e["request_id"] == rid and e["answering"] == answering
                   for e in body["in_flight"])
    for _ in range(500):
        if await seen():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{rid} never in flight")


async def slots_idle(client: Any) -> bool:
    slots = await (await client.get("/upstream/m/slots")).json()
    return not any(s["is_processing"] for s in slots)


def in_use(client: Any) -> int:
    return sum(i.in_flight for i in client.app[SCHEDULER].instances())


async def wait_idle(client: Any) -> None:
    for _ in range(250):
        if await slots_idle(client) and in_use(client) == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the slot or the lease is still held")


async def test_cancel_a_stream_mid_answer(corral_ports: Any, tmp_path: Path) -> None:
    ports = await corral_ports(make_config(tmp_path, [{"name": "m", "env": SLOW}]))
    main = ports.openai

    async def read() -> str:
        resp = await main.post("/v1/chat/completions", json=chat(stream=True),
                               headers={"X-Request-Id": "stream-1"})
        assert resp.status == 200
        return await resp.text()

    reader = asyncio.create_task(read())
    await in_flight(main, "stream-1", answering=True)
    ok = await main.post("/admin/requests/stream-1/cancel")
    assert ok.status == 200 and (await ok.json())["cancelled"] is True
    text = await asyncio.wait_for(reader, 10)
    last = [ln for ln in text.splitlines() if ln.startswith("data: ")][-1]
    assert "cancelled by an operator" in json.loads(last[6:])["error"]["message"]
    await wait_idle(main)
    # Gone from the table: a second cancel finds nothing.
    assert (await main.post("/admin/requests/stream-1/cancel")).status == 404
    assert not main.app[CALLS].calls


async def test_cancel_a_call_that_waits_for_its_whole_answer(
    corral_ports: Any, tmp_path: Path
) -> None:
    ports = await corral_ports(make_config(tmp_path, [{"name": "m", "env": SLOW}]))
    main = ports.openai
    call = asyncio.create_task(main.post("/v1/chat/completions", json=chat(),
                                         headers={"X-Request-Id": "whole-1"}))
    await in_flight(main, "whole-1", answering=False)
    await wait_for(lambda: in_use(main) == 1)  # leased: the upstream is generating
    assert cancel(main.app, "whole-1")
    resp = await asyncio.wait_for(call, 10)
    assert resp.status == 499
    body = await resp.json()
    assert body["error"]["code"] == "cancelled"
    await wait_idle(main)
    metrics = await (await main.get("/metrics")).text()
    assert any('status="499"' in ln and "/v1/chat/completions" in ln
               for ln in metrics.splitlines() if ln.startswith("corral_requests_total"))


async def test_cancel_a_queued_call_leaves_the_running_one(
    corral_ports: Any, tmp_path: Path
) -> None:
    ports = await corral_ports(make_config(tmp_path, [{"name": "m", "env": SLOW}]))
    main = ports.openai
    running = asyncio.create_task(main.post("/v1/chat/completions", json=chat(max_tokens=40),
                                            headers={"X-Request-Id": "first"}))
    await wait_for(lambda: in_use(main) == 1)
    queued = asyncio.create_task(main.post("/v1/chat/completions", json=chat(),
                                           headers={"X-Request-Id": "second"}))
    await in_flight(main, "second", answering=False)
    assert cancel(main.app, "second")
    resp = await asyncio.wait_for(queued, 10)
    assert resp.status == 499
    first = await asyncio.wait_for(running, 30)
    assert first.status == 200  # the other call was left alone


async def test_cancel_on_the_ollama_port_ends_its_stream_in_its_dialect(
    corral_ports: Any, tmp_path: Path
) -> None:
    ports = await corral_ports(make_config(tmp_path, [{"name": "m", "env": SLOW}]))

    async def read() -> str:
        resp = await ports.ollama.post("/api/chat", headers={"X-Request-Id": "ollama-1"}, json={
            "model": "m", "messages": [{"role": "user", "content": "go on"}],
            "options": {"num_predict": LONG}})
        assert resp.status == 200
        return await resp.text()

    reader = asyncio.create_task(read())
    await in_flight(ports.openai, "ollama-1", answering=True)
    assert cancel(ports.openai.app, "ollama-1")
    lines = [json.loads(ln) for ln in (await asyncio.wait_for(reader, 10)).splitlines()]
    assert "cancelled by an operator" in lines[-1]["error"]
    await wait_idle(ports.openai)
    # Not streamed: a 499 in Ollama's envelope.
    call = asyncio.create_task(ports.ollama.post("/api/chat", headers={
        "X-Request-Id": "ollama-2"}, json={"model": "m", "stream": False, "messages": [
            {"role": "user", "content": "go on"}], "options": {"num_predict": LONG}}))
    await in_flight(ports.openai, "ollama-2", answering=False)
    assert cancel(ports.openai.app, "ollama-2")
    resp = await asyncio.wait_for(call, 10)
    assert resp.status == 499 and "cancelled" in (await resp.json())["error"]


async def test_cancel_of_an_unknown_id_is_a_404(corral: Any, tmp_path: Path) -> None:
    client = await corral(make_config(tmp_path, [{"name": "m"}]))
    resp = await client.post("/admin/requests/nobody/cancel")
    assert resp.status == 404
    assert not cancel(client.app, "nobody")


async def test_cancel_a_stream_still_waiting_behind_its_loading_feedback(
    corral_ports: Any, tmp_path: Path
) -> None:
    ports = await corral_ports(make_config(tmp_path, [{"name": "m", "env": SLOW}]))
    main = ports.openai
    running = asyncio.create_task(main.post("/v1/chat/completions", json=chat(max_tokens=200),
                                            headers={"X-Request-Id": "busy"}))
    await wait_for(lambda: in_use(main) == 1)
    resp = await main.post("/v1/chat/completions", json=chat(stream=True),
                           headers={"X-Request-Id": "waiting"})
    assert resp.status == 200  # the feedback's headers: ": waiting for a free slot ..."
    first = await asyncio.wait_for(resp.content.readline(), 10)
    assert first.startswith(b": waiting")
    assert cancel(main.app, "waiting")
    rest = (await asyncio.wait_for(resp.read(), 10)).decode()
    event = [ln for ln in rest.splitlines() if ln.startswith("data: ")][-1]
    assert json.loads(event[6:])["error"]["code"] == "cancelled"
    assert cancel(main.app, "busy")
    assert (await asyncio.wait_for(running, 10)).status == 499
