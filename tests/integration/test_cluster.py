"""A cluster in one process: node Corrals around fake llama-servers on real sockets,
and a front routing to them (scheduler/cluster, proxy/ops/cluster.py).

The network-namespace tests (test_cluster_netns.py) run the same roles as separate
processes on separate links; these check the routing rules quickly."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.app import CoreOptions, build_openai_app, port_app
from proxy.keys import SCHEDULER
from scheduler.config.root import CorralConfig
from tests.conftest import make_config, wait_for

TOKEN = "t0ken-for-the-cluster-tests"
FAST = {"scheduler": {"max_instances": 4, "queue_timeout": 20}}


def node_cfg(tmp_path: Path, name: str, models: list[dict[str, Any]],
             **extra: Any) -> CorralConfig:
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    return make_config(d, models, cluster={"role": "node", "token": TOKEN,
                                           "drain_settle": 0.5}, **extra)


def front_cfg(tmp_path: Path, urls: list[str], **extra: Any) -> CorralConfig:
    return make_config(tmp_path, [], cluster={
        "role": "front", "token": TOKEN, "nodes": urls, "poll_interval": 0.2,
        "connect_timeout": 1.0}, **extra)


class Cluster:
    def __init__(self, nodes: list[Any], front: Any, ollama: Any, lmstudio: Any) -> None:
        self.nodes = nodes  # TestServers
        self.urls = [str(n.make_url("")).rstrip("/") for n in nodes]
        self.front = front
        self.ollama = ollama
        self.lmstudio = lmstudio

    def node_app(self, i: int) -> web.Application:
        return self.nodes[i].app  # type: ignore[no-any-return]

    def url(self, i: int) -> str:
        return self.urls[i]

    def served(self) -> dict[str, int]:
        """Calls the front sent to each node (by node index), attempts that failed
        to connect included."""
        out = {str(i): 0 for i in range(len(self.nodes))}
        urls = {self.url(i): str(i) for i in range(len(self.nodes))}
        for r in self.front.app[SCHEDULER].remotes():
            out[urls[r.base_url]] += r.served
        return out

    def node_instances(self, i: int) -> list[Any]:
        return list(self.node_app(i)[SCHEDULER].instances())


@pytest.fixture
def cluster(aiohttp_server: Any, aiohttp_client: Any, fake_llama: Path,
            tmp_path: Path) -> Callable[..., Any]:
    opts = CoreOptions(find_binary=lambda _: fake_llama, reap_interval=0.05)

    async def start(node_models: list[list[dict[str, Any]]], **front_extra: Any) -> Cluster:
        servers = []
        for i, models in enumerate(node_models):
            cfg = node_cfg(tmp_path, f"node{i}", models, **FAST)
            servers.append(await aiohttp_server(build_openai_app(cfg, opts)))
        urls = [str(s.make_url("")).rstrip("/") for s in servers]
        core = build_openai_app(front_cfg(tmp_path, urls, **front_extra), opts)
        front = await aiohttp_client(core)
        ollama = await aiohttp_client(port_app(core, "ollama"))
        lmstudio = await aiohttp_client(port_app(core, "lmstudio"))
        return Cluster(servers, front, ollama, lmstudio)

    return start


def chat(model: str, text: str = "hello there", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **kw}


SLOW = {"FAKE_TOKEN_DELAY": "0.05"}


async def test_front_lists_the_union_of_node_models_on_every_port(cluster: Any) -> None:
    c = await cluster([[{"name": "alpha", "aliases": ["a1", "only-here"]}], [{"name": "beta"}],
                       [{"name": "alpha", "aliases": ["a1"]},
                        {"name": "gamma", "embedding": True}]])
    resp = await c.front.get("/v1/models")
    ids = {m["id"] for m in (await resp.json())["data"]}
    assert {"alpha", "beta", "gamma"} <= ids
    tags = await (await c.ollama.get("/api/tags")).json()
    assert {"alpha", "beta", "gamma"} <= {m["name"].split(":")[0] for m in tags["models"]}
    # An Ollama call is translated at the front and served by a node.
    resp = await c.ollama.post("/api/chat", json={
        "model": "beta", "messages": [{"role": "user", "content": "hi you"}], "stream": False})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["message"]["content"]
    assert c.served()["1"] == 1
    # The LM Studio port lists and serves them too.
    lms = await (await c.lmstudio.get("/api/v0/models")).json()
    assert {"alpha", "beta", "gamma"} <= {m["id"] for m in lms["data"]}
    resp = await c.lmstudio.post("/api/v0/chat/completions", json=chat("beta"))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["choices"][0]["message"]["content"]
    assert c.served()["1"] == 2
    # Through an alias both of its nodes know (the call goes out under that name, so
    # an alias only one node knows is not offered).
    for _ in range(4):
        resp = await c.front.post("/v1/chat/completions", json=chat("a1"))
        assert resp.status == 200, await resp.text()
    assert c.served()["0"] + c.served()["2"] == 4
    resp = await c.front.post("/v1/chat/completions", json=chat("only-here"))
    assert resp.status == 404
    # Capabilities come from the nodes: gamma embeds, and does not chat.
    resp = await c.front.post("/v1/chat/completions", json=chat("gamma"))
    assert resp.status == 400
    resp = await c.front.post("/v1/embeddings", json={"model": "gamma", "input": "x"})
    assert resp.status == 200, await resp.text()


async def test_a_front_offers_the_nodes_variants_which_the_nodes_shape(
        cluster: Any) -> None:
    """Variants and unlisted names (scheduler/config/policy.py) across a cluster: the
    front lists and routes them by name, the node applies their params."""
    model = {"name": "alpha", "request": {"clamp": {"max_tokens": {"max": 3}}}, "variants": [
        {"name": "alpha:think", "params": {"chat_template_kwargs.enable_thinking": True}},
        {"name": "alpha:quiet", "unlisted": True}]}
    c = await cluster([[model], [{"name": "hidden", "unlisted": True}]])
    await wait_for(lambda: c.front.app[SCHEDULER].knows("alpha:think"), within=10)
    ids = {m["id"] for m in (await (await c.front.get("/v1/models")).json())["data"]}
    assert "alpha:think" in ids and not ids & {"alpha:quiet", "hidden"}
    for name in ("alpha:think", "alpha:quiet", "hidden"):
        resp = await c.front.post("/v1/chat/completions", json=chat(name, max_tokens=50))
        assert resp.status == 200, await resp.text()
    inst = c.node_instances(0)[0]
    async with aiohttp.ClientSession() as s, s.get(inst.base_url + "/fake/requests") as r:
        bodies = [x["body"] for x in await r.json() if x["method"] == "POST"]
    assert [b["max_tokens"] for b in bodies] == [3, 3]
    assert bodies[0]["chat_template_kwargs"] == {"enable_thinking": True}
    assert "chat_template_kwargs" not in bodies[1]


async def test_calls_spread_by_load(cluster: Any) -> None:
    model = {"name": "m", "parallel": 2, "env": SLOW, "replicas": {"min": 1, "max": 1}}
    c = await cluster([[model], [model], [model]])
    for i in range(3):
        await wait_for(lambda i=i: any(x.state.value == "ready" for x in c.node_instances(i)))
    await asyncio.sleep(0.5)  # a poll that sees them ready
    calls = [c.front.post("/v1/chat/completions", json=chat("m", f"call {n}", max_tokens=10))
             for n in range(6)]
    for resp in await asyncio.gather(*calls):
        assert resp.status == 200
    assert c.served() == {"0": 2, "1": 2, "2": 2}


async def test_a_conversation_sticks_to_one_node(cluster: Any) -> None:
    model = {"name": "m", "replicas": {"min": 1, "max": 1}}
    c = await cluster([[model], [model], [model]])
    for i in range(3):
        await wait_for(lambda i=i: any(x.state.value == "ready" for x in c.node_instances(i)))
    await asyncio.sleep(0.5)
    history = [{"role": "system", "content": "You are terse."},
               {"role": "user", "content": "the first question of this conversation"}]
    first = None
    for turn in range(5):
        resp = await c.front.post("/v1/chat/completions",
                                  json={"model": "m", "messages": history})
        assert resp.status == 200
        body = await resp.json()
        served = c.served()
        node = max(served, key=lambda k: served[k])
        first = first or node
        assert served[first] == turn + 1, served
        history += [body["choices"][0]["message"], {"role": "user", "content": f"and {turn}"}]


async def test_a_loaded_model_is_preferred_over_a_cold_launch(cluster: Any) -> None:
    c = await cluster([[{"name": "m"}], [{"name": "m", "replicas": {"min": 1, "max": 1}}],
                       [{"name": "m"}]])
    await wait_for(lambda: any(x.state.value == "ready" for x in c.node_instances(1)))
    await asyncio.sleep(0.5)
    for n in range(4):
        resp = await c.front.post("/v1/chat/completions", json=chat("m", f"q{n}"))
        assert resp.status == 200
    assert c.served() == {"0": 0, "1": 4, "2": 0}
    assert not c.node_instances(0) and not c.node_instances(2)


async def test_a_cold_model_launches_on_one_node_and_later_calls_join_it(cluster: Any) -> None:
    model = {"name": "m", "parallel": 4, "env": {"FAKE_LOAD_DELAY": "0.5"}}
    c = await cluster([[model], [model]])
    calls = [c.front.post("/v1/chat/completions", json=chat("m", f"q{n}")) for n in range(3)]
    for resp in await asyncio.gather(*calls):
        assert resp.status == 200
    launched = [len(c.node_instances(i)) for i in range(2)]
    assert sorted(launched) == [0, 1], launched


async def test_node_api_needs_the_token_and_the_token_is_never_shown(cluster: Any) -> None:
    c = await cluster([[{"name": "m"}]])
    node = c.nodes[0]
    async with aiohttp.ClientSession() as s:
        async with s.get(node.make_url("/corral/node")) as resp:
            assert resp.status == 401
        async with s.get(node.make_url("/corral/node"),
                         headers={"Authorization": "Bearer wrong-token-wrong-token"}) as resp:
            assert resp.status == 401
        async with s.get(node.make_url("/corral/node"),
                         headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            state = await resp.json()
        async with s.get(node.make_url("/admin/config")) as resp:
            text = await resp.text()
    assert state["version"] == 1 and state["draining"] is False
    assert state["models"][0]["name"] == "m" and state["models"][0]["launch"] == "now"
    assert TOKEN not in text and "<redacted>" in text
    view = await (await c.front.get("/corral/nodes")).json()
    assert view["nodes"][0]["healthy"] is True
    assert TOKEN not in str(view)
    metrics = await (await c.front.get("/metrics")).text()
    assert f'corral_cluster_node_healthy{{node="{c.urls[0]}"}} 1.0' in metrics
    assert f'corral_cluster_node_draining{{node="{c.urls[0]}"}} 0.0' in metrics
    assert TOKEN not in metrics


async def test_nodes_with_api_keys_accept_the_front_by_its_token(
    aiohttp_server: Any, aiohttp_client: Any, fake_llama: Path, tmp_path: Path
) -> None:
    opts = CoreOptions(find_binary=lambda _: fake_llama, reap_interval=0.05)
    ncfg = node_cfg(tmp_path, "n", [{"name": "m"}], server={"api_keys": ["client-key"]})
    node = await aiohttp_server(build_openai_app(ncfg, opts))
    fcfg = front_cfg(tmp_path, [str(node.make_url("")).rstrip("/")],
                     server={"api_keys": ["front-key"]})
    front = await aiohttp_client(build_openai_app(fcfg, opts))
    resp = await front.post("/v1/chat/completions", json=chat("m"),
                            headers={"Authorization": "Bearer front-key"})
    assert resp.status == 200, await resp.text()
    # The front's clients' key is the front's: it is not a key of the node.
    async with aiohttp.ClientSession() as s, s.post(
        node.make_url("/v1/chat/completions"), json=chat("m"),
        headers={"Authorization": "Bearer front-key"},
    ) as r:
        assert r.status == 401


async def test_a_node_that_cannot_be_reached_loses_no_call(cluster: Any) -> None:
    model = {"name": "m", "parallel": 4, "replicas": {"min": 1, "max": 1}}
    c = await cluster([[model], [model]])
    for i in range(2):
        await wait_for(lambda i=i: any(x.state.value == "ready" for x in c.node_instances(i)))
    await asyncio.sleep(0.5)
    await c.nodes[0].close()  # refuses connections from now on
    calls = [c.front.post("/v1/chat/completions", json=chat("m", f"q{n}")) for n in range(8)]
    for resp in await asyncio.gather(*calls):
        assert resp.status == 200, await resp.text()
    # Every call was answered by node 1; those first sent to node 0 were resent.
    assert sum(x.stats.served for x in c.node_instances(1)) == 8
    # ...and the node leaves the rotation at the next poll.
    async def down() -> list[bool]:
        view = await (await c.front.get("/corral/nodes")).json()
        return [n["healthy"] for n in view["nodes"]]

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3
    while await down() != [False, True]:
        assert loop.time() < deadline, await down()
        await asyncio.sleep(0.05)


async def test_a_draining_node_gets_no_new_calls_and_finishes_its_own(cluster: Any) -> None:
    from proxy.ops import cluster as cluster_mod

    model = {"name": "m", "parallel": 2, "env": SLOW, "replicas": {"min": 1, "max": 1}}
    c = await cluster([[model], [model]])
    for i in range(2):
        await wait_for(lambda i=i: any(x.state.value == "ready" for x in c.node_instances(i)))
    await asyncio.sleep(0.5)
    running = [asyncio.ensure_future(c.front.post(
        "/v1/chat/completions", json=chat("m", f"long {n}", max_tokens=30))) for n in range(4)]
    await wait_for(lambda: sum(x.in_flight for x in c.node_instances(0)) > 0)
    drain = asyncio.ensure_future(cluster_mod.drain(c.node_app(0), 30))
    await asyncio.sleep(0.5)  # the front polls and sees it draining
    before = c.served()["0"] + sum(x.in_flight for x in c.node_instances(0))
    for n in range(4):
        resp = await c.front.post("/v1/chat/completions", json=chat("m", f"new {n}"))
        assert resp.status == 200
    for resp in await asyncio.gather(*running):
        assert resp.status == 200
        assert len((await resp.json())["choices"][0]["message"]["content"].split()) == 30
    await asyncio.wait_for(drain, 10)
    assert c.served()["0"] + sum(x.in_flight for x in c.node_instances(0)) == before


async def test_a_full_cluster_queues_at_the_front_bounded_with_retry_after(
    cluster: Any,
) -> None:
    model = {"name": "m", "env": {"FAKE_TOKEN_DELAY": "0.1"}, "replicas": {"min": 1, "max": 1}}
    c = await cluster([[model], [model]],
                      scheduler={"queue_size": 1, "queue_timeout": 20})
    for i in range(2):
        await wait_for(lambda i=i: any(x.state.value == "ready" for x in c.node_instances(i)))
    await asyncio.sleep(0.5)
    # Two nodes of one slot each, full; one call may wait at the front, the next not.
    running = [asyncio.ensure_future(c.front.post(
        "/v1/chat/completions", json=chat("m", f"r{n}", max_tokens=10))) for n in range(3)]
    await wait_for(lambda: sum(int(str(m["queued"]))
                               for m in c.front.app[SCHEDULER].model_status()) == 1)
    refused = await c.front.post("/v1/chat/completions", json=chat("m", "one too many"))
    assert refused.status == 503
    assert int(refused.headers["Retry-After"]) >= 1
    for resp in await asyncio.gather(*running):
        assert resp.status == 200
    # The front sent no node more than its one slot: the queue was the front's.
    async with aiohttp.ClientSession() as s:
        for i in range(2):
            for inst in c.node_instances(i):
                async with s.get(inst.base_url + "/fake/stats") as r:
                    assert (await r.json())["max_in_flight"] == 1
    assert sum(x.stats.served for i in range(2) for x in c.node_instances(i)) == 3


async def test_fronts_side_by_side_need_no_shared_state(
    aiohttp_server: Any, aiohttp_client: Any, fake_llama: Path, tmp_path: Path
) -> None:
    opts = CoreOptions(find_binary=lambda _: fake_llama, reap_interval=0.05)
    model = {"name": "m", "parallel": 2, "env": SLOW, "replicas": {"min": 1, "max": 1}}
    nodes = [await aiohttp_server(build_openai_app(node_cfg(tmp_path, f"n{i}", [model]), opts))
             for i in range(2)]
    urls = [str(n.make_url("")).rstrip("/") for n in nodes]
    for n in nodes:
        await wait_for(lambda n=n: any(x.state.value == "ready"
                                       for x in n.app[SCHEDULER].instances()))
    fronts = []
    for k in range(2):
        d = tmp_path / f"front{k}"
        d.mkdir()
        fronts.append(await aiohttp_client(build_openai_app(front_cfg(d, urls), opts)))
    await asyncio.sleep(0.5)
    calls = [fronts[k % 2].post("/v1/chat/completions", json=chat("m", f"c{k}", max_tokens=10))
             for k in range(8)]
    for resp in await asyncio.gather(*calls):
        assert resp.status == 200
    served = [sum(x.stats.served for x in n.app[SCHEDULER].instances()) for n in nodes]
    assert sum(served) == 8 and min(served) >= 2, served


async def test_the_token_goes_to_nodes_only(
    aiohttp_server: Any, aiohttp_client: Any, fake_llama: Path, tmp_path: Path
) -> None:
    opts = CoreOptions(find_binary=lambda _: fake_llama, reap_interval=0.05)
    model = {"name": "m", "replicas": {"min": 1, "max": 1}}
    node = await aiohttp_server(build_openai_app(node_cfg(tmp_path, "n", [model]), opts))
    await wait_for(lambda: any(x.state.value == "ready" for x in node.app[SCHEDULER].instances()))
    child = node.app[SCHEDULER].instances()[0].base_url
    # The front also has a plain remote model: the node's llama-server, called directly.
    cfg = make_config(tmp_path, [{"name": "plain", "remotes": [child]}], cluster={
        "role": "front", "token": TOKEN, "nodes": [str(node.make_url("")).rstrip("/")],
        "poll_interval": 0.2})
    front = await aiohttp_client(build_openai_app(cfg, opts))
    for name in ("m", "plain"):
        resp = await front.post("/v1/chat/completions", json=chat(name))
        assert resp.status == 200, await resp.text()
    async with aiohttp.ClientSession() as s, s.get(child + "/fake/requests") as r:
        seen = await r.json()
    chats = [q for q in seen if q["path"] == "/v1/chat/completions"]
    assert len(chats) == 2  # one through the node, one straight from the front
    assert all(TOKEN not in str(q["headers"]) for q in seen)


async def test_when_every_node_is_gone_calls_fail_at_once_in_the_callers_dialect(
    cluster: Any,
) -> None:
    c = await cluster([[{"name": "m"}], [{"name": "m"}]])
    for node in c.nodes:
        await node.close()
    loop = asyncio.get_running_loop()
    start = loop.time()
    resp = await c.front.post("/v1/chat/completions", json=chat("m"))
    assert resp.status == 503
    body = await resp.json()
    assert body["error"]["code"] == "upstream_unavailable"
    assert int(resp.headers["Retry-After"]) >= 1
    # Which nodes and why is the operator's business (the log, /admin/models); the
    # caller learns neither the nodes' addresses nor their ports (issue 25).
    shown = body["error"]["message"]
    assert "2 out of rotation" in shown, shown
    for url in c.urls:
        assert url not in shown and url.rsplit(":", 1)[1] not in shown, shown
    resp = await c.ollama.post("/api/chat", json={
        "model": "m", "messages": [{"role": "user", "content": "x"}], "stream": False})
    assert resp.status == 503
    shown = (await resp.json())["error"]
    assert all(url.rsplit(":", 1)[1] not in shown for url in c.urls), shown
    assert loop.time() - start < 10
    # The models stay listed: a node that is down may come back.
    ids = {m["id"] for m in (await (await c.front.get("/v1/models")).json())["data"]}
    assert "m" in ids


def _report(models: list[dict[str, Any]], version: int = 1) -> dict[str, Any]:
    base = {"aliases": [], "capabilities": ["chat"], "slots": 1, "ready_slots": 1,
            "starting_slots": 0, "in_flight": 0, "queued": 0, "launch": "now",
            "instances": []}
    return {"version": version, "node": "odd", "draining": False, "in_flight": 0,
            "queued": 0, "memory": {"free": None}, "models": [{**base, **m} for m in models]}


async def test_odd_node_reports_do_not_break_the_front(
    aiohttp_server: Any, aiohttp_client: Any, fake_llama: Path, tmp_path: Path
) -> None:
    reports = {"a": _report([{"name": "good"}, {"name": "new-cap", "capabilities":
                                                  ["chat", "telepathy"]},
                            {"name": "bad name!"}]),
               "b": _report([{"name": "other"}], version=99)}

    def node_app(which: str) -> web.Application:
        async def state(request: web.Request) -> web.Response:
            assert request.headers["Authorization"] == f"Bearer {TOKEN}"
            return web.json_response(reports[which])

        app = web.Application()
        app.router.add_get("/corral/node", state)
        return app

    a = await aiohttp_server(node_app("a"))
    b = await aiohttp_server(node_app("b"))
    opts = CoreOptions(find_binary=lambda _: fake_llama, reap_interval=0.05)
    cfg = front_cfg(tmp_path, [str(a.make_url("")).rstrip("/"),
                               str(b.make_url("")).rstrip("/")])
    front = await aiohttp_client(build_openai_app(cfg, opts))
    ids = {m["id"] for m in (await (await front.get("/v1/models")).json())["data"]}
    assert ids == {"good", "new-cap"}
    view = await (await front.get("/corral/nodes")).json()
    by_url = {n["url"]: n for n in view["nodes"]}
    assert by_url[str(b.make_url("")).rstrip("/")]["failure"].startswith(
        "not a Corral node state report")
    await asyncio.sleep(0.5)  # more polls: the front keeps going
    assert (await front.get("/v1/models")).status == 200
