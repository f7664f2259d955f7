"""Key policy (scheduler/keys/tenants.py): lookup, scopes, sliding-window limits, usage."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.config.root import CorralConfig, KeyConfig
from scheduler.errors import ConfigError, RateLimited
from scheduler.keys.tenants import WINDOW, Key, Tenants, Usage, may_use, retry_after


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def config(*keys: dict[str, object], api_keys: tuple[str, ...] = ()) -> CorralConfig:
    return CorralConfig(keys=tuple(KeyConfig(**k) for k in keys),  # type: ignore[arg-type]
                        server={"api_keys": api_keys})  # type: ignore[arg-type]


def test_lookup_by_key_and_by_sha256_and_api_keys() -> None:
    digest = hashlib.sha256(b"bob-secret").hexdigest()
    t = Tenants(config({"name": "alice", "key": "alice-secret", "models": ["a*"]},
                       {"name": "bob", "key_sha256": digest.upper()},
                       api_keys=("legacy",)))
    alice = t.lookup(b"alice-secret")
    assert alice is not None and alice.name == "alice" and alice.models == ("a*",)
    assert not alice.admin
    bob = t.lookup(b"bob-secret")
    assert bob is not None and bob.name == "bob"
    legacy = t.lookup(b"legacy")
    # [server] api_keys keep working: every scope, admin.
    assert legacy == Key("api_keys.0", ("*",), admin=True)
    assert t.lookup(b"wrong") is None
    assert t.lookup(b"") is None
    assert t.enabled


def test_no_keys_means_disabled() -> None:
    assert not Tenants(CorralConfig()).enabled


@pytest.mark.parametrize(
    ("patterns", "names", "ok"),
    [
        (("*",), ("anything",), True),
        (("gemma",), ("gemma",), True),
        (("gemma",), ("gemma-2",), False),
        (("gemma*",), ("gemma-2",), True),
        (("qwen:*",), ("other", "qwen:7b"), True),  # an alias in scope is enough
        (("a?",), ("ab",), True),
        (("a?",), ("abc",), False),
        ((), ("a",), False),
    ],
)
def test_scope_table(patterns: tuple[str, ...], names: tuple[str, ...], ok: bool) -> None:
    assert may_use(patterns, names) is ok


@pytest.mark.parametrize(
    ("key", "usage", "expect"),
    [
        (Key("k"), Usage(in_flight=100), None),
        (Key("k", max_concurrent=2), Usage(in_flight=1), None),
        (Key("k", max_concurrent=2), Usage(in_flight=2), ("max_concurrent", 1.0)),
        (Key("k", requests_per_minute=2), Usage(requests=__import__("collections").deque(
            [990.0, 995.0])), ("requests_per_minute", 50.0)),
        (Key("k", requests_per_minute=3), Usage(requests=__import__("collections").deque(
            [990.0, 995.0])), None),
        (Key("k", tokens_per_minute=100), Usage(
            tokens=__import__("collections").deque([(950.0, 60), (980.0, 60)]),
            tokens_in_window=120), ("tokens_per_minute", 10.0)),
        (Key("k", tokens_per_minute=200), Usage(
            tokens=__import__("collections").deque([(950.0, 60), (980.0, 60)]),
            tokens_in_window=120), None),
    ],
)
def test_limit_table(key: Key, usage: Usage, expect: tuple[str, float] | None) -> None:
    assert retry_after(key, usage, 1000.0) == expect


def test_admit_release_charge_and_view() -> None:
    clock = Clock()
    t = Tenants(config({"name": "k", "key": "s", "requests_per_minute": 2,
                        "tokens_per_minute": 100, "max_concurrent": 5}), clock)
    key = t.lookup(b"s")
    assert key is not None
    t.admit(key)
    t.charge(key, 70)
    t.release(key)
    clock.now += 10
    t.admit(key)
    with pytest.raises(RateLimited) as e:
        t.admit(key)
    # The first call leaves the window 50 s from now.
    assert e.value.retry_after == pytest.approx(50.0)
    assert e.value.status == 429 and "requests_per_minute" in e.value.message
    [view] = t.view()
    assert view["usage"] == {"in_flight": 1, "requests_total": 2, "tokens_total": 70,
                             "requests_last_minute": 2, "tokens_last_minute": 70,
                             "rejected_total": 1}
    assert view["limits"] == {"max_concurrent": 5, "requests_per_minute": 2,
                              "tokens_per_minute": 100}
    assert "s" not in repr(view["name"]) and "key" not in view
    t.release(key)
    clock.now += 51
    t.admit(key)  # the window slid past the first call
    t.release(key)


def test_tokens_per_minute_refuses_while_over_and_until_the_window_slides() -> None:
    clock = Clock()
    t = Tenants(config({"name": "k", "key": "s", "tokens_per_minute": 100}), clock)
    key = t.lookup(b"s")
    assert key is not None
    t.admit(key)
    t.charge(key, 70)
    t.release(key)
    clock.now += 10
    t.admit(key)  # 70 < 100: admitted; counted after the call
    t.charge(key, 40)  # 110 in the window now: over
    t.release(key)
    with pytest.raises(RateLimited) as e:
        t.admit(key)
    assert "tokens_per_minute" in e.value.message
    # The first call's 70 tokens leave the window 60 s after they were charged.
    assert e.value.retry_after == pytest.approx(1000.0 + WINDOW - clock.now)
    clock.now = 1000.0 + WINDOW + 0.1
    t.admit(key)


def test_usage_survives_a_reload_of_the_same_name() -> None:
    t = Tenants(config({"name": "k", "key": "s"}))
    key = t.lookup(b"s")
    assert key is not None
    t.admit(key)
    t.configure(config({"name": "k", "key": "new-secret"}, {"name": "other", "key": "o"}))
    assert t.usage["k"].requests_total == 1
    assert t.lookup(b"s") is None and t.lookup(b"new-secret") is not None


@pytest.mark.parametrize(
    "keys",
    [
        [{"name": "a", "key": "x"}, {"name": "a", "key": "y"}],
        [{"name": "a", "key": "x"}, {"name": "b", "key": "x"}],
        [{"name": "a"}],
        [{"name": "a", "key": "x", "key_sha256": "0" * 64}],
        [{"name": "a", "key_sha256": "abc"}],
        [{"name": "has space", "key": "x"}],
        [{"name": "a", "key_sha256": hashlib.sha256(b"").hexdigest()}],
    ],
)
def test_invalid_keys_are_config_errors(tmp_path: object, keys: list[dict[str, object]]) -> None:
    from pathlib import Path

    from scheduler.config.root import load_config

    assert isinstance(tmp_path, Path)
    lines = []
    for k in keys:
        lines.append("[[keys]]")
        lines += [f"{n} = {v!r}".replace("'", '"') for n, v in k.items()]
    f = tmp_path / "c.toml"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "keys" in e.value.message


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=5), min_size=1, max_size=60),
       st.integers(min_value=1, max_value=5))
def test_never_more_than_rpm_calls_in_any_minute(gaps: list[float], rpm: int) -> None:
    clock = Clock()
    t = Tenants(config({"name": "k", "key": "s", "requests_per_minute": rpm}), clock)
    key = t.lookup(b"s")
    assert key is not None
    admitted: list[float] = []
    for gap in gaps:
        clock.now += gap * 10
        try:
            t.admit(key)
        except RateLimited as e:
            assert e.retry_after >= 0
            continue
        t.release(key)
        admitted.append(clock.now)
    for i, start in enumerate(admitted):
        in_window = [a for a in admitted[i:] if a < start + WINDOW]
        assert len(in_window) <= rpm


def test_a_cluster_node_that_requires_keys_accepts_the_cluster_token() -> None:
    token = "cluster-token-0123456789"
    node = CorralConfig(server={"api_keys": ["client-key"]},  # type: ignore[arg-type]
                        cluster={"role": "node", "token": token})  # type: ignore[arg-type]
    found = Tenants(node).lookup(token.encode())
    assert found is not None and found.name == "cluster.token" and found.admin
    # A node without keys is open anyway; a front's token is not a key of its own.
    assert not Tenants(CorralConfig(
        cluster={"role": "node", "token": token})).enabled  # type: ignore[arg-type]
