"""A front's view of its nodes: polls each node's state API, keeps the union of their
models as the scheduler's dynamic models, and chooses a node for each call.

How it plugs into the scheduler: every model a node serves becomes a model of the
front whose ``remotes`` are the nodes that serve it, so the scheduler's lease, queue
and retry-after, and the one upstream call path (resending a call that reached no
node) work unchanged. Only the choice among a model's upstreams is replaced
(``Scheduler.pick``) by the pure ``cluster.policy.pick_node`` over what the nodes
last reported plus this front's own calls since.

A node leaves the rotation when a poll fails (or a call cannot connect or is reset:
the scheduler marks its remote failed, and the call's resend avoids it) or when it
reports draining; it comes back with
its next good poll. A node that is gone keeps its models in the front's list until
discovery drops it, so a short outage does not make models vanish for clients.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, get_args

import aiohttp
from pydantic import ValidationError

from scheduler.aio import cancel_and_wait
from scheduler.cluster.policy import LaunchKind, NodeOption, pick_node
from scheduler.cluster.state import VERSION
from scheduler.config.root import Capability, ClusterConfig, ModelConfig
from scheduler.engines.remote import Remote
from scheduler.process.instance import State
from scheduler.scheduling import policy as instance_policy
from scheduler.scheduling.scheduler import Scheduler, Servable

log = logging.getLogger(__name__)

NODE_PATH = "/corral/node"
SOURCE = "cluster"
# Concurrent calls a front sends one node for one model: effectively unbounded, as
# node choice (not the remote's slot count) decides where calls go.
_NODE_SLOTS = 4096
_LAUNCH_KINDS: frozenset[str] = frozenset({"now", "evict", "wait", "never"})
_CAPABILITIES: frozenset[str] = frozenset(get_args(Capability))


@dataclass(slots=True)
class Node:
    url: str
    report: dict[str, Any] | None = None
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    healthy: bool = False
    failure: str | None = "not polled yet"
    # This front's calls per model that the last report may have counted: those in
    # flight when the poll was sent plus those started while it was on its way.
    own_at_poll: dict[str, int] = field(default_factory=dict)
    polled_at: float = 0.0

    @property
    def draining(self) -> bool:
        return bool(self.report and self.report.get("draining"))

    @property
    def usable(self) -> bool:
        return self.healthy and not self.draining

    def describe(self) -> dict[str, object]:
        r = self.report or {}
        return {"url": self.url, "node": r.get("node"), "healthy": self.healthy,
                "draining": self.draining, "failure": self.failure,
                "in_flight": r.get("in_flight"), "queued": r.get("queued"),
                "models": sorted(self.models)}


class NodeWatch:
    def __init__(
        self,
        cfg: ClusterConfig,
        scheduler: Scheduler,
        session: aiohttp.ClientSession,
        max_load: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cfg = cfg
        self._scheduler = scheduler
        self._session = session
        self._max_load = max_load
        self._clock = clock
        self._nodes: dict[str, Node] = {u: Node(u) for u in cfg.nodes}
        self._models: tuple[ModelConfig, ...] = ()
        self._headers = {"Authorization": f"Bearer {cfg.token}"}
        self._origins = frozenset(_origin(u) for u in self._nodes)
        self._refused: set[str] = set()
        # Nodes discovery dropped. Their models stay in the scheduler as remotes until
        # the next poll syncs the model list; pick() must not hand them calls meanwhile
        # (it did: a call went to a node that had left the Service).
        self._left: set[str] = set()

    # -- membership --------------------------------------------------------------

    def nodes(self) -> list[Node]:
        return list(self._nodes.values())

    def set_urls(self, urls: Sequence[str]) -> None:
        """Discovery's answer: nodes not in it leave, new ones join (polled next)."""
        wanted = dict.fromkeys(u.rstrip("/") for u in urls)
        if set(wanted) == set(self._nodes):
            return
        for u in set(self._nodes) - set(wanted):
            log.info("cluster: node %s left", u)
        for u in set(wanted) - set(self._nodes):
            log.info("cluster: node %s joined", u)
        self._left = (self._left | set(self._nodes)) - set(wanted)
        self._nodes = {u: self._nodes.get(u) or Node(u) for u in wanted}
        self._origins = frozenset(_origin(u) for u in self._nodes)

    def is_node(self, origin: str) -> bool:
        """Whether a URL origin (scheme://host:port) is one of the nodes: calls to it
        carry the cluster token, calls anywhere else never do."""
        return origin in self._origins

    # -- polling -----------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self.poll_all()
            await asyncio.sleep(self._cfg.poll_interval)

    async def poll_all(self) -> None:
        nodes = list(self._nodes.values())
        await asyncio.gather(*(self._poll(n) for n in nodes))
        await self._sync_models()
        self._scheduler.wake()

    async def _poll(self, node: Node) -> None:
        timeout = aiohttp.ClientTimeout(total=max(self._cfg.poll_interval, 1.0),
                                        sock_connect=self._cfg.connect_timeout)
        # The node counts its calls at some moment between sending and receiving: a
        # call of ours that ended in between may be in the report, one that started
        # may be. Subtracting every call of ours that may be counted errs towards
        # sending a node one call too many (it queues there), never towards leaving
        # it idle until the next poll because of a call that already ended.
        sent = {r.model: (r.in_flight, r.served + r.in_flight) for r in self._remotes(node.url)}
        try:
            async with self._session.get(node.url + NODE_PATH, headers=self._headers,
                                         timeout=timeout) as resp:
                if resp.status != 200:
                    raise _Bad(f"{NODE_PATH} answered {resp.status}")
                report = await resp.json()
            models = _parse(report)
        except (aiohttp.ClientError, TimeoutError, ValueError, _Bad) as e:
            reason = str(e) or type(e).__name__
            if node.failure != reason:
                log.warning("cluster: node %s out of rotation: %s", node.url, reason)
            node.healthy = False
            node.failure = reason
            for r in self._remotes(node.url):
                if r.state is not State.FAILED:
                    r.mark_failed(f"node: {reason}")
            return
        if not node.healthy:
            log.info("cluster: node %s in rotation (%s)", node.url, report.get("node"))
        was_draining = node.draining
        node.report, node.models = report, models
        node.healthy, node.failure, node.polled_at = True, None, self._clock()
        if node.draining and not was_draining:
            log.info("cluster: node %s is draining: no new calls", node.url)
        own: dict[str, int] = {}
        for r in self._remotes(node.url):
            in_flight, started = sent.get(r.model, (0, r.served + r.in_flight))
            own[r.model] = in_flight + (r.served + r.in_flight - started)
            if r.state is State.FAILED:
                # Back in rotation now, not at the remote's next own check.
                await r.check(self._session)
        node.own_at_poll = own

    def _remotes(self, url: str) -> list[Remote]:
        return [r for r in self._scheduler.remotes() if r.base_url == url]

    async def _sync_models(self) -> None:
        models = self.models()
        if models != self._models:
            self._models = models
            report = await self._scheduler.set_dynamic_models(SOURCE, models)
            changed = {k: v for k, v in report.items() if v and k != "unchanged"}
            if changed:
                log.info("cluster: models %s", changed)

    def models(self) -> tuple[ModelConfig, ...]:
        """The union of the nodes' models, each with the nodes that serve it."""
        urls: dict[str, list[str]] = {}
        aliases: dict[str, dict[str, None]] = {}
        caps: dict[str, set[str]] = {}
        variants: dict[str, dict[str, dict[str, Any]]] = {}
        hidden: set[str] = set()
        for node in self._nodes.values():
            for name, m in node.models.items():
                urls.setdefault(name, []).append(node.url)
                # As aliases: a variant is offered only where every node knows it.
                theirs = _variants(m.get("variants"))
                mine = variants.get(name)
                variants[name] = theirs if mine is None else {
                    v: d for v, d in mine.items() if v in theirs}
                if m.get("unlisted") is True:
                    hidden.add(name)
                # Calls go out under the name the client used: an alias is offered only
                # if every node that serves the model knows it.
                given = dict.fromkeys(m.get("aliases", []))
                have = aliases.get(name)
                aliases[name] = given if have is None else {a: None for a in have if a in given}
                caps.setdefault(name, set()).update(m.get("capabilities", []))
        names = set(urls)
        out = []
        for name in sorted(urls):
            try:
                out.append(ModelConfig.model_validate({
                    "name": name,
                    "aliases": [a for a in aliases[name] if a not in names],
                    "unlisted": name in hidden,
                    "variants": [v for v in variants[name].values() if v["name"] not in names],
                    "remotes": sorted(urls[name]),
                    "remote_slots": _NODE_SLOTS,
                    # A newer node may know capabilities this front does not.
                    "capabilities": sorted(caps[name] & _CAPABILITIES) or None,
                    "connect_timeout": self._cfg.connect_timeout,
                    "first_byte_timeout": self._cfg.first_byte_timeout,
                    "stall_timeout": self._cfg.stall_timeout,
                }))
            except ValidationError as e:
                # One odd model must not stop the front from listing the others.
                if name not in self._refused:
                    self._refused.add(name)
                    log.warning("cluster: model %r from %s left out: %s", name,
                                ", ".join(urls[name]), e.errors()[0]["msg"])
        return tuple(out)

    # -- choice ------------------------------------------------------------------

    def pick(self, candidates: list[Servable], matched: Mapping[str, int],
             max_load: float) -> Servable | None:
        """The scheduler's instance choice, for a front: see cluster.policy. ``matched``
        is what this front remembers sending each node (the scheduler's prefix index
        of each node's remote): bytes of the call's prefix it holds."""
        options: list[NodeOption] = []
        by_id: dict[str, Servable] = {}
        for c in candidates:
            node = self._nodes.get(c.base_url) if isinstance(c, Remote) else None
            if node is None and c.base_url in self._left:
                continue
            if node is None:
                # The front's own local models (or plain remotes) keep the usual choice.
                return instance_policy.pick_instance(candidates, matched, max_load)
            m = node.models.get(c.model)
            if c.state is not State.READY or not node.usable or m is None:
                continue
            report = node.report or {}
            launch: LaunchKind = m["launch"]
            options.append(NodeOption(
                id=c.id, ready_slots=m["ready_slots"], starting_slots=m["starting_slots"],
                reported=m["in_flight"] + m["queued"], own=c.in_flight,
                own_at_poll=node.own_at_poll.get(c.model, 0), launch=launch,
                slots_per_instance=m["slots"], node_calls=int(report.get("in_flight") or 0),
                free_memory=int((report.get("memory") or {}).get("free") or 0),
            ))
            by_id[c.id] = c
        chosen = pick_node(options, matched, self._max_load)
        return None if chosen is None else by_id[chosen]


