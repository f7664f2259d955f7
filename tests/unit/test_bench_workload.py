"""The pure figures of tests/bench/bench_workload.py (the perfect cache, swaps,
percentiles) over synthetic call logs; the benchmark itself never runs in the suite."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.bench.workload_figures import (
    Call,
    common_prefix,
    figures,
    fill_ideal,
    mark_swaps,
    percentile,
    table,
)


def call(session: str, tokens: list[int], *, model: str = "a", kind: str = "chat",
         turn: int = 0, cache_n: int = 0, instance: str | None = "i1",
         error: str | None = None, ttft: float = 1.0) -> Call:
    return Call(session=session, kind=kind, model=model, turn=turn, sent=0.0, ttft=ttft,
                done=0.0, cache_n=cache_n, prompt_n=len(tokens) - cache_n, tokens=tokens,
                instance=instance, error=error)


@given(st.lists(st.integers(0, 3), max_size=40), st.lists(st.integers(0, 3), max_size=40))
def test_common_prefix_is_the_longest_shared_start(a: list[int], b: list[int]) -> None:
    n = common_prefix(a, b)
    assert a[:n] == b[:n]
    assert n == min(len(a), len(b)) or a[n] != b[n]


def test_ideal_is_the_longest_prefix_of_any_earlier_call_of_the_same_model() -> None:
    system = list(range(100))
    calls = [
        call("s1", [*system, 1, 2, 3]),
        call("s2", [*system, 7, 8]),  # shares the system prompt with s1
        call("s1", [*system, 1, 2, 3, 4, 5, 6]),  # its own history is the longest
        call("x", [*system, 1], model="b"),  # another model shares nothing
        call("s3", [9, 9]),
    ]
    fill_ideal(calls)
    assert [c.ideal for c in calls] == [0, 100, 103, 0, 0]


def test_ideal_leaves_the_last_token_and_skips_failed_calls() -> None:
    calls = [call("s1", [1, 2, 3], error="boom"), call("s1", [1, 2, 3]),
             call("s2", [1, 2, 3])]
    fill_ideal(calls)
    assert [c.ideal for c in calls[1:]] == [0, 2]  # the same prompt again: all but one


def test_a_swap_is_a_new_process_between_two_calls_of_a_session() -> None:
    calls = [call("s1", [1], instance="i1"), call("s2", [1], instance="i1"),
             call("s1", [1, 2], instance="i2"), call("s2", [1, 2], instance="i1"),
             call("s3", [1], instance=None), call("s3", [1, 2], instance="i2")]
    mark_swaps(calls)
    assert [c.after_swap for c in calls] == [False, False, True, False, False, False]


def test_figures_compare_reuse_with_the_perfect_cache() -> None:
    system = list(range(50))
    calls = [
        call("agent0", [*system, 1], kind="agent", cache_n=0),
        call("agent1", [*system, 2], kind="agent", cache_n=50),  # reused the system prompt
        call("agent2", [*system, 3], kind="agent", cache_n=10, instance="i2"),
        call("chat0", [5, 6, 7], ttft=3.0),
        call("chat0", [5, 6, 7, 8, 9, 10], cache_n=1, instance="i9", ttft=5.0),  # swapped
    ]
    fill_ideal(calls)
    mark_swaps(calls)
    f = figures(calls, wall=12.0)
    assert (f.ideal, f.reused) == (50 + 50 + 3, 50 + 10 + 1)
    assert f.ratio == pytest.approx(61 / 103)
    assert f.reuse_by_kind == {"agent": pytest.approx(0.6), "chat": pytest.approx(1 / 3)}
    assert (f.swapped_calls, f.reprocessed_after_swaps, f.chat_swap_shortfall) == (1, 2, 2)
    # agent0 and agent2 processed the shared 50 tokens, on two processes between them.
    assert (f.system_tokens, f.system_processed, f.agent_instances) == (50, 2, 2)
    assert f.token_mismatches == 0
    out = table({"x": f, "y": f})
    assert "| **reused / perfect** | **59 %** | **59 %** |" in out


def test_reuse_beyond_the_perfect_cache_is_not_counted() -> None:
    calls = [call("s", [1, 2, 3]), call("s", [1, 2, 3, 4], cache_n=3)]
    fill_ideal(calls)
    assert figures(calls).ratio == 1.0  # ideal 3, reused 3: a reply's echo is not a gain


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)
    assert percentile([7.0], 95) == 7.0
    assert math.isnan(percentile([], 50))
