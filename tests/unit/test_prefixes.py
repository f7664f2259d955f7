"""Chains of prefixes (scheduler/scheduling/prefixes.py) and the head that builds them
from a body (proxy/edge/jsonc.py): the shapes of real traffic share what they should."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.edge import jsonc
from scheduler.process.instance import State
from scheduler.scheduling import prefixes
from scheduler.scheduling.policy import InstanceView, pick_instance
from scheduler.scheduling.prefixes import PrefixIndex, common, matches

LONG_SYSTEM = "You are a coding agent. Follow the rules. " * 100


def chain(body: dict[str, Any]) -> prefixes.Chain:
    return jsonc.head(json.dumps(body).encode()).chain()


def chat(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": list(messages), **extra}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def test_a_system_less_chat_shares_its_first_turn_with_its_second() -> None:
    first = chain(chat(user("a long question " * 200)))
    second = chain(chat(user("a long question " * 200), assistant("an answer"), user("more?")))
    assert common(first, second) == first[-1][1] > 3000
    assert len(second) == len(first) + 2


def test_sessions_sharing_a_system_prompt_share_its_link() -> None:
    system = {"role": "system", "content": LONG_SYSTEM}
    a = chain(chat(system, user("fix the bug")))
    b = chain(chat(system, user("write the tests")))
    assert common(a, b) >= len(LONG_SYSTEM)
    assert common(a, b) < a[-1][1]
    # The same for Anthropic's system field, with tools, whose billing stamp changes
    # on every call of Claude Code.
    tools = [{"name": "bash", "input_schema": {"type": "object"}}]
    def claude(stamp: str, text: str) -> prefixes.Chain:
        system = f"x-anthropic-billing-header: cc_version=2.1; cch={stamp};" + LONG_SYSTEM
        return chain(chat(user(text), system=system, tools=tools))
    assert common(claude("a5145", "one"), claude("ff001", "two")) > len(LONG_SYSTEM)
    # Other tools: another prompt.
    assert common(chain(chat(user("x"), system=LONG_SYSTEM, tools=tools)),
                  chain(chat(user("x"), system=LONG_SYSTEM))) == 0


def test_an_agent_transcript_shares_every_link_of_its_past() -> None:
    messages: list[dict[str, Any]] = [{"role": "system", "content": LONG_SYSTEM}, user("go")]
    before = chain(chat(*messages))
    for i in range(300):  # past MAX_LINKS: the chain is capped, its ends kept
        messages += [{"role": "assistant", "tool_calls": [{"id": str(i), "type": "function",
                      "function": {"name": "ls", "arguments": "{}"}}]},
                     {"role": "tool", "tool_call_id": str(i), "content": "file " * 20}]
        now = chain(chat(*messages))
        assert common(before, now) == before[-1][1]
        assert len(now) <= prefixes.MAX_LINKS
        before = now


def test_responses_input_items_and_raw_prompts() -> None:
    one = chain({"model": "m", "instructions": LONG_SYSTEM, "input": [user("a")]})
    two = chain({"model": "m", "instructions": LONG_SYSTEM,
                 "input": [user("a"), assistant("b"), user("c")]})
    assert common(one, two) == one[-1][1]
    assert chain({"model": "m", "input": "just text"})  # a string is one block
    text = "lorem ipsum " * 1000
    p1 = chain({"model": "m", "prompt": text})
    p2 = chain({"model": "m", "prompt": text + " and more " * 300})
    # A grown prompt shares every whole block of its past.
    assert common(p1, p2) >= len(text) - prefixes.BLOCK
    assert chain({"model": "m"}) == ()


def test_a_big_message_is_hashed_by_its_ends() -> None:
    big = "x" * (5 * prefixes.BIG_PART)
    a = chain(chat(user(big)))
    b = chain(chat(user(big[:-10] + "y" * 10)))
    assert a != b
    # The middle is not hashed: a collision there costs only a cache miss.
    c = chain(chat(user(big[:3 * prefixes.BIG_PART] + "z" + big[3 * prefixes.BIG_PART + 1:])))
    assert a == c


def test_chain_of_a_payload_built_by_corral_is_stable() -> None:
    messages = [user("hello " * 300)]
    first = jsonc.chain_of({"messages": messages})
    second = jsonc.chain_of({"messages": [*messages, assistant("hi"), user("next")]})
    assert common(first, second) == first[-1][1]
    assert jsonc.chain_of({"prompt": "x" * 5000})[-1][1] == 5002  # the JSON string
    assert jsonc.chain_of({}) == ()


def test_the_index_is_bounded_and_forgets_the_least_recently_used() -> None:
    index = PrefixIndex(limit=10)
    old = tuple((i, i * 100) for i in range(1, 6))
    index.add(old)
    assert index.match(old) == 500
    for j in range(2):
        index.add(tuple((1000 * (j + 1) + i, i) for i in range(1, 6)))
    assert len(index) == 10
    assert index.match(old) == 0
    assert matches({"a": index, "b": PrefixIndex()}, ((2001, 1),)) == {"a": 1}
    assert matches({"a": index}, ()) == {}


@settings(max_examples=200, deadline=None)
@given(turns=st.lists(st.text(min_size=1, max_size=50), min_size=1, max_size=12),
       cut=st.integers(0, 11))
def test_common_is_the_longest_shared_message_prefix(turns: list[str], cut: int) -> None:
    full = [user(t) for t in turns]
    a = chain(chat(*full))
    b = chain(chat(*full[:cut + 1], user("a different turn")))
    shared = min(cut + 1, len(full))
    if turns[shared - 1:shared] == ["a different turn"]:
        return
    assert common(a, b) == (a[shared - 1][1] if shared <= len(a) else 0)


@settings(max_examples=200, deadline=None)
@given(
    served=st.lists(st.tuples(st.integers(0, 2), st.lists(st.integers(0, 3), min_size=1,
                                                          max_size=5)), max_size=12),
    query=st.lists(st.integers(0, 3), min_size=1, max_size=6),
    busy=st.lists(st.integers(0, 2), min_size=3, max_size=3),
)
def test_the_chosen_replica_holds_the_longest_prefix_served_under_max_load(
    served: list[tuple[int, list[int]]], query: list[int], busy: list[int]
) -> None:
    """The index and the policy together: conversations (lists of message ids, each
    message long enough to count) served to three replicas of 2 slots; a call goes to
    the replica, among those below max_load, that was served the longest prefix of it."""
    def chain_of(ids: list[int]) -> prefixes.Chain:
        return prefixes.chain_of([f"message {i} ".encode() * 200 for i in ids])

    indexes = {f"r{r}": PrefixIndex() for r in range(3)}
    for r, ids in served:
        indexes[f"r{r}"].add(chain_of(ids))
    call = chain_of(query)
    views = [InstanceView(id=f"r{r}", model="m", state=State.READY, in_flight=busy[r],
                          slots=2, last_used=0.0) for r in range(3)]
    got = pick_instance(views, matches(indexes, call), max_load=0.75)
    # Brute force: the longest prefix of the call each replica was served.
    held = {f"r{r}": 0 for r in range(3)}
    for r, ids in served:
        held[f"r{r}"] = max(held[f"r{r}"], common(chain_of(ids), call))
    free = [v for v in views if v.in_flight < v.slots]
    under = [v for v in free if v.load < 0.75]
    if not free:
        assert got is None
    elif under:
        assert got is not None and held[got.id] == max(held[v.id] for v in under)
    else:
        assert got is not None and got in free
