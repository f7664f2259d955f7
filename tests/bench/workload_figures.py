"""The pure half of bench_workload.py: what a call log says about prompt caching.

A call log is the list of calls one configuration served, in the order they were sent,
each with the tokens of its prompt (the chat template applied, as llama-server saw it),
what llama-server reported (``cache_n`` reused, ``prompt_n`` processed), its time to
first token, and the instance that served it. Nothing here talks to a server, so
tests/unit/test_bench_workload.py checks it over synthetic logs.

The perfect cache: a call could at best reuse the longest prefix it shares with any
call of the same model sent before it (whatever instance, slot or disk file it went
to), less its last token (llama-server always evaluates at least one token to produce
the first logits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Call:
    session: str
    kind: str  # "chat", "agent" or "responses"
    model: str
    turn: int
    sent: float  # seconds since the run began
    ttft: float  # seconds from sending to the first generated text
    done: float  # seconds since the run began, at the answer's end
    cache_n: int
    prompt_n: int
    tokens: Sequence[int] = ()
    instance: str | None = None  # which process served it (a swap changes it)
    error: str | None = None
    resent: bool = False  # its connection dropped before an answer; sent again
    ideal: int = 0  # filled by fill_ideal()
    after_swap: bool = False  # filled by mark_swaps()
    messages: list[dict[str, object]] = field(default_factory=list)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Tokens two prompts share from their start."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]: halve the gap
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def fill_ideal(calls: Sequence[Call]) -> None:
    """Each call's ``ideal``: what a perfect cache would have reused (calls in sending
    order; failed calls are no one's prefix)."""
    seen: dict[str, list[Sequence[int]]] = {}
    for call in calls:
        if call.error is not None:
            continue
        earlier = seen.setdefault(call.model, [])
        best = max((common_prefix(call.tokens, t) for t in earlier), default=0)
        call.ideal = max(0, min(best, len(call.tokens) - 1))
        earlier.append(call.tokens)


def mark_swaps(calls: Sequence[Call]) -> None:
    """A call is after a swap when its session's previous call was served by another
    process of the same model: what that process held is gone but for a saved slot."""
    last: dict[str, Call] = {}
    for call in calls:
        if call.error is not None:
            continue
        prev = last.get(call.session)
        call.after_swap = (prev is not None and prev.model == call.model
                           and None not in (prev.instance, call.instance)
                           and prev.instance != call.instance)
        last[call.session] = call


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100), interpolated between the two nearest ranks."""
    if not values:
        return math.nan
    xs = sorted(values)
    rank = (len(xs) - 1) * p / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def share(part: float, whole: float) -> float:
    return part / whole if whole else math.nan


@dataclass
class Figures:
    calls: int
    errors: int
    prompt_tokens: int
    ideal: int
    reused: int
    reuse_by_kind: dict[str, float]  # reused / ideal per kind of session
    ttft_p50: float
    ttft_p95: float
    swapped_calls: int
    reprocessed_after_swaps: int  # tokens a perfect cache held but these calls processed
    chat_swap_shortfall: int | None  # worst (ideal - reused) of a chat follow-up after a swap
    system_tokens: int  # the agents' shared system prompt, as tokenized
    system_processed: int  # agent calls that processed (part of) the shared system prompt
    agent_instances: int  # processes that served agent calls
    token_mismatches: int  # calls whose tokenized length != cache_n + prompt_n
    resent: int = 0
    wall: float = 0.0

    @property
    def ratio(self) -> float:
        return share(self.reused, self.ideal)


def shared_system(calls: Sequence[Call]) -> int:
    """Tokens every agent session's first prompt starts with (the system prompt)."""
    firsts = [c.tokens for c in calls if c.kind == "agent" and c.turn == 0 and c.error is None]
    if len(firsts) < 2:
        return 0
    return min(common_prefix(firsts[0], t) for t in firsts[1:])


