"""The fair queue (scheduler/scheduling/queueing.py): round robin across keys, priorities,
push-out when full. Table-driven and property-based."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.scheduling.queueing import FairQueue

_seq = itertools.count()


@dataclass(eq=False)
class W:
    tenant: str
    priority: int = 0
    enqueued: float = field(default_factory=lambda: float(next(_seq)))

    def __repr__(self) -> str:
        return f"{self.tenant}{self.priority or ''}"


def drain(q: FairQueue[W]) -> list[W]:
    out = []
    while q:
        head = q[0]
        w = q.popleft()
        assert w is head  # [0] is what popleft returns
        out.append(w)
    return out


@pytest.mark.parametrize(
    ("arrivals", "served"),
    [
        ("aaaab", "abaaa"),
        ("aaabbbc", "abcabab"),
        ("abc", "abc"),
        ("aaaaaaab", "abaaaaaa"),
        ("", ""),
    ],
)
def test_round_robin_table(arrivals: str, served: str) -> None:
    q: FairQueue[W] = FairQueue()
    for t in arrivals:
        q.append(W(t))
    assert "".join(w.tenant for w in drain(q)) == served


def test_higher_priority_first_then_round_robin() -> None:
    q: FairQueue[W] = FairQueue()
    for w in (W("a"), W("a"), W("b", 5), W("c"), W("b", 5)):
        q.append(w)
    assert [repr(w) for w in drain(q)] == ["b5", "b5", "a", "c", "a"]


def test_remove_contains_len_and_oldest() -> None:
    q: FairQueue[W] = FairQueue()
    ws = [W("a"), W("b"), W("a", 1)]
    for w in ws:
        q.append(w)
    assert len(q) == 3 and ws[1] in q
    assert q.oldest() is ws[0]
    q.remove(ws[0])
    assert ws[0] not in q and len(q) == 2 and q.oldest() is ws[1]
    with pytest.raises(ValueError):
        q.remove(ws[0])
    assert q[0] is ws[2]  # the priority-1 call
    assert q.count("a") == 1 and q.count("b") == 1


def test_push_out_takes_the_biggest_backlogs_newest_call() -> None:
    q: FairQueue[W] = FairQueue()
    flood = [W("a") for _ in range(5)]
    for w in flood:
        q.append(w)
    q.append(W("b"))
    assert q.push_out("a") is None  # the flood itself gets no room
    out = q.push_out("c")
    assert out is flood[-1] and len(q) == 5
    # b has 1 waiting, a has 4: b's next call may push a out as well.
    assert q.push_out("b") is flood[-2]
    balanced: FairQueue[W] = FairQueue()
    for t in "aabb":
        balanced.append(W(t))
    assert balanced.push_out("b") is None  # a would not have more than b


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from("abcd"), max_size=40), st.sampled_from("abcde"))
def test_no_key_waits_behind_more_than_one_call_of_each_other_key(
    backlog: list[str], newcomer: str
) -> None:
    q: FairQueue[W] = FairQueue()
    for t in backlog:
        q.append(W(t))
    first = W(newcomer)
    already = q.count(newcomer)
    q.append(first)
    order = drain(q)
    ahead = order[: order.index(first)]
    others = {w.tenant for w in ahead if w.tenant != newcomer}
    # Behind at most one call of each other key per call of its own already waiting.
    for t in others:
        assert sum(1 for w in ahead if w.tenant == t) <= already + 1
    assert sum(1 for w in ahead if w.tenant == newcomer) == already


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 2)), max_size=30),
       st.data())
def test_every_call_is_served_once_in_priority_order(
    calls: list[tuple[str, int]], data: st.DataObject
) -> None:
    q: FairQueue[W] = FairQueue()
    ws = [W(t, p) for t, p in calls]
    for w in ws:
        q.append(w)
    gone = data.draw(st.lists(st.sampled_from(ws), unique=True) if ws else st.just([]))
    for w in gone:
        q.remove(w)
    order = drain(q)
    assert sorted(map(id, order)) == sorted(id(w) for w in ws if w not in gone)
    assert [w.priority for w in order] == sorted((w.priority for w in order), reverse=True)
    # Each key's calls keep their arrival order.
    for t in "abc":
        mine = [w.enqueued for w in order if w.tenant == t]
        for p in range(3):
            same = [w.enqueued for w in order if w.tenant == t and w.priority == p]
            assert same == sorted(same)
        assert len(mine) == len(set(mine))


def test_a_call_behind_the_head_of_its_key_can_be_taken_first() -> None:
    q: FairQueue[W] = FairQueue()
    a1, a2, a3, b1 = W("a"), W("a"), W("a"), W("b")
    for w in (a1, a2, a3, b1):
        q.append(w)
    assert q.head_run(2) == [a1, a2]  # only the head's key, oldest first
    q.take(a3)
    # Key a had its turn: b goes next, then a's older calls in order.
    assert drain(q) == [b1, a1, a2]
