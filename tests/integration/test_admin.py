"""The admin API and the dashboard's files, on the main port, against fake
llama-servers run as real child processes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from proxy.keys import SCHEDULER
from proxy.ops.admin import LogCursor
from tests.conftest import make_config, wait_for


def chat(model: str, **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], **kw}


async def get_json(client: TestClient, path: str, status: int = 200, **kw: Any) -> Any:
    resp = await client.get(path, **kw)
    assert resp.status == status, await resp.text()
    return await resp.json()


async def post_json(client: TestClient, path: str, status: int = 200, **kw: Any) -> Any:
    resp = await client.post(path, **kw)
    assert resp.status == status, await resp.text()
    return await resp.json()


def states(client: TestClient) -> dict[str, str]:
    return {str(m["name"]): str(m["state"]) for m in client.app[SCHEDULER].model_status()}


async def test_models_and_instances_show_state_load_memory_and_queue(
    corral: Any, tmp_path: Path
) -> None:
    client = await corral(
        make_config(tmp_path, [{"name": "a", "aliases": ["x"], "parallel": 2}, {"name": "b"}])
    )
    body = await get_json(client, "/admin/models")
    assert [(m["name"], m["state"], m["queued"]) for m in body["models"]] == [
        ("a", "not-loaded", 0),
        ("b", "not-loaded", 0),
    ]
    assert body["models"][0]["aliases"] == ["x"]
    assert body["models"][0]["parallel"] == 2

    loaded = await post_json(client, "/admin/models/x/load?wait=1")  # an alias resolves
    assert loaded["model"] == "a"
    one = await get_json(client, "/admin/models/a")
    assert one["state"] == "loaded"
    (inst,) = one["instances"]
    assert inst["id"] == loaded["instance"]
    assert inst["slots"] == 2 and inst["in_flight"] == 0 and inst["load"] == 0
    assert inst["resident_memory_bytes"] > 0

    insts = (await get_json(client, "/admin/instances"))["instances"]
    assert [i["id"] for i in insts] == [inst["id"]]
    # Instance ids hold a "#": clients send it as %23.
    single = await get_json(client, f"/admin/instances/{quote(inst['id'])}")
    assert single["pid"] == inst["pid"]

    err = await get_json(client, "/admin/models/nope", status=404)
    assert err["error"]["code"] == "model_not_found"
    err = await get_json(client, "/admin/instances/nope%231", status=404)
    assert "nope#1" in err["error"]["message"]


async def test_load_unload_restart_reset_and_drain(corral: Any, tmp_path: Path) -> None:
    cfg = make_config(
        tmp_path,
        [{"name": "a"}, {"name": "b"}, {"name": "bad", "env": {"FAKE_CRASH_AT_START": "1"}}],
    )
    client = await corral(cfg)
    first = await post_json(client, "/admin/models/a/load?wait=1")
    restarted = await post_json(client, "/admin/models/a/restart?wait=1")
    assert restarted["stopping"] == 1
    assert restarted["instance"] != first["instance"]
    assert states(client)["a"] == "loaded"
    # Without wait, at once: the drain begun and a load to follow.
    again = await post_json(client, "/admin/models/a/restart", status=202)
    assert again["stopping"] == 1 and again["operation"]["kind"] == "load"
    op_id = again["operation"]["id"]

    async def ready() -> bool:
        op = await (await client.get(f"/admin/operations/{op_id}")).json()
        return bool(op["state"] == "ready" and op["instance"] not in
                    (first["instance"], restarted["instance"]))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not await ready():
        assert loop.time() < deadline
        await asyncio.sleep(0.02)

    unloaded = await post_json(client, "/admin/models/a/unload")
    assert unloaded == {"model": "a", "stopping": 1}
    await wait_for(lambda: states(client)["a"] == "not-loaded")

    await post_json(client, "/admin/models/bad/load?wait=1", status=503)
    assert states(client)["bad"] == "failed"
    assert await post_json(client, "/admin/models/bad/reset") == {"model": "bad", "reset": True}
    assert states(client)["bad"] == "not-loaded"

    await post_json(client, "/admin/models/a/load?wait=1")
    await post_json(client, "/admin/models/b/load?wait=1")
    drained = await post_json(client, "/admin/drain")
    assert drained["stopping"] == {"a": 1, "b": 1, "bad": 0}
    await wait_for(lambda: not client.app[SCHEDULER].instances())


async def test_unload_drains_running_calls(corral: Any, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "a", "env": {"FAKE_TOKEN_DELAY": "0.05"}}])
    client = await corral(cfg)
    call = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat("a", max_tokens=8)))
    await wait_for(lambda: any(i.in_flight for i in client.app[SCHEDULER].instances()))
    await post_json(client, "/admin/models/a/drain")
    resp = await call
    assert resp.status == 200  # the running call finished
    assert (await resp.json())["usage"]["completion_tokens"] == 8
    await wait_for(lambda: not client.app[SCHEDULER].instances())


async def test_logs_tail_and_follow(corral: Any, tmp_path: Path) -> None:
    client = await corral(make_config(tmp_path, [{"name": "a"}]))
    iid = quote((await post_json(client, "/admin/models/a/load?wait=1"))["instance"])
    tail = await get_json(client, f"/admin/instances/{iid}/logs?tail=3")
    assert tail["instance"] == "a#1" and 0 < len(tail["lines"]) <= 3
    await get_json(client, f"/admin/instances/{iid}/logs?tail=x", status=400)

    resp = await client.get(f"/admin/instances/{iid}/logs?follow=1&tail=1")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    seen: list[str] = []

    async def read_until(pred: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not pred():
                line = (await resp.content.readline()).decode().rstrip("\n")
                seen.append(line)

    await read_until(lambda: any(s.startswith("data: ") for s in seen))
    assert (await client.post("/v1/chat/completions", json=chat("a"))).status == 200
    # The fake logs one line per request it serves.
    await read_until(lambda: any("POST /v1/chat/completions" in s for s in seen))
    await post_json(client, "/admin/models/a/unload")
    await read_until(lambda: "event: end" in seen)
    await read_until(lambda: resp.content.at_eof() or seen[-1].startswith("data: instance"))


async def test_followed_log_ends_when_corral_shuts_down(corral: Any, tmp_path: Path) -> None:
    client = await corral(make_config(tmp_path, [{"name": "a"}]))
    iid = quote((await post_json(client, "/admin/models/a/load?wait=1"))["instance"])
    resp = await client.get(f"/admin/instances/{iid}/logs?follow=1")
    await resp.content.readline()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    # The drain timeout is 5 s in these configs: the stream must not hold shutdown.
    await asyncio.wait_for(client.close(), timeout=5)
    assert loop.time() - t0 < 4


def test_log_cursor_finds_new_lines_after_rotation() -> None:
    from collections import deque

    ring: deque[str] = deque(maxlen=4)
    cursor = LogCursor(ring)
    assert cursor.new_lines() == []
    for i in range(3):
        ring.append(f"line {i}")
    assert cursor.tail(2) == ["line 1", "line 2"]
    assert cursor.new_lines() == []
    ring.append("")  # a shared object: identity alone is not enough
    ring.append("")
    assert cursor.new_lines() == ["", ""]
    for i in range(3, 9):  # more than the ring holds
        ring.append(f"line {i}")
    assert cursor.new_lines() == ["line 5", "line 6", "line 7", "line 8"]
    ring.append("line 9")
    assert cursor.new_lines() == ["line 9"]


async def test_recent_requests_and_events(corral: Any, tmp_path: Path) -> None:
    client = await corral(make_config(tmp_path, [{"name": "a", "aliases": ["x"]}]))
    ok = await client.post("/v1/chat/completions", json=chat("x"))
    bad = await client.post("/v1/chat/completions", json=chat("nope"))
    await get_json(client, "/admin/models")  # admin calls stay out of the ring
    rows = (await get_json(client, "/admin/requests"))["requests"]
    assert [(r["model"], r["status"], r["request_id"]) for r in rows] == [
        ("", 404, bad.headers["X-Request-Id"]),
        ("a", 200, ok.headers["X-Request-Id"]),
    ]
    assert rows[1]["dialect"] == "openai"
    assert rows[1]["endpoint"] == "/v1/chat/completions"
    assert rows[1]["method"] == "POST"
    assert rows[1]["duration_seconds"] > 0
    assert len((await get_json(client, "/admin/requests?limit=1"))["requests"]) == 1

    events = (await get_json(client, "/admin/events"))["events"]
    assert events[0]["event"] == "launched" and events[0]["model"] == "a"

    overview = await get_json(client, "/admin/overview")
    assert overview["models"][0]["name"] == "a"
    assert overview["requests"][0]["status"] == 404
    assert overview["memory"]["total_bytes"] > 0
    assert overview["config"]["reload_success"] is True


async def test_admin_metrics_and_dashboard_with_an_api_key(corral: Any, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "a"}], server={"api_keys": ["sekret"]})
    client = await corral(cfg)
    for path in ("/admin/models", "/admin/config", "/metrics", "/admin/overview"):
        assert (await client.get(path)).status == 401, path
    auth = {"Authorization": "Bearer sekret"}
    assert (await client.get("/admin/models", headers=auth)).status == 200
    assert (await client.get("/metrics", headers=auth)).status == 200
    cfg_view = await get_json(client, "/admin/config", headers=auth)
    assert cfg_view["config"]["server"]["api_keys"] == ["<redacted>"]
    assert "sekret" not in str(cfg_view)

    # The page and its files hold no data: they load without the key, then ask for it.
    for path in ("/", "/dashboard"):
        resp = await client.get(path, allow_redirects=False)
        assert resp.status == 302 and resp.headers["Location"] == "/dashboard/"
    page = await client.get("/", allow_redirects=True)
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "/dashboard/app.js" in await page.text()
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        resp = await client.get(f"/dashboard/{name}")
        assert resp.status == 200 and resp.headers["Content-Type"].startswith(kind)
    assert (await client.get("/dashboard/secret.txt")).status == 401
    assert (await client.get("/dashboard/secret.txt", headers=auth)).status == 404


async def test_config_without_a_file(corral: Any, tmp_path: Path) -> None:
    client = await corral(
        make_config(tmp_path, [{"name": "a"}], server={"admin_config_write": True})
    )
    body = await get_json(client, "/admin/config")
    assert body["path"] is None and body["last_reload_error"] is None
    assert body["config"]["models"][0]["name"] == "a"
    err = await post_json(client, "/admin/config/reload", status=409)
    assert err["error"]["code"] == "no_config_file"
    resp = await client.put("/admin/config", data="[server]\n",
                            headers={"Content-Type": "application/toml"})
    assert resp.status == 409
    assert (await client.get("/admin/config/file")).status == 404


async def test_unknown_admin_route_is_json_404(corral: Any, tmp_path: Path) -> None:
    client = await corral(make_config(tmp_path, [{"name": "a"}]))
    resp = await client.get("/admin/nothing")
    assert resp.status == 404
    assert "error" in await resp.json()
    with pytest.raises(aiohttp.ContentTypeError):
        await (await client.get("/dashboard/", headers={"Accept": "text/html"})).json()
