"""A front's node set (scheduler/cluster/nodes.py) against its scheduler's remotes."""

from __future__ import annotations

from typing import Any, cast

from scheduler.cluster.nodes import NodeWatch
from scheduler.config.root import ClusterConfig
from scheduler.engines.remote import Remote
from scheduler.engines.settings import RemoteConfig
from scheduler.process.instance import State

A, B = "http://10.0.0.1:8080", "http://10.0.0.2:8080"
REPORT = {"launch": "now", "ready_slots": 4, "starting_slots": 0, "in_flight": 0,
          "queued": 0, "slots": 4}


def _remote(url: str) -> Remote:
    r = Remote(f"m@{url}", "m", RemoteConfig(url=url, health="none"), 4, lambda _: None)
    assert r.state is State.READY
    return r


def _nodes(*urls: str) -> NodeWatch:
    cfg = ClusterConfig(role="front", token="t" * 16, nodes=urls)
    nodes = NodeWatch(cfg, cast(Any, None), cast(Any, None), max_load=1.0)
    for n in nodes.nodes():
        n.healthy, n.failure, n.report, n.models = True, None, {}, {"m": dict(REPORT)}
    return nodes


def test_a_node_that_left_gets_no_calls_before_the_models_are_synced() -> None:
    """Discovery drops a node at once; its model's remote lingers in the scheduler
    until the next poll. Seen: 1 call in 3 went to the node that had left."""
    nodes = _nodes(A, B)
    ra, rb = _remote(A), _remote(B)
    assert {nodes.pick([ra, rb], {rb.id: 1 << 20}, 1.0).base_url} == {B}  # type: ignore[union-attr]
    nodes.set_urls([A])
    for _ in range(5):
        chosen = nodes.pick([ra, rb], {rb.id: 1 << 20}, 1.0)
        assert chosen is not None and chosen.base_url == A
    assert nodes.pick([rb], {}, 1.0) is None
    nodes.set_urls([A, B])  # back: it takes calls again once polled
    for n in nodes.nodes():
        n.healthy, n.failure, n.report, n.models = True, None, {}, {"m": dict(REPORT)}
    assert nodes.pick([rb], {}, 1.0) is rb
