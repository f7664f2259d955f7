"""Node choice for a cluster front: every rule of scheduler/cluster/policy.py as a case."""

from __future__ import annotations

from typing import Any

import pytest

from scheduler.cluster.discovery import node_url, parse_target
from scheduler.cluster.policy import NodeOption, pick_node
from scheduler.config.root import ClusterConfig, CorralConfig
from scheduler.errors import ConfigError
from scheduler.scheduling.prefixes import MIN_MATCH

LONG = 4 * MIN_MATCH


def opt(id: str, **kw: Any) -> NodeOption:
    base: dict[str, Any] = dict(ready_slots=0, starting_slots=0, reported=0, own=0,
                                own_at_poll=0, launch="now", slots_per_instance=2)
    base.update(kw)
    return NodeOption(id=id, **base)


def test_least_loaded_ready_node_wins() -> None:
    nodes = [opt("a", ready_slots=4, reported=3), opt("b", ready_slots=4, reported=1),
             opt("c", ready_slots=4, reported=2)]
    assert pick_node(nodes, None, 1.0) == "b"


def test_the_node_sent_the_longest_prefix_wins_below_max_load() -> None:
    nodes = [opt("a", ready_slots=2, reported=1), opt("b", ready_slots=2, reported=1)]
    assert pick_node(nodes, {"b": LONG}, 1.0) == "b"
    assert pick_node(nodes, {"a": LONG, "b": LONG - 1}, 1.0) == "a"
    # Over a less loaded node too, while it is below max_load...
    nodes = [opt("a", ready_slots=2, reported=0), opt("b", ready_slots=2, reported=1)]
    assert pick_node(nodes, {"b": LONG}, 1.0) == "b"
    # ...but not at it, nor for a short match: load first then.
    assert pick_node(nodes, {"b": LONG}, 0.5) == "a"
    assert pick_node(nodes, {"b": MIN_MATCH - 1}, 1.0) == "a"


def test_ready_instance_beats_a_cold_launch_elsewhere() -> None:
    nodes = [opt("cold", launch="now", free_memory=10**12),
             opt("warm", ready_slots=1, launch="wait")]
    assert pick_node(nodes, None, 1.0) == "warm"


def test_own_calls_since_the_poll_count() -> None:
    # The report said idle; this front has since sent 2 calls to a (2 slots): full.
    nodes = [opt("a", ready_slots=2, reported=0, own=2, own_at_poll=0),
             opt("b", ready_slots=2, reported=1, own=0)]
    assert pick_node(nodes, None, 1.0) == "b"
    # Calls counted in the report and still running are not counted twice.
    assert opt("a", reported=3, own=2, own_at_poll=2).calls == 3


def test_full_nodes_then_starting_then_launch_then_queue() -> None:
    full = opt("full", ready_slots=1, reported=1, launch="wait")
    starting = opt("starting", starting_slots=2, reported=1, launch="wait")
    assert pick_node([full, starting], None, 1.0) == "starting"
    launch_now = opt("now", launch="now", node_calls=5)
    launch_evict = opt("evict", launch="evict", node_calls=0)
    assert pick_node([full, launch_evict, launch_now], None, 1.0) == "now"
    assert pick_node([full, launch_evict], None, 1.0) == "evict"
    never = opt("never", launch="never")
    waiting = opt("wait", launch="wait")
    assert pick_node([full, never, waiting], None, 1.0) is None


def test_a_launch_this_front_started_is_joined_not_repeated() -> None:
    # One cold call went to a: its launch is not in a report yet. The next call joins
    # it (2 slots coming) rather than starting a second launch on b.
    a = opt("a", own=1, launch="now")
    b = opt("b", launch="now")
    assert pick_node([a, b], None, 1.0) == "a"
    # Once the coming instance is spoken for, the next call launches elsewhere.
    a = opt("a", own=2, launch="now")
    assert pick_node([a, b], None, 1.0) == "b"


def test_launch_ties_go_to_the_least_busy_node_then_the_most_free_memory() -> None:
    nodes = [opt("a", node_calls=3), opt("b", node_calls=1, free_memory=1),
             opt("c", node_calls=1, free_memory=5)]
    assert pick_node(nodes, None, 1.0) == "c"


def test_max_load_below_one_leaves_headroom() -> None:
    nodes = [opt("a", ready_slots=4, reported=2, launch="wait")]
    assert pick_node(nodes, None, 0.5) is None
    assert pick_node(nodes, None, 1.0) == "a"


def test_no_options_queue() -> None:
    assert pick_node([], None, 1.0) is None


def test_discover_target_and_urls() -> None:
    assert parse_target("dns:corral-nodes.ai.svc.cluster.local:8080") == (
        "corral-nodes.ai.svc.cluster.local", 8080)
    assert node_url("10.0.0.7", 8080) == "http://10.0.0.7:8080"
    assert node_url("fd00::7", 8080) == "http://[fd00::7]:8080"


@pytest.mark.parametrize("section, message", [
    ({"role": "node"}, "token of at least 16"),
    ({"role": "front", "token": "x" * 16}, "needs 'nodes' or 'discover'"),
    ({"role": "node", "token": "x" * 16, "nodes": ["http://a:1"]}, "for role 'front'"),
    ({"role": "front", "token": "x" * 16, "discover": "srv:a"}, "dns:NAME:PORT"),
    ({"role": "front", "token": "x" * 16, "nodes": ["ftp://a"]}, "http(s) base URL"),
])
def test_cluster_config_is_validated(tmp_path: Any, section: dict[str, Any],
                                     message: str) -> None:
    from scheduler.config.root import load_config

    lines = ["[cluster]"]
    for k, v in section.items():
        lines.append(f"{k} = {v!r}".replace("'", '"'))
    path = tmp_path / "corral.toml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "cluster" in str(err.value) and message in str(err.value)


def test_cluster_defaults() -> None:
    assert CorralConfig().cluster == ClusterConfig()
    assert ClusterConfig().role == "none"


def test_a_nodes_launch_verdict_is_its_own_launch_policy() -> None:
    from scheduler.cluster.state import _launch
    from scheduler.process.instance import State
    from scheduler.scheduling import policy

    def view(id: str, model: str, in_flight: int) -> policy.InstanceView:
        return policy.InstanceView(id=id, model=model, state=State.READY,
                                   in_flight=in_flight, slots=1, last_used=0.0,
                                   footprint=100)

    def snap(*insts: policy.InstanceView, budget: int | None = 1000) -> policy.Snapshot:
        return policy.Snapshot(now=1.0, instances=list(insts), max_instances=2,
                               memory_budget=budget, replicas={"m": (0, 2)})

    assert _launch(snap(), "m", 100, 0, True, "not-loaded") == "now"
    assert _launch(snap(), "m", 5000, 0, True, "not-loaded") == "never"
    busy = (view("a#1", "a", 1), view("b#1", "b", 1))
    assert _launch(snap(*busy), "m", 100, 0, True, "not-loaded") == "wait"
    idle = (view("a#1", "a", 0), view("b#1", "b", 1))
    assert _launch(snap(*idle), "m", 100, 0, True, "not-loaded") == "evict"
    assert _launch(snap(), "m", 100, 0, True, "unavailable") == "never"
    # A model the node reaches through its own remotes never launches; it takes calls.
    assert _launch(snap(*busy), "r", 0, 0, False, "not-loaded") == "now"
