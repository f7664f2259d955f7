"""A worker's call counts, recent requests and listener events reach the owner's
metrics once each (proxy/workers/owner.py take_stats / merge_stats)."""

from __future__ import annotations

from collections import Counter

import msgspec

from proxy.metrics.registry import Metrics
from proxy.metrics.scrape import CallStats
from proxy.workers.owner import ACCEPT_ERROR, Events, merge_stats, take_stats


def sample(m: Metrics, name: str, labels: dict[str, str]) -> float:
    value = m.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_stats_cross_once_and_add_up() -> None:
    worker, owner = Metrics(), Metrics()
    key = ("m", "openai", "/v1/chat/completions", 200)
    for m, n in ((worker, 3), (owner, 2)):
        st = m.calls[key] = CallStats()
        st.count = n
        st.dur[0] = n
        st.dur_sum = 0.5 * n
        st.ttft[1] = 1
        st.ttft_sum, st.ttft_count = 0.1, 1
        st.translated = n - 1
    worker.recent.append((2.0, "POST", "openai", "m", "/v1/chat/completions", 200, 0.1, "w-1"))
    owner.recent.append((1.0, "POST", "openai", "m", "/v1/chat/completions", 200, 0.1, "o-1"))
    events: Events = Counter({("8080", "refused"): 2, ("", ACCEPT_ERROR): 1})
    data = take_stats(worker, events)
    # It travels as JSON over the lease socket.
    merge_stats(owner, msgspec.json.decode(msgspec.json.encode(data)))
    st = owner.calls[key]
    assert (st.count, st.dur[0], st.dur_sum, st.ttft[1], st.ttft_count) == (5, 5, 2.5, 2, 2)
    assert st.translated == 3
    assert [r[-1] for r in owner.recent] == ["o-1", "w-1"]  # in time order
    assert sample(owner, "corral_listener_events_total",
                  {"port": "8080", "event": "refused"}) == 2
    assert sample(owner, "corral_accept_errors_total", {}) == 1
    # Taken means forgotten: nothing is sent twice.
    assert take_stats(worker, events) is None
    assert not worker.calls and not worker.recent and not events
