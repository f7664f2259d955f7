"""Load cost: the median of a model's last loads, eviction weighed by it
(policy.evict_rank) and the waits told to clients (loadcost.remaining / progress)."""

from __future__ import annotations

import statistics

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.process.instance import State
from scheduler.scheduling import loadcost
from scheduler.scheduling.policy import (
    LOAD_FLOOR,
    InstanceView,
    Launch,
    Snapshot,
    evict_rank,
    plan_launch,
    preempt,
)

PROPS = settings(max_examples=200, deadline=None, derandomize=True, database=None)
NOW = 1000.0


def idle(iid: str, model: str, *, used: float, cost: float, priority: int = 0,
         busy: int = 0) -> InstanceView:
    return InstanceView(id=iid, model=model, state=State.READY, in_flight=busy, slots=1,
                        last_used=used, footprint=1, priority=priority, load_cost=cost)


def full(*views: InstanceView) -> Snapshot:
    """A machine with room for exactly the instances given: a launch must evict one."""
    return Snapshot(now=NOW, instances=views, max_instances=len(views))


def test_the_dear_model_outlives_the_cheap_one_when_equally_idle() -> None:
    slow = idle("slow#1", "slow", used=NOW - 60, cost=40.0)
    quick = idle("quick#1", "quick", used=NOW - 60, cost=2.0)
    for order in ((slow, quick), (quick, slow)):
        assert plan_launch(full(*order), "new") == Launch("new", ("quick#1",))


def test_idle_long_enough_the_dear_model_goes_first() -> None:
    # idle/41 against idle/3: the 40 s model goes once it has sat ~14x longer.
    slow = idle("slow#1", "slow", used=NOW - 15 * 60, cost=40.0)
    quick = idle("quick#1", "quick", used=NOW - 60, cost=2.0)
    assert plan_launch(full(slow, quick), "new") == Launch("new", ("slow#1",))


def test_priority_still_comes_first() -> None:
    slow = idle("slow#1", "slow", used=NOW - 60, cost=40.0, priority=-1)
    quick = idle("quick#1", "quick", used=NOW - 60, cost=2.0, priority=5)
    assert plan_launch(full(slow, quick), "new") == Launch("new", ("slow#1",))


def test_preemption_weighs_load_cost_too() -> None:
    slow = idle("slow#1", "slow", used=NOW - 60, cost=40.0, busy=1)
    quick = idle("quick#1", "quick", used=NOW - 60, cost=2.0, busy=1)
    assert preempt(full(slow, quick), "new") == "quick#1"


views = st.sampled_from("abcde").flatmap(lambda model: st.builds(
    idle, st.just(model + "#1"), st.just(model),
    used=st.floats(0, NOW), cost=st.floats(0, 300), priority=st.integers(-1, 1)))


@PROPS
@given(st.lists(views, min_size=2, max_size=5, unique_by=lambda v: v.model))
def test_the_victim_is_the_first_by_the_documented_formula(vs: list[InstanceView]) -> None:
    decision = plan_launch(full(*vs), "new")
    assert isinstance(decision, Launch) and len(decision.evict) == 1
    victim = next(v for v in vs if v.id == decision.evict[0])
    for other in vs:
        # No other instance has a lower priority, nor, at the victim's priority, a
        # higher score of idle seconds per second of reload.
        assert other.priority >= victim.priority
        if other.priority == victim.priority:
            score = (NOW - other.last_used) / (other.load_cost + LOAD_FLOOR)
            assert score <= (NOW - victim.last_used) / (victim.load_cost + LOAD_FLOOR) + 1e-9


@PROPS
@given(age=st.floats(0, NOW), cheap=st.floats(0, 100), extra=st.floats(0.01, 100),
       priority=st.integers(-1, 1))
def test_equally_idle_the_cheaper_load_is_evicted_first(
    age: float, cheap: float, extra: float, priority: int
) -> None:
    a = idle("a#1", "a", used=NOW - age, cost=cheap, priority=priority)
    b = idle("b#1", "b", used=NOW - age, cost=cheap + extra, priority=priority)
    assert evict_rank(a, NOW) <= evict_rank(b, NOW)
    if age > 0:
        assert plan_launch(full(b, a), "new") == Launch("new", ("a#1",))


@PROPS
@given(st.lists(st.floats(0, 1000), min_size=1, max_size=20))
def test_the_median_is_of_the_last_few_loads(times: list[float]) -> None:
    lt = loadcost.LoadTimes()
    for t in times:
        lt.add(t)
    assert len(lt) == min(len(times), loadcost.SAMPLES)
    assert lt.median == statistics.median(times[-loadcost.SAMPLES:])


def test_a_model_never_loaded_has_no_median() -> None:
    assert loadcost.LoadTimes().median is None


@PROPS
@given(expected=st.none() | st.floats(0, 600), elapsed=st.floats(0, 1200))
def test_waits_are_at_least_a_second_and_progress_never_completes(
    expected: float | None, elapsed: float
) -> None:
    left = loadcost.remaining(expected, elapsed)
    assert left >= 1.0
    if expected is not None and expected - elapsed >= 1.0:
        assert left == expected - elapsed
    p = loadcost.progress(expected, elapsed)
    assert 0.0 <= p <= 0.99


@PROPS
@given(expected=st.floats(0.5, 600), a=st.floats(0, 1200), b=st.floats(0, 1200))
def test_progress_only_rises(expected: float, a: float, b: float) -> None:
    lo, hi = sorted((a, b))
    assert loadcost.progress(expected, lo) <= loadcost.progress(expected, hi)
