"""A resent call avoids the upstreams it failed on (issue 25): ``policy.avoiding``."""

from __future__ import annotations

import pytest

from scheduler.process.instance import State
from scheduler.scheduling.policy import InstanceView, avoiding, pick_instance

R, S, F, D = State.READY, State.STARTING, State.FAILED, State.DRAINING


def inst(iid: str, state: State = R, busy: int = 0, slots: int = 2) -> InstanceView:
    return InstanceView(id=iid, model="m", state=state, in_flight=busy, slots=slots,
                        last_used=0.0)


def choose(views: list[InstanceView], avoid: set[str], preferred: str | None = None
           ) -> str | None:
    # "Preferred": the replica holding a long prefix of the call.
    matched = {preferred: 1 << 20} if preferred else None
    got = pick_instance(avoiding(views, frozenset(avoid)), matched)
    return None if got is None else got.id


@pytest.mark.parametrize(("views", "avoid", "preferred", "chosen"), [
    # Nothing to avoid: the usual choice (the least loaded, then the preferred).
    ([inst("a"), inst("b", busy=1)], set(), None, "a"),
    # The failed one is the least loaded and the preferred: the other all the same.
    ([inst("a"), inst("b", busy=1)], {"a"}, "a", "b"),
    # The other is full: the call waits for it rather than going back.
    ([inst("a"), inst("b", busy=2)], {"a"}, None, None),
    # The other is starting: the call waits for it.
    ([inst("a"), inst("b", S)], {"a"}, None, None),
    # Every other has failed too, or is leaving: back to the failed one, which is
    # READY only once checked again.
    ([inst("a"), inst("b", F), inst("c", D)], {"a"}, None, "a"),
    ([inst("a")], {"a"}, None, "a"),
    # Failed on two of three: the third.
    ([inst("a"), inst("b"), inst("c", busy=1)], {"a", "b"}, None, "c"),
    # Failed on all: the least loaded of them.
    ([inst("a", busy=1), inst("b")], {"a", "b"}, None, "b"),
    # A remote out of rotation after its failure is not taken back.
    ([inst("a", F)], {"a"}, None, None),
])
def test_a_resend_avoids_what_failed(views: list[InstanceView], avoid: set[str],
                                     preferred: str | None, chosen: str | None) -> None:
    assert choose(views, avoid, preferred) == chosen


def test_nothing_avoided_is_the_same_list() -> None:
    views = [inst("a"), inst("b")]
    assert avoiding(views, frozenset()) is views  # the hot path allocates nothing
