"""The slot cache's pure parts: pairing slots with conversations, file names, the
disk bound, what a config digest depends on, token counts read off an answer."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from proxy.calls.usage import tokens_in
from scheduler.config.root import CorralConfig, ModelConfig
from scheduler.process.slotcache import (
    Held,
    SavedIndex,
    config_digest,
    enforce_bound,
    file_of,
    load_index,
    model_prefix,
)
from scheduler.scheduling.prefixes import common

SYS = ((11, 4000),)  # a shared system prompt: one link of 4,000 bytes
A = (*SYS, (21, 5000), (22, 6000))  # a conversation on top of it
B = (*SYS, (31, 4500))  # another session with the same system prompt


def test_held_assigns_the_free_slot_with_the_longest_prefix() -> None:
    held = Held(3)
    assert held.assign(A) == (0, 0, ())  # all fresh: the lowest id
    assert held.assign(B) == (1, 0, ())  # slot 0 is busy
    held.release(0)
    held.release(1)
    # A's next turn goes where A is; B's where B is; a third session to a fresh slot.
    a2 = (*A, (23, 7000))
    assert held.assign(a2) == (0, 6000, A)
    b2 = (*B, (32, 5000))
    assert held.assign(b2) == (1, 4500, B)
    assert held.assign(((99, 100),)) == (2, 0, ())
    assert held.assign(A) is None  # every slot busy
    held.release(2)
    # Only slot 2 is free: a call goes there whatever it holds, and says what it held.
    assert held.assign((*SYS, (41, 4100))) == (2, 0, ((99, 100),))
    held.release(2)
    held.release(0)
    held.release(1)
    # No free slot continues this session: not the fresh-less slots with the longest
    # prefix (0 and 1 hold the system prompt), the least recently used of them.
    assert held.assign((*SYS, (42, 4200))) == (0, 4000, a2)
    held.release(7)  # out of range: ignored


def _assign_by_scanning(held: Held, chain: tuple[tuple[int, int], ...]) -> int | None:
    """The ranking Held.assign keeps, written as the plain scan of every slot it was."""
    best = None
    for k, have in enumerate(held.chains):
        if held.busy[k]:
            continue
        n = common(have, chain)
        tier = 2 if have and n == have[-1][1] else 1 if not have else 0
        rank = (tier, n, -held.used[k], -k)
        best = rank if best is None or rank > best else best
    return None if best is None else -best[3]


def test_held_looks_at_slots_in_use_and_one_fresh_slot_only() -> None:
    """Held.assign skips the slots never assigned but the first; it picks what a scan
    of every slot picks, over a random run of calls and releases."""
    rng = random.Random(7)
    # Every conversation shares its first link (a system prompt) with the others.
    convs = [((1, 10), *((1000 * (c + 1) + i, 10 * (i + 1))
                         for i in range(1, rng.randint(2, 5))))
             for c in range(6)]
    held = Held(8)
    running: list[int] = []
    for _ in range(400):
        if running and (rng.random() < 0.5 or len(running) == 8):
            held.release(running.pop(rng.randrange(len(running))))
            continue
        conv = rng.choice(convs)
        chain = conv[:rng.randint(1, len(conv))]
        expected = _assign_by_scanning(held, chain)
        got = held.assign(chain)
        assert (got[0] if got is not None else None) == expected
        if got is not None:
            running.append(got[0])


def test_saved_index_finds_the_longest_saved_prefix() -> None:
    index = SavedIndex()
    assert index.longest(A) == (0, None)
    index.add(A, file_of(A))
    # Another session sharing only the system prompt gets A's file (4,000 bytes of it).
    assert index.longest((*SYS, (51, 4400))) == (4000, file_of(A))
    assert index.longest((*A, (23, 7000))) == (6000, file_of(A))
    # A hash with another size is another prefix.
    assert index.longest(((11, 3999),)) == (0, None)
    index.add(B, file_of(B))
    assert index.longest((*SYS, (51, 4400))) == (4000, file_of(B))  # the newest wins
    index.drop(file_of(B))
    assert index.longest(B) == (0, None)
    assert index.longest(A) == (6000, file_of(A))


def test_file_names_are_plain_hex() -> None:
    assert file_of(((1, 2), (255, 9))) == "00000000000000ff.bin"
    assert file_of((((1 << 63) - 1, 9),)) == "7fffffffffffffff.bin"


def test_load_index_reads_chain_files_of_existing_slots(tmp_path: Path) -> None:
    (tmp_path / file_of(A)).write_bytes(b"slot")
    (tmp_path / file_of(A)).with_suffix(".chain").write_text(json.dumps(A))
    # A chain without its slot file, and a malformed one: left out.
    (tmp_path / file_of(B)).with_suffix(".chain").write_text(json.dumps(B))
    (tmp_path / "0000000000000001.chain").write_text("[[1,")
    (tmp_path / "0000000000000001.bin").write_bytes(b"slot")
    index = load_index(tmp_path)
    assert index.longest((*A, (23, 7000))) == (6000, file_of(A))
    assert index.longest((*B, (31, 4500))) == (4000, file_of(A))


def test_enforce_bound_drops_least_recently_used(tmp_path: Path) -> None:
    d = tmp_path / "m~1"
    d.mkdir()
    for i, age in enumerate((300, 100, 200)):
        f = d / f"{i}.bin"
        f.write_bytes(b"x" * 100)
        t = 1_000_000 - age
        os.utime(f, (t, t))
        f.with_suffix(".chain").write_text("[]")
    gone = enforce_bound(tmp_path, 200)
    assert [f.name for f in gone] == ["0.bin"]
    # A slot's chain goes with it.
    assert sorted(f.name for f in d.iterdir()) == ["1.bin", "1.chain", "2.bin", "2.chain"]
    assert enforce_bound(tmp_path, 200) == []
    assert [f.name for f in enforce_bound(tmp_path, 0)] == ["2.bin", "1.bin"]


def test_config_digest_follows_what_a_saved_slot_depends_on(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    cfg = CorralConfig()
    m = ModelConfig(name="m", path=gguf)
    base = config_digest(cfg, m, gguf)
    assert config_digest(cfg, m.model_copy(update={"ttl": 5.0, "priority": 3}), gguf) == base
    assert config_digest(cfg, m.model_copy(update={"ctx_size": 8192}), gguf) != base
    assert config_digest(cfg, m.model_copy(update={"args": ("--flash-attn",)}), gguf) != base
    other = CorralConfig(llama_server={"args": ["-fa"]})  # type: ignore[arg-type]
    assert config_digest(other, m, gguf) != base
    gguf.write_bytes(b"GGUF v2")  # another file at the same path
    assert config_digest(cfg, m, gguf) != base


def test_model_prefixes_are_distinct_and_safe() -> None:
    names = ["a", "a-b", "org/model:7b", "org_model:7b", "org/model_7b"]
    prefixes = [model_prefix(n) for n in names]
    assert len(set(prefixes)) == len(names)
    assert all("/" not in p and ":" not in p and p.endswith("~") for p in prefixes)
    assert not any(p.startswith(q) for p in prefixes for q in prefixes if p != q)


@pytest.mark.parametrize(
    ("tail", "tokens"),
    [
        (b'"usage":{"completion_tokens":8,"prompt_tokens":6,"total_tokens":14}}', 14),
        (b'"timings":{"cache_n":100,"prompt_n":5,"predicted_n":3}}\n\ndata: [DONE]\n\n', 108),
        (b'"usage":{"input_tokens":7,"output_tokens":2}}', 9),
        (b'data: {"choices":[{"delta":{"content":"x"}}]}', 0),
        # The usage wins over timings when both are there.
        (b'"timings":{"prompt_n":1,"predicted_n":1},"usage":{"prompt_tokens":4,'
         b'"completion_tokens":4}', 8),
        # A name's last occurrence with a number wins (a stream's running counts); one
        # without a number is passed over.
        (b'"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n"usage":{'
         b'"prompt_tokens" : 3, "completion_tokens": 5}}', 8),
        (b'"prompt_tokens":2,"completion_tokens":2 "prompt_tokens":null', 4),
        # Only the end of a long answer is read.
        (b'"prompt_tokens":99' + b" " * 5000 + b'"output_tokens":1', 1),
    ],
)
def test_tokens_in_an_answers_tail(tail: bytes, tokens: int) -> None:
    assert tokens_in(tail) == tokens


def test_the_index_of_a_directory_removed_meanwhile_is_empty(tmp_path: Path) -> None:
    # A replica removed at runtime saves its slots before it stops; its model's
    # directory was gone (dropped meanwhile), the save raised, and the child was never
    # stopped (a fresh clone's Xinference e2e run).
    index = load_index(tmp_path / "gone")
    assert isinstance(index, SavedIndex) and index._links == {}
