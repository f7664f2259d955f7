"""Cluster roles on the HTTP side (docs/cluster.md).

A *node* is a normal Corral that also answers ``GET /corral/node`` (its state: models,
instances, load, queues, memory, draining) to holders of the cluster token, accepts
the token as an API key, and drains on SIGTERM: it reports ``draining`` and keeps
answering whatever still arrives for ``drain_settle`` seconds (every front polls it
within that time and stops sending), then waits for its calls to finish.

A *front* is a Corral whose models are its nodes' models and whose upstreams are the
nodes' OpenAI ports (scheduler/cluster/nodes.py). Every dialect is translated here,
at the front, exactly as in a single Corral: the Ollama and LM Studio ports translate
to OpenAI calls, which go to a node's OpenAI port as they would to a llama-server.
``GET /corral/nodes`` shows the front's view of its nodes (behind the API key).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.edge.errors import render
from proxy.keys import SCHEDULER, SESSION
from proxy.metrics.registry import METRICS
from scheduler.cluster.discovery import DnsDiscovery
from scheduler.cluster.nodes import NODE_PATH, NodeWatch, cancel
from scheduler.cluster.state import node_state
from scheduler.config.root import ClusterConfig, CorralConfig
from scheduler.errors import Unauthorized

log = logging.getLogger(__name__)


@dataclass
class Cluster:
    cfg: ClusterConfig
    name: str
    draining: bool = False
    watch: NodeWatch | None = None
    discovery: DnsDiscovery | None = None


CLUSTER = web.AppKey("cluster", Cluster)


def setup(app: web.Application, cfg: CorralConfig) -> None:
    """Mount the role's routes and, for a front, its node watch (after the core's
    cleanup_ctx, which makes the scheduler and session it uses)."""
    cc = cfg.cluster
    if cc.role == "none":
        return
    app[CLUSTER] = Cluster(cc, socket.gethostname())
    if cc.role == "node":
        app.router.add_get(NODE_PATH, get_node)
        app.router.add_post(NODE_PATH + "/drain", post_drain)
    else:
        app.router.add_get("/corral/nodes", get_nodes)
        app.cleanup_ctx.append(_front_ctx)


def _authorized(request: web.Request, token: str) -> bool:
    auth = request.headers.get("Authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    try:
        return hmac.compare_digest(given.encode(), token.encode())
    except UnicodeEncodeError:
        return False


def _refused() -> web.Response:
    return render(Unauthorized("the cluster token is required (Authorization: Bearer)"),
                  "openai")


async def get_node(request: web.Request) -> web.Response:
    cluster = request.app[CLUSTER]
    if not _authorized(request, cluster.cfg.token):
        return _refused()
    state = node_state(request.app[SCHEDULER], cluster.name, cluster.draining, time.monotonic())
    return web.json_response(state)


async def post_drain(request: web.Request) -> web.Response:
    """Start draining now (a preStop hook); SIGTERM later finds it done."""
    cluster = request.app[CLUSTER]
    if not _authorized(request, cluster.cfg.token):
        return _refused()
    if not cluster.draining:
        log.info("cluster: draining (asked over the node API)")
    cluster.draining = True
    return web.json_response({"draining": True, "busy": _busy(request.app)})


async def get_nodes(request: web.Request) -> web.Response:
    cluster = request.app[CLUSTER]
    watch = cluster.watch
    nodes = [] if watch is None else [n.describe() for n in watch.nodes()]
    out: dict[str, object] = {"role": "front", "nodes": nodes}
    if cluster.discovery is not None:
        out["discover"] = {"name": cluster.discovery.name, "port": cluster.discovery.port,
                           "failure": cluster.discovery.failure}
    return web.json_response(out)


def _busy(app: web.Application) -> int:
    """Calls the node holds: running on its instances and remotes, and queued."""
    scheduler = app[SCHEDULER]
    running = sum(i.in_flight for i in scheduler.instances())
    running += sum(r.in_flight for r in scheduler.remotes())
    queued = sum(int(str(s["queued"])) for s in scheduler.model_status())
    return running + queued


async def drain(app: web.Application, grace: float) -> None:
    """A node's first step of shutdown: report draining, keep serving what arrives
    until every front has seen it, then wait for the calls it holds (within
    ``grace`` seconds). Ports close afterwards, as for any Corral."""
    cluster = app.get(CLUSTER)
    if cluster is None or cluster.cfg.role != "node":
        return
    cluster.draining = True
    loop = asyncio.get_running_loop()
    start = loop.time()
    settle = min(cluster.cfg.drain_settle, grace)
    log.info("cluster: draining; %d call(s) running or queued", _busy(app))
    while True:
        elapsed = loop.time() - start
        if elapsed >= grace:
            log.warning("cluster: drain timeout with %d call(s) left", _busy(app))
            return
        if elapsed >= settle and not _busy(app):
            log.info("cluster: drained in %.1f s", elapsed)
            return
        await asyncio.sleep(0.1)


async def _front_ctx(app: web.Application) -> AsyncIterator[None]:
    cluster = app[CLUSTER]
    cfg = cluster.cfg
    scheduler = app[SCHEDULER]
    watch = NodeWatch(cfg, scheduler, app[SESSION], scheduler.config.scheduler.max_load)
    cluster.watch = watch
    scheduler.pick = watch.pick
    tasks: list[asyncio.Task[None]] = []
    if cfg.discover is not None:
        cluster.discovery = DnsDiscovery(cfg.discover, cfg.resolv_conf, cfg.discover_interval,
                                         watch.set_urls)
        await cluster.discovery.resolve_once()
        tasks.append(asyncio.create_task(cluster.discovery.run(), name="corral-discovery"))
    # The first poll before the ports open: the front starts with its nodes' models.
    await watch.poll_all()
    tasks.append(asyncio.create_task(watch.run(), name="corral-nodes"))
    collector = _NodeCollector(watch)
    registry = app[METRICS].registry if METRICS in app else None
    if registry is not None:
        registry.register(collector)
    try:
        yield
    finally:
        if registry is not None:
            registry.unregister(collector)
        for task in tasks:
            await cancel(task)


class _NodeCollector(Collector):
    """A front's view of its nodes, read when Prometheus scrapes (docs/cluster.md)."""

    def __init__(self, watch: NodeWatch) -> None:
        self._watch = watch

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        healthy = GaugeMetricFamily(
            "corral_cluster_node_healthy", "1 while the node answers its polls.",
            labels=["node"])
        draining = GaugeMetricFamily(
            "corral_cluster_node_draining", "1 while the node reports draining.",
            labels=["node"])
        calls = GaugeMetricFamily(
            "corral_cluster_node_calls", "Calls the node reported, all fronts' together.",
            labels=["node", "state"])
        for node in self._watch.nodes():
            report = node.report or {}
            healthy.add_metric([node.url], 1.0 if node.healthy else 0.0)
            draining.add_metric([node.url], 1.0 if node.draining else 0.0)
            calls.add_metric([node.url, "running"], float(report.get("in_flight") or 0))
            calls.add_metric([node.url, "queued"], float(report.get("queued") or 0))
        return [healthy, draining, calls]



def client_middlewares(app: web.Application) -> tuple[aiohttp.ClientMiddlewareType, ...]:
    """For a front's upstream session: the cluster token on calls to its nodes, and on
    nothing else (a configured remote or a local child never sees it)."""

    async def token(req: aiohttp.ClientRequest,
                    handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
        cluster = app.get(CLUSTER)
        watch = cluster.watch if cluster is not None else None
        if watch is not None and watch.is_node(str(req.url.origin())):
            req.headers["Authorization"] = f"Bearer {cluster.cfg.token}"  # type: ignore[union-attr]
        return await handler(req)

    return (token,)
