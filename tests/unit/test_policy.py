"""The scheduling rules as tables (snapshot → decision), then their invariants as
properties over random snapshots. Everything here is pure: no loop, no clock."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.process.instance import ALIVE, State
from scheduler.scheduling.policy import (
    InstanceView,
    Launch,
    Snapshot,
    Wait,
    expired,
    pick_instance,
    plan_launch,
    preempt,
)
from scheduler.scheduling.prefixes import MIN_MATCH

R, S, D, X = State.READY, State.STARTING, State.DRAINING, State.STOPPING
NOW = 100.0
# A prefix long enough to steer a call (policy.pick_instance).
LONG = 4 * MIN_MATCH


def inst(
    iid: str,
    model: str = "a",
    state: State = State.READY,
    *,
    busy: int = 0,
    slots: int = 1,
    used: float = 0.0,
    fp: int = 0,
    ttl: float = -1.0,
) -> InstanceView:
    return InstanceView(
        id=iid, model=model, state=state, in_flight=busy, slots=slots,
        last_used=used, footprint=fp, ttl=ttl,
    )


def snap(
    *instances: InstanceView,
    max_instances: int = 4,
    budget: int | None = None,
    replicas: dict[str, tuple[int, int]] | None = None,
) -> Snapshot:
    return Snapshot(
        now=NOW, instances=instances, max_instances=max_instances,
        memory_budget=budget, replicas=replicas or {},
    )


# -- pick_instance ---------------------------------------------------------------------

@pytest.mark.parametrize(
    ("candidates", "matched", "expected"),
    [
        pytest.param([], {}, None, id="nothing"),
        pytest.param(
            [inst("a", busy=1, slots=2), inst("b", busy=0, slots=2)], {}, "b",
            id="lowest-load",
        ),
        pytest.param(
            [inst("a", busy=2, slots=8), inst("b", busy=1, slots=2)], {}, "a",
            id="load-is-a-fraction-of-slots",
        ),
        pytest.param(
            [inst("a", slots=2, used=50), inst("b", slots=2, used=10)], {"b": LONG}, "b",
            id="match-wins-at-equal-load",
        ),
        pytest.param(
            [inst("a", busy=1, slots=2, used=10), inst("b", busy=2, slots=4, used=50)],
            {"a": LONG}, "a",
            id="match-wins-at-equal-load-different-slots",
        ),
        pytest.param(
            [inst("a", busy=0, slots=2), inst("b", busy=1, slots=2, used=50)], {"b": LONG}, "b",
            id="match-wins-over-lower-load-below-max-load",
        ),
        pytest.param(
            [inst("a", busy=0, slots=2), inst("b", busy=1, slots=2, used=50)],
            {"b": MIN_MATCH - 1}, "a",
            id="short-match-loses-to-lower-load",
        ),
        pytest.param(
            [inst("a", slots=2, used=50), inst("b", slots=2, used=10)], {"b": 10}, "b",
            id="short-match-breaks-a-tie-of-load",
        ),
        pytest.param(
            [inst("a", busy=0, slots=2), inst("b", busy=1, slots=2), inst("c", busy=1, slots=2)],
            {"b": LONG, "c": LONG + 1}, "c",
            id="longest-match-wins",
        ),
        pytest.param(
            [inst("a", slots=2, used=10), inst("b", slots=2, used=50), inst("c", slots=2, used=30)],
            {}, "b",
            id="most-recently-used-at-equal-load",
        ),
        pytest.param(
            [inst("a", used=10), inst("b", used=50)], {"gone": LONG}, "b",
            id="unknown-match-falls-back-to-mru",
        ),
        pytest.param(
            [inst("a", busy=1, used=10), inst("b", used=5)], {"a": LONG}, "b",
            id="full-match-skipped",
        ),
        pytest.param(
            [inst("a", busy=2, slots=2), inst("b", busy=1, slots=2)], {}, "b",
            id="full-skipped",
        ),
        pytest.param(
            [inst("a", busy=1), inst("b", busy=3, slots=3)], {}, None, id="all-full",
        ),
        pytest.param(
            [inst(s.value, state=s, used=99) for s in State if s is not State.READY]
            + [inst("ready", busy=1, slots=2, used=1)],
            {}, "ready",
            id="skips-non-ready-even-when-idle",
        ),
        pytest.param(
            [inst(s.value, state=s) for s in State if s is not State.READY], {"starting": LONG},
            None,
            id="only-non-ready",
        ),
    ],
)
def test_pick_instance(
    candidates: list[InstanceView], matched: dict[str, int] | None, expected: str | None
) -> None:
    got = pick_instance(candidates, matched)
    assert (got.id if got else None) == expected


def test_a_hot_replica_is_not_made_hotter_for_a_match() -> None:
    a, b = inst("a", busy=0, slots=4), inst("b", busy=2, slots=4)
    assert pick_instance([a, b], {"b": LONG}, max_load=1.0) is b
    assert pick_instance([a, b], {"b": LONG}, max_load=0.5) is a


# -- plan_launch -----------------------------------------------------------------------

WAIT = Wait("any")  # compared by type and ``never`` only: reasons are for humans
NEVER = Wait("any", never=True)
GiB = 2**30


@pytest.mark.parametrize(
    ("snapshot", "footprint", "expected"),
    [
        # Room.
        pytest.param(snap(max_instances=1), 0, Launch("x"), id="empty"),
        pytest.param(
            snap(inst("a", busy=1), inst("b"), max_instances=3), 0, Launch("x"), id="room",
        ),
        # Replicas.
        pytest.param(snap(inst("x1", "x")), 0, WAIT, id="max-replicas-default-one"),
        pytest.param(snap(inst("x1", "x", S)), 0, WAIT, id="max-replicas-counts-starting"),
        pytest.param(
            snap(inst("x1", "x", busy=1), replicas={"x": (0, 2)}), 0, Launch("x"),
            id="second-replica",
        ),
        pytest.param(
            snap(inst("x1", "x"), inst("x2", "x"), replicas={"x": (0, 2)}), 0, WAIT,
            id="max-replicas-two",
        ),
        pytest.param(
            snap(inst("x1", "x", State.FAILED), inst("x2", "x", State.STOPPED)), 0, Launch("x"),
            id="dead-replicas-do-not-count",
        ),
        # Evictions by instance count.
        pytest.param(
            snap(inst("a", used=10), inst("b", "b", used=5), max_instances=2), 0,
            Launch("x", ("b",)),
            id="evicts-lru",
        ),
        pytest.param(
            snap(inst("a", used=1), inst("b", used=2), inst("c", used=3), max_instances=3), 0,
            Launch("x", ("a",)),
            id="evicts-as-few-as-needed",
        ),
        pytest.param(
            snap(inst("a", busy=1, used=1), inst("b", used=9), max_instances=2), 0,
            Launch("x", ("b",)),
            id="never-evicts-busy",
        ),
        pytest.param(
            snap(inst("a", busy=1), inst("b", busy=2, slots=4), max_instances=2), 0, WAIT,
            id="all-busy",
        ),
        pytest.param(
            snap(inst("a", state=S), max_instances=1), 0, WAIT, id="never-evicts-starting",
        ),
        pytest.param(
            snap(inst("x1", "x", used=1), inst("a", used=5), max_instances=2,
                 replicas={"x": (0, 2)}),
            0, Launch("x", ("a",)),
            id="never-evicts-same-model",
        ),
        pytest.param(
            snap(inst("x1", "x", used=1), max_instances=1, replicas={"x": (0, 2)}), 0, WAIT,
            id="only-same-model-idle",
        ),
        pytest.param(
            snap(inst("a", state=State.FAILED), inst("b", state=State.STOPPED), inst("c"),
                 max_instances=2),
            0, Launch("x"),
            id="failed-and-stopped-take-no-room",
        ),
        # Room already being freed.
        pytest.param(
            snap(inst("a", state=X), inst("b", used=0), max_instances=2), 0, WAIT,
            id="waits-for-stopping",
        ),
        pytest.param(
            snap(inst("a", state=D, busy=1), inst("b", used=0), max_instances=2), 0, WAIT,
            id="waits-for-draining",
        ),
        pytest.param(
            snap(inst("a", state=X, fp=3), inst("b", used=1, fp=5), inst("c", busy=1, fp=2),
                 budget=10),
            6, Launch("x", ("b",)),
            id="freeing-not-enough-evicts-the-rest",
        ),
        # Memory budget.
        pytest.param(snap(inst("a", busy=1, fp=4), budget=10), 6, Launch("x"), id="fits"),
        pytest.param(snap(budget=10), 10, Launch("x"), id="exactly-the-budget"),
        pytest.param(snap(budget=10), 11, NEVER, id="larger-than-budget"),
        pytest.param(
            snap(inst("a", used=1, fp=1), budget=10), 11, NEVER,
            id="larger-than-budget-evicts-nothing",
        ),
        pytest.param(
            snap(inst("a", busy=1, fp=4), inst("b", used=1, fp=4), inst("c", used=5, fp=2),
                 budget=10),
            5, Launch("x", ("b", "c")),
            id="evicts-lru-until-it-fits",
        ),
        pytest.param(
            snap(inst("a", used=1, fp=1), inst("b", used=5, fp=6), budget=10), 5,
            Launch("x", ("a", "b")),
            id="lru-order-even-if-small",
        ),
        pytest.param(
            snap(inst("a", busy=1, fp=8), inst("b", used=1, fp=1), budget=10), 5, WAIT,
            id="busy-memory-not-evicted",
        ),
        pytest.param(snap(inst("a", state=S, fp=6), budget=10), 5, WAIT, id="starting-counts"),
        pytest.param(snap(inst("a", state=X, fp=6), budget=10), 5, WAIT, id="stopping-counts"),
        pytest.param(
            snap(inst("a", state=State.FAILED, fp=9), inst("b", state=State.STOPPED, fp=9),
                 budget=10),
            5, Launch("x"),
            id="failed-and-stopped-hold-no-memory",
        ),
        pytest.param(
            snap(inst("a", fp=100 * GiB), inst("b", fp=100 * GiB)), 100 * GiB, Launch("x"),
            id="no-budget-ignores-footprints",
        ),
    ],
)
def test_plan_launch(snapshot: Snapshot, footprint: int, expected: Launch | Wait) -> None:
    got = plan_launch(snapshot, "x", footprint)
    if isinstance(expected, Wait):
        assert isinstance(got, Wait), got
        assert got.never is expected.never, got
        assert got.reason
    else:
        assert got == expected


def test_plan_launch_reasons_name_the_model_and_sizes() -> None:
    full = plan_launch(snap(inst("x1", "x")), "x")
    assert isinstance(full, Wait) and "'x'" in full.reason and "1" in full.reason
    never = plan_launch(snap(budget=GiB), "x", 2 * GiB)
    assert isinstance(never, Wait) and never.never
    assert "2048 MiB" in never.reason and "1024 MiB" in never.reason


def test_launch_now_means_no_evictions() -> None:
    assert Launch("x").now
    assert not Launch("x", ("a",)).now


# -- expired ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("snapshot", "expected"),
    [
        pytest.param(snap(inst("a", used=50, ttl=30)), ["a"], id="ttl-passed"),
        pytest.param(snap(inst("a", used=70, ttl=30)), ["a"], id="ttl-exactly-passed"),
        pytest.param(snap(inst("a", used=71, ttl=30)), [], id="ttl-not-passed"),
        pytest.param(snap(inst("a", used=NOW, ttl=0)), ["a"], id="ttl-zero"),
        pytest.param(snap(inst("a", used=-1e9, ttl=-1)), [], id="negative-ttl-never"),
        pytest.param(snap(inst("a", busy=1, slots=2, used=0, ttl=1)), [], id="busy-never"),
        pytest.param(
            snap(*(inst(s.value, state=s, used=0, ttl=1) for s in State if s is not R)), [],
            id="only-ready-expires",
        ),
        pytest.param(
            snap(inst("a1", used=20, ttl=1), inst("a2", used=10, ttl=1),
                 replicas={"a": (1, 2)}),
            ["a2"],
            id="keeps-min-evicting-oldest",
        ),
        pytest.param(
            snap(inst("a1", used=30, ttl=1), inst("a2", used=10, ttl=1), inst("a3", used=20, ttl=1),
                 replicas={"a": (1, 3)}),
            ["a2", "a3"],
            id="keeps-min-of-three",
        ),
        pytest.param(
            snap(inst("a1", used=1, ttl=1), inst("a2", used=2, ttl=1), replicas={"a": (2, 2)}),
            [],
            id="at-min",
        ),
        pytest.param(
            snap(inst("a1", state=S), inst("a2", used=1, ttl=1), replicas={"a": (1, 2)}), ["a2"],
            id="starting-counts-toward-min",
        ),
        pytest.param(
            snap(inst("a1", busy=1, used=1, ttl=1), inst("a2", used=5, ttl=1),
                 replicas={"a": (1, 2)}),
            ["a2"],
            id="busy-counts-toward-min",
        ),
        pytest.param(
            snap(inst("a1", used=1, ttl=-1), inst("a2", used=5, ttl=1), replicas={"a": (1, 2)}),
            ["a2"],
            id="oldest-not-expired-is-kept",
        ),
        pytest.param(
            snap(inst("a1", used=1, ttl=1), inst("b1", "b", used=2, ttl=1),
                 inst("b2", "b", used=3, ttl=1), replicas={"b": (1, 2)}),
            ["a1", "b1"],
            id="per-model",
        ),
        pytest.param(
            snap(inst("a1", state=X), inst("a2", used=1, ttl=1), replicas={"a": (1, 2)}), [],
            id="stopping-does-not-count-toward-min",
        ),
        pytest.param(
            snap(inst("a1", state=D, busy=1), inst("a2", used=1, ttl=1),
                 replicas={"a": (1, 2)}),
            [],
            id="draining-does-not-count-toward-min",
        ),
    ],
)
def test_expired(snapshot: Snapshot, expected: list[str]) -> None:
    assert sorted(expired(snapshot)) == expected


# -- preempt ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("snapshot", "expected"),
    [
        pytest.param(snap(), None, id="nothing"),
        pytest.param(
            snap(inst("a", busy=1, used=5), inst("b", "b", busy=1, used=2)), "b", id="lru",
        ),
        pytest.param(snap(inst("a", used=5), inst("b", busy=1, used=9)), "a", id="idle-too"),
        pytest.param(snap(inst("x1", "x", busy=1, used=0)), None, id="not-own-model"),
        pytest.param(
            snap(*(inst(s.value, state=s) for s in State if s is not R), inst("x1", "x")), None,
            id="only-ready",
        ),
        pytest.param(
            snap(inst("x1", "x", used=0), inst("a", state=D, used=1),
                 inst("b", busy=1, used=7)),
            "b",
            id="skips-own-and-draining",
        ),
    ],
)
def test_preempt(snapshot: Snapshot, expected: str | None) -> None:
    assert preempt(snapshot, "x") == expected


# -- properties ------------------------------------------------------------------------

MODELS = ("x", "y", "z")
# Weighted toward READY so that idle instances (eviction and expiry candidates) are common.
STATES = (R, R, R, R, S, D, X, State.FAILED, State.STOPPED)
PROPS = settings(max_examples=200, deadline=None, derandomize=True, database=None)


@st.composite
def instance_views(draw: st.DrawFn, iid: str) -> InstanceView:
    state = draw(st.sampled_from(STATES))
    slots = draw(st.integers(1, 4))
    # Only a process that takes calls (or still finishes them) has any in flight.
    busy = draw(st.just(0) | st.integers(1, slots)) if state in (R, D, X) else 0
    return InstanceView(
        id=iid,
        model=draw(st.sampled_from(MODELS)),
        state=state,
        in_flight=busy,
        slots=slots,
        last_used=float(draw(st.integers(0, 100))),  # small range: ties happen
        footprint=draw(st.integers(0, 8)),
        ttl=float(draw(st.sampled_from([-1, 0, 5, 50, 200]))),
    )


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    """A snapshot within its limits, as the scheduler only ever produces those."""
    n = draw(st.integers(0, 7))
    views = [draw(instance_views(f"i{k}")) for k in range(n)]
    alive = [v for v in views if v.alive]
    per_model = Counter(v.model for v in alive)
    replicas = {}
    for m in MODELS:
        hi = max(1, per_model[m]) + draw(st.sampled_from([0, 1, 2, 2]))
        replicas[m] = (draw(st.integers(0, hi)), hi)
    used = sum(v.footprint for v in alive)
    budget = draw(st.none() | st.integers(used, used + 8))
    return Snapshot(
        now=NOW,
        instances=views,
        max_instances=max(1, len(alive) + draw(st.sampled_from([0, 0, 1, 2]))),
        memory_budget=budget,
        replicas=replicas,
    )


def _limits_hold(s: Snapshot) -> None:
    alive = [v for v in s.instances if v.alive]
    assert len(alive) <= s.max_instances
    if s.memory_budget is not None:
        assert sum(v.footprint for v in alive) <= s.memory_budget


@PROPS
@given(s=snapshots(), model=st.sampled_from(MODELS), footprint=st.integers(0, 14))
def test_plan_launch_invariants(s: Snapshot, model: str, footprint: int) -> None:
    """Drive plan_launch as the scheduler does until it launches or must wait."""
    _limits_hold(s)
    for _ in range(len(s.instances) + 3):
        decision = plan_launch(s, model, footprint)
        if isinstance(decision, Wait):
            freeing = [v for v in s.instances if v.state in (D, X)]
            if decision.never or not freeing:
                return
            # Their stop kicks the scheduler again.
            s = replace(s, instances=[v for v in s.instances if v not in freeing])
            continue
        if decision.evict:
            by_id = {v.id: v for v in s.instances}
            assert len(set(decision.evict)) == len(decision.evict)
            for iid in decision.evict:
                victim = by_id[iid]
                assert victim.in_flight == 0, f"evicts busy {victim}"
                assert victim.state is R, f"evicts {victim}"
                assert victim.model != model, f"evicts the launching model: {victim}"
            # Evicted instances go away once stopped; then the scheduler plans again.
            s = replace(s, instances=[v for v in s.instances if v.id not in decision.evict])
            continue
        launched = InstanceView(
            id="new", model=model, state=S, in_flight=0, slots=1, last_used=NOW,
            footprint=footprint,
        )
        s = replace(s, instances=[*s.instances, launched])
        _limits_hold(s)
        mine = sum(1 for v in s.instances if v.model == model and v.alive)
        assert mine <= s.replicas[model][1]
        return
    pytest.fail("plan_launch neither launched nor settled on waiting")


@PROPS
@given(s=snapshots())
def test_expired_invariants(s: Snapshot) -> None:
    out = expired(s)
    assert len(set(out)) == len(out)
    by_id = {v.id: v for v in s.instances}
    for iid in out:
        v = by_id[iid]
        assert v.in_flight == 0 and v.state is R, f"expires busy or unready {v}"
        assert 0 <= v.ttl <= s.now - v.last_used, f"expires before its ttl: {v}"
    for m in MODELS:
        keep = s.replicas[m][0]
        # Draining instances are leaving: only ready and starting ones keep the minimum.
        counted = [v for v in s.instances if v.model == m and v.state in (R, S)]
        left = [v for v in counted if v.id not in out]
        assert len(left) >= min(keep, len(counted))


@PROPS
@given(s=snapshots(), model=st.sampled_from(MODELS),
       sizes=st.lists(st.integers(0, 4 * MIN_MATCH), min_size=8, max_size=8),
       max_load=st.sampled_from([0.5, 0.75, 1.0]))
def test_pick_and_preempt_invariants(
    s: Snapshot, model: str, sizes: list[int], max_load: float
) -> None:
    # The prefix index's contract: the chosen replica holds the longest prefix worth
    # steering for among the free replicas under max_load; without one, the lowest load.
    matched = {v.id: n for v, n in zip(s.instances, sizes, strict=False)}
    got = pick_instance(s.instances, matched, max_load)
    free = [v for v in s.instances if v.state is R and v.in_flight < v.slots]
    under = [v for v in free if v.load < max_load]

    def worth(v: InstanceView) -> int:
        n = matched.get(v.id, 0)
        return n if n >= MIN_MATCH else 0

    if not free:
        assert got is None
    elif under:
        assert got in under
        longest = max(worth(v) for v in under)
        assert worth(got) == longest
        if longest == 0:
            assert got.load == min(v.load for v in under)
    else:
        assert got in free and got.load == min(v.load for v in free)

    victim = preempt(s, model)
    others = [v for v in s.instances if v.state is R and v.model != model]
    if others:
        (view,) = (v for v in others if v.id == victim)
        assert view.last_used == min(v.last_used for v in others)
    else:
        assert victim is None


def test_alive_states_are_the_ones_limits_count() -> None:
    assert {S, R, D, X} == ALIVE


# -- VRAM ----------------------------------------------------------------------------------


def test_vram_budget_limits_gpu_instances_and_evicts_for_room() -> None:
    from scheduler.scheduling.policy import InstanceView, Launch, Snapshot, Wait, plan_launch

    gib = 2**30
    a = InstanceView("a#1", "a", State.READY, 0, 1, last_used=1.0, footprint=1, vram=3 * gib)
    s = Snapshot(now=10.0, instances=[a], max_instances=4, memory_budget=None,
                 vram_budget=4 * gib, replicas={})
    # A second GPU model does not fit beside the first: evict it (idle).
    assert plan_launch(s, "b", footprint=1, vram=2 * gib) == Launch("b", ("a#1",))
    # A CPU-only model (no VRAM) fits beside it.
    assert plan_launch(s, "c", footprint=1, vram=0) == Launch("c")
    # Busy, it cannot be evicted: wait.
    busy = Snapshot(now=10.0, instances=[InstanceView("a#1", "a", State.READY, 1, 1, 1.0,
                                                      vram=3 * gib)],
                    max_instances=4, vram_budget=4 * gib)
    assert isinstance(plan_launch(busy, "b", vram=2 * gib), Wait)
    # More VRAM than the whole budget can never fit.
    never = plan_launch(s, "huge", vram=5 * gib)
    assert isinstance(never, Wait) and never.never and "VRAM budget" in never.reason


@pytest.mark.parametrize(
    ("total", "ngl", "layers", "want"),
    [
        (1000, None, 10, (256 * 2**20, 1000)),  # default: all layers on the GPU
        (1000, -1, 10, (256 * 2**20, 1000)),
        (1000, 99, 10, (256 * 2**20, 1000)),
        (1000, 0, 10, (1000, 0)),  # CPU only
        (1000, 4, 10, (600, 400)),  # partial offload
        (0, None, 10, (0, 0)),  # unknown size
    ],
)
def test_split_footprint(total: int, ngl: int | None, layers: int,
                         want: tuple[int, int]) -> None:
    from scheduler.models.sources import split_footprint

    assert split_footprint(total, ngl, layers) == want