class _Bad(Exception):
    pass


def _origin(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}".lower()


def _parse(report: Any) -> dict[str, dict[str, Any]]:
    """The report's models by name, checked: a malformed report is a failed poll."""
    if not isinstance(report, dict) or report.get("version") != VERSION:
        raise _Bad(f"not a Corral node state report of version {VERSION}")
    out: dict[str, dict[str, Any]] = {}
    for m in report.get("models") or []:
        try:
            name = str(m["name"])
            for k in ("ready_slots", "starting_slots", "in_flight", "queued", "slots"):
                m[k] = int(m[k])
        except (KeyError, TypeError, ValueError) as e:
            raise _Bad(f"malformed model entry: {e}") from None
        for k in ("aliases", "capabilities"):
            v = m.setdefault(k, [])
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise _Bad(f"model {name!r}: {k} is not a list of strings")
        if m.get("launch") not in _LAUNCH_KINDS:
            raise _Bad(f"model {name!r}: unknown launch verdict {m.get('launch')!r}")
        out[name] = m
    return out


async def cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        await cancel_and_wait(task)


def _variants(reported: Any) -> dict[str, dict[str, Any]]:
    """A node's variants of one model as the front offers them: names only (the node
    applies their params), by name; an odd entry is left out."""
    out: dict[str, dict[str, Any]] = {}
    for v in reported if isinstance(reported, list) else ():
        if isinstance(v, dict) and isinstance(v.get("name"), str):
            aliases = [a for a in v.get("aliases") or () if isinstance(a, str)]
            out[v["name"]] = {"name": v["name"], "aliases": aliases,
                              "unlisted": v.get("unlisted") is True}
    return out