def figures(calls: Sequence[Call], wall: float = 0.0) -> Figures:
    """The table's column for one configuration (fill_ideal and mark_swaps first)."""
    ok = [c for c in calls if c.error is None]
    by_kind: dict[str, float] = {}
    for kind in sorted({c.kind for c in ok}):
        of = [c for c in ok if c.kind == kind]
        by_kind[kind] = share(sum(min(c.cache_n, c.ideal) for c in of),
                              sum(c.ideal for c in of))
    swapped = [c for c in ok if c.after_swap]
    chats = [c.ideal - c.cache_n for c in swapped if c.kind == "chat"]
    system = shared_system(ok)
    agents = [c for c in ok if c.kind == "agent"]
    return Figures(
        calls=len(calls), errors=len(calls) - len(ok),
        prompt_tokens=sum(c.cache_n + c.prompt_n for c in ok),
        ideal=sum(c.ideal for c in ok),
        # Reuse beyond the ideal (a reply's tokens that happened to match what the
        # client sent back) is not counted: the ratio stays a share of what was possible.
        reused=sum(min(c.cache_n, c.ideal) for c in ok),
        reuse_by_kind=by_kind,
        ttft_p50=percentile([c.ttft for c in ok], 50),
        ttft_p95=percentile([c.ttft for c in ok], 95),
        swapped_calls=len(swapped),
        reprocessed_after_swaps=sum(max(0, c.ideal - c.cache_n) for c in swapped),
        chat_swap_shortfall=max(chats) if chats else None,
        system_tokens=system,
        system_processed=sum(1 for c in agents if system and c.cache_n < system),
        agent_instances=len({c.instance for c in agents if c.instance is not None}),
        token_mismatches=sum(1 for c in ok if c.tokens
                             and len(c.tokens) != c.cache_n + c.prompt_n),
        resent=sum(1 for c in calls if c.resent),
        wall=wall,
    )


def table(columns: dict[str, Figures]) -> str:
    """One markdown table, a column per configuration."""
    def pct(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{100 * x:.0f} %"

    kinds = sorted({k for f in columns.values() for k in f.reuse_by_kind})
    rows: list[tuple[str, list[str]]] = [
        ("calls (failed, resent)", [f"{f.calls} ({f.errors}, {f.resent})"
                                    for f in columns.values()]),
        ("prompt tokens", [f"{f.prompt_tokens:,}" for f in columns.values()]),
        ("tokens a perfect cache reuses", [f"{f.ideal:,}" for f in columns.values()]),
        ("tokens reused (cache_n)", [f"{f.reused:,}" for f in columns.values()]),
        ("**reused / perfect**", [f"**{pct(f.ratio)}**" for f in columns.values()]),
        *[(f"... {k} sessions", [pct(f.reuse_by_kind.get(k, math.nan))
                                 for f in columns.values()]) for k in kinds],
        ("TTFT p50", [f"{f.ttft_p50:.2f} s" for f in columns.values()]),
        ("TTFT p95", [f"{f.ttft_p95:.2f} s" for f in columns.values()]),
        ("calls after a swap", [str(f.swapped_calls) for f in columns.values()]),
        ("tokens re-processed after swaps", [f"{f.reprocessed_after_swaps:,}"
                                             for f in columns.values()]),
        ("chat follow-up after a swap: worst shortfall",
         ["n/a" if f.chat_swap_shortfall is None else f"{f.chat_swap_shortfall} tokens"
          for f in columns.values()]),
        ("agents' system prompt (tokens)", [f"{f.system_tokens:,}" for f in columns.values()]),
        ("... processed / processes",
         [f"{f.system_processed} / {f.agent_instances}" for f in columns.values()]),
        ("wall time", [f"{f.wall:.0f} s" for f in columns.values()]),
    ]
    head = "| | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    return head + "".join(f"| {name} | " + " | ".join(cells) + " |\n" for name, cells in rows)
