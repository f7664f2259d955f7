"""Raw passthrough (issue 27): ``/upstream/{model}/{path}`` reaches the model's own
server, any method and websockets, admin keys only; launches the model on use unless
``passthrough_launch = "root"`` keeps that to the root page; takes no slot; counts as
use for the TTL; refused for a remote unless its table allows it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.keys import SCHEDULER
from scheduler.process.instance import State
from tests.conftest import make_config, wait_for

BOSS = "sk-boss-0123456789"
ALICE = "sk-alice-abcdefghij"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def ready(client: Any, model: str) -> int:
    return sum(1 for i in client.app[SCHEDULER].instances()
               if i.model == model and i.state is State.READY)


async def test_pages_and_props_launch_the_model_and_need_an_admin_key(
    corral: Any, tmp_path: Path
) -> None:
    client = await corral(make_config(
        tmp_path, [{"name": "hf.co/u/r:Q4"}, {"name": "m"}],
        keys=[{"name": "boss", "key": BOSS, "admin": True}, {"name": "alice", "key": ALICE}]))
    assert ready(client, "m") == 0
    page = await client.get("/upstream/m/", headers=auth(BOSS))
    assert page.status == 200 and page.content_type == "text/html"
    assert "llama.cpp" in await page.text()
    assert ready(client, "m") == 1  # launched on use
    props = await client.get("/upstream/m/props", headers=auth(BOSS))
    assert props.status == 200 and "default_generation_settings" in await props.json()
    # Any method; a name with slashes is found whole.
    posted = await client.post("/upstream/hf.co/u/r:Q4/tokenize", json={"content": "a b c"},
                               headers=auth(BOSS))
    assert posted.status == 200 and len((await posted.json())["tokens"]) == 3
    # The root without its slash is sent to it (its pages link relative to it).
    bare = await client.get("/upstream/m", headers=auth(BOSS), allow_redirects=False)
    assert bare.status == 308 and bare.headers["Location"] == "/upstream/m/"
    for key, status in ((ALICE, 403), (None, 401)):
        resp = await client.get("/upstream/m/props", headers=auth(key) if key else {})
        assert resp.status == status
    unknown = await client.get("/upstream/nope/props", headers=auth(BOSS))
    assert unknown.status == 404


async def test_root_only_launch_and_use_counts_for_the_ttl(corral: Any, tmp_path: Path) -> None:
    client = await corral(make_config(tmp_path, [{"name": "m", "passthrough_launch": "root"}]))
    refused = await client.get("/upstream/m/props")
    assert refused.status == 409 and "only /upstream/m/" in await refused.text()
    assert ready(client, "m") == 0  # an asset's request did not load it
    assert (await client.get("/upstream/m/")).status == 200
    assert ready(client, "m") == 1
    (inst,) = client.app[SCHEDULER].instances()
    before = inst.last_used
    await asyncio.sleep(0.01)
    assert (await client.get("/upstream/m/props")).status == 200
    assert inst.last_used > before


async def test_slots_are_read_while_every_slot_is_busy(corral: Any, tmp_path: Path) -> None:
    client = await corral(make_config(tmp_path, [
        {"name": "m", "env": {"FAKE_TOKEN_DELAY": "0.05"}}]))
    call = asyncio.create_task(client.post("/v1/chat/completions", json={
        "model": "m", "max_tokens": 60, "messages": [{"role": "user", "content": "hi"}]}))
    await wait_for(lambda: sum(i.in_flight for i in client.app[SCHEDULER].instances()) == 1)
    slots = await asyncio.wait_for(client.get("/upstream/m/slots"), 5)
    assert any(s["is_processing"] for s in await slots.json())  # not queued behind it
    assert (await call).status == 200


def remote_app() -> web.Application:
    async def props(request: web.Request) -> web.Response:
        return web.json_response({"remote": True, "auth": request.headers.get("Authorization")})

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
        return ws

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/props", props)
    app.router.add_get("/ws", echo)
    app.router.add_get("/health", health)
    return app


async def test_remotes_only_when_allowed_and_websockets(
    corral: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    remote = await aiohttp_server(remote_app())
    url = str(remote.make_url("")).rstrip("/")
    client = await corral(make_config(tmp_path, [
        {"name": "closed", "remotes": [url]},
        {"name": "open", "remotes": [{"url": url, "passthrough": True, "api_key": "sk-up"}]}]))
    refused = await client.get("/upstream/closed/props")
    assert refused.status == 403 and "passthrough = true" in await refused.text()
    resp = await client.get("/upstream/open/props")
    assert resp.status == 200
    # The remote's own key goes with the call; the caller's never does.
    assert await resp.json() == {"remote": True, "auth": "Bearer sk-up"}
    async with client.ws_connect("/upstream/open/ws") as ws:
        await ws.send_str("hi")
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.data == "echo:hi"
