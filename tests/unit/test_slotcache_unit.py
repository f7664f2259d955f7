"""The slot cache's pure parts: pairing slots with conversations, file names, the
disk bound, what a config digest depends on, token counts read off an answer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.calls.usage import tokens_in
from scheduler.config.root import CorralConfig, ModelConfig
from scheduler.process.slotcache import (
    config_digest,
    enforce_bound,
    model_prefix,
    pair_slots,
    slot_file,
)


@pytest.mark.parametrize(
    ("slots", "recent", "pairs"),
    [
        # One slot: the newest conversation is the one it holds.
        ([{"id": 0, "id_task": 7, "n_prompt_tokens": 40}], ["a", "b"], [(0, "b")]),
        # Empty slots are skipped.
        ([{"id": 0, "id_task": 3, "n_prompt_tokens": 0}], ["a"], []),
        # Several: latest task first, paired with the newest conversations.
        ([{"id": 0, "id_task": 5, "n_prompt_tokens": 9},
          {"id": 1, "id_task": 9, "n_prompt_tokens": 9},
          {"id": 2, "id_task": 1, "n_prompt_tokens": 9}],
         ["x", "y", "z"], [(1, "z"), (0, "y"), (2, "x")]),
        # More slots with tokens than conversations served: only the newest ones.
        ([{"id": 0, "id_task": 5, "n_prompt_tokens": 9},
          {"id": 1, "id_task": 9, "n_prompt_tokens": 9}], ["only"], [(1, "only")]),
        # Junk from a server is ignored.
        (["junk", {"id": "0", "n_prompt_tokens": 3}], ["a"], []),
    ],
)
def test_pair_slots(slots: list[object], recent: list[str],
                    pairs: list[tuple[int, str]]) -> None:
    assert pair_slots(slots, recent) == pairs  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("affinity", "name"),
    [("0123abcd0123abcd", "0123abcd0123abcd.bin"), ("../etc/passwd", None), ("", None),
     ("ABCDEF0123456789", None), ("abc", None)],
)
def test_slot_file_names_are_plain_hex(affinity: str, name: str | None) -> None:
    assert slot_file(affinity) == name


def test_enforce_bound_drops_least_recently_used(tmp_path: Path) -> None:
    d = tmp_path / "m~1"
    d.mkdir()
    for i, age in enumerate((300, 100, 200)):
        f = d / f"{i}.bin"
        f.write_bytes(b"x" * 100)
        t = 1_000_000 - age
        os.utime(f, (t, t))
    gone = enforce_bound(tmp_path, 200)
    assert [f.name for f in gone] == ["0.bin"]
    assert sorted(f.name for f in d.iterdir()) == ["1.bin", "2.bin"]
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
    ],
)
def test_tokens_in_an_answers_tail(tail: bytes, tokens: int) -> None:
    assert tokens_in(tail) == tokens
