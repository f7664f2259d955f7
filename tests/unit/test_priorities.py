"""Pinned models (evictable = false) and model priorities in the pure policy: tables,
then properties over random snapshots."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.config.root import CorralConfig
from scheduler.process.instance import State
from scheduler.scheduling.policy import (
    InstanceView,
    Launch,
    Snapshot,
    expired,
    plan_launch,
    preempt,
)

NOW = 100.0


def inst(iid: str, model: str, *, used: float = 0.0, busy: int = 0, pinned: bool = False,
         prio: int = 0, ttl: float = -1.0, fp: int = 10) -> InstanceView:
    return InstanceView(id=iid, model=model, state=State.READY, in_flight=busy, slots=1,
                        last_used=used, footprint=fp, ttl=ttl, evictable=not pinned,
                        priority=prio)


def snap(*instances: InstanceView, max_instances: int = 2, budget: int | None = None,
         ) -> Snapshot:
    return Snapshot(now=NOW, instances=instances, max_instances=max_instances,
                    memory_budget=budget)


@pytest.mark.parametrize(
    ("snapshot", "expected"),
    [
        # The LRU instance is pinned: the other one goes.
        (snap(inst("p", "p", used=1, pinned=True), inst("b", "b", used=5)), ("b",)),
        # Lower priority goes first even when used more recently.
        (snap(inst("hi", "hi", used=1, prio=5), inst("lo", "lo", used=9, prio=-1)), ("lo",)),
        # Equal priority: least recently used.
        (snap(inst("x", "x", used=3), inst("y", "y", used=2)), ("y",)),
    ],
)
def test_eviction_order(snapshot: Snapshot, expected: tuple[str, ...]) -> None:
    assert plan_launch(snapshot, "new") == Launch("new", expected)


def test_only_pinned_instances_means_wait() -> None:
    s = snap(inst("p", "p", pinned=True), inst("q", "q", pinned=True))
    decision = plan_launch(s, "new")
    assert not isinstance(decision, Launch)


@pytest.mark.parametrize(
    ("snapshot", "priority", "expected"),
    [
        (snap(inst("p", "p", busy=1, pinned=True), inst("b", "b", busy=1, used=9)), 0, "b"),
        (snap(inst("p", "p", busy=1, pinned=True)), 0, None),
        (snap(inst("hi", "hi", busy=1, prio=3), inst("lo", "lo", busy=1, used=9)), 0, "lo"),
        # A waiting model never preempts one of higher priority.
        (snap(inst("hi", "hi", busy=1, prio=3)), 0, None),
        (snap(inst("hi", "hi", busy=1, prio=3)), 3, "hi"),
    ],
)
def test_preempt_order(snapshot: Snapshot, priority: int, expected: str | None) -> None:
    assert preempt(snapshot, "waiting", priority) == expected


def test_pinned_never_expires() -> None:
    s = snap(inst("p", "p", used=0, ttl=1, pinned=True), inst("b", "b", used=0, ttl=1))
    assert expired(s) == ["b"]


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    n = draw(st.integers(0, 6))
    views = [
        replace(inst(f"i{i}", draw(st.sampled_from("abcd")), used=draw(st.floats(0, 99)),
                     busy=draw(st.integers(0, 1)), pinned=draw(st.booleans()),
                     prio=draw(st.integers(-2, 2)), ttl=draw(st.sampled_from([-1.0, 0.0, 5.0])),
                     fp=draw(st.integers(0, 50))),
                state=draw(st.sampled_from([State.READY, State.READY, State.STARTING])))
        for i in range(n)
    ]
    return Snapshot(now=NOW, instances=views, max_instances=draw(st.integers(1, 6)),
                    memory_budget=draw(st.one_of(st.none(), st.integers(0, 200))))


@settings(max_examples=200, deadline=None)
@given(snapshots(), st.sampled_from("abcde"), st.integers(-3, 3))
def test_pinned_never_in_an_eviction_plan_preemption_or_expiry(
    s: Snapshot, model: str, priority: int
) -> None:
    pinned = {i.id for i in s.instances if not i.evictable}
    decision = plan_launch(s, model, 10)
    if isinstance(decision, Launch):
        assert not pinned & set(decision.evict)
        # Evicted in (priority, last use) order: nothing cheaper was left behind.
        evicted = [i for i in s.instances if i.id in decision.evict]
        kept = [i for i in s.instances if i.idle and i.evictable and i.model != model
                and i.id not in decision.evict]
        if evicted and kept:
            worst = max((i.priority, i.last_used) for i in evicted)
            assert all((k.priority, k.last_used) >= worst for k in kept)
    victim = preempt(s, model, priority)
    assert victim not in pinned
    if victim is not None:
        v = next(i for i in s.instances if i.id == victim)
        assert v.priority <= priority
    assert not pinned & set(expired(s))


def test_unfittable_pinned_count_is_a_config_error() -> None:
    from pydantic import ValidationError

    models = [{"name": n, "path": "/x.gguf", "evictable": False} for n in ("a", "b", "c")]
    with pytest.raises(ValidationError) as e:
        CorralConfig(models=models, scheduler={"max_instances": 2})  # type: ignore[arg-type]
    assert "pinned models (a, b, c" in str(e.value) and "max_instances is 2" in str(e.value)
    CorralConfig(models=models, scheduler={"max_instances": 3})  # type: ignore[arg-type]


def test_pinned_models_that_cannot_fit_together_are_a_check_error() -> None:
    from pathlib import Path

    from scheduler.config.checks import pinned_problems

    pinned = {"a": (600, 0), "b": (500, 0)}
    [problem] = pinned_problems(Path("c.toml"), pinned, ram=1000, vram=None)
    assert "pinned models (a, b, evictable = false)" in problem
    assert "memory budget" in problem and "scheduler.memory_budget" in problem
    assert pinned_problems(Path("c.toml"), pinned, ram=1100, vram=None) == []
    assert pinned_problems(Path("c.toml"), {"a": (0, 600), "b": (0, 500)}, None, 1000)
