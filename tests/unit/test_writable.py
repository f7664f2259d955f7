"""The allow-list of keys an HTTP config write may change (scheduler/config/writable.py):
the whole schema is classified, and the changes issue 25 reported are refused."""

from __future__ import annotations

import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import pytest
from pydantic import BaseModel

from scheduler.config.root import CorralConfig, ModelConfig
from scheduler.config.writable import REFUSED, UNLISTED, WRITABLE, Key, reason, refused_changes


def _model_type(annotation: Any) -> type[BaseModel] | None:
    """The table type of a field that is one table (or none), as the dump walks it."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        tables = [a for a in get_args(annotation) if a is not type(None)]
        if len(tables) == 1:
            return _model_type(tables[0])
    return None


def schema_keys(model: type[BaseModel] = CorralConfig, prefix: Key = ()) -> Iterator[Key]:
    for name, field in model.model_fields.items():
        key = (*prefix, name)
        if key == ("models",):
            yield from schema_keys(ModelConfig, ("models", "*"))
        elif (table := _model_type(field.annotation)) is not None:
            yield from schema_keys(table, key)
        else:
            yield key


def _refused_on_purpose(key: Key) -> bool:
    return any(key[:n] in REFUSED for n in range(1, len(key) + 1))


def test_every_key_of_the_schema_is_allowed_or_refused_on_purpose() -> None:
    keys = list(schema_keys())
    assert len(keys) > 100  # the walk reached every table
    unclassified = [".".join(k) for k in keys if k not in WRITABLE and not _refused_on_purpose(k)]
    assert unclassified == [], (
        "new config keys: add each to WRITABLE (it changes nothing Corral runs, reads, "
        "writes or connects to) or REFUSED in scheduler/config/writable.py")
    both = [".".join(k) for k in keys if k in WRITABLE and _refused_on_purpose(k)]
    assert both == []
    # No stale entry: every listed key exists in the schema.
    known = set(keys)
    assert {k for k in WRITABLE if k not in known} == set()
    assert {k for k in REFUSED if not any(s[:len(k)] == k for s in known)} == set()


def test_a_key_on_neither_list_is_refused() -> None:
    assert reason(("server", "some_future_key")) == UNLISTED
    assert reason(("models", "*", "some_future_key")) == UNLISTED
    assert reason(("models", "*", "replicas", "some_future_key")) == UNLISTED
    assert reason(("models", "*", "env", "PATH")) is not None
    assert reason(("models", "*", "ttl")) is None


def _cfg(tmp_path: Path, *extra: dict[str, Any], **kw: Any) -> CorralConfig:
    model = {"name": "a", "path": str(tmp_path / "a.gguf"), **kw.pop("model", {})}
    return CorralConfig(models=[model, *extra], **kw)


def _keys(old: CorralConfig, new: CorralConfig) -> list[str]:
    return [r.dotted for r in refused_changes(old, new)]


def test_knobs_change_files_flags_and_addresses_do_not(tmp_path: Path) -> None:
    old = _cfg(tmp_path)
    knobs = _cfg(tmp_path, model={"ttl": 5, "parallel": 2, "replicas": {"max": 3},
                                  "evictable": False, "aliases": ["b"]},
                 scheduler={"max_instances": 8}, server={"log_level": "debug"})
    assert _keys(old, knobs) == []
    cases: list[tuple[dict[str, Any], str]] = [
        ({"model": {"chat_template": "/etc/passwd"}}, "models.a.chat_template"),
        ({"model": {"args": ["--foo"]}}, "models.a.args"),
        ({"model": {"env": {"X": "1"}}}, "models.a.env.X"),
        ({"model": {"path": "/etc/x"}}, "models.a.path"),
        ({"model": {"origin": "pulled"}}, "models.a.origin"),
        ({"model": {"remotes": ["http://x:1"]}}, "models.a.remotes"),
        ({"scheduler": {"slot_cache_dir": "/"}}, "scheduler.slot_cache_dir"),
        ({"llama_server": {"binary": "/bin/sh"}}, "llama_server.binary"),
        ({"server": {"admin_config_write": True}}, "server.admin_config_write"),
        ({"server": {"api_keys": ["k"]}}, "server.api_keys"),
        ({"server": {"port": 1}}, "server.port"),
        ({"models_dir": str(tmp_path)}, "models_dir"),
        ({"cluster": {"role": "node", "token": "t" * 16}}, "cluster.role"),
    ]
    for change, key in cases:
        assert key in _keys(old, _cfg(tmp_path, **change)), key


def test_a_changed_remote_key_is_seen_though_dumps_hide_it(tmp_path: Path) -> None:
    remote = {"name": "b", "remotes": [{"url": "http://x:1", "api_key": "one"}]}
    old = _cfg(tmp_path, remote)
    rekeyed = _cfg(tmp_path, {**remote, "remotes": [{"url": "http://x:1", "api_key": "two"}]})
    assert _keys(old, rekeyed) == ["models.b.remotes"]
    assert "two" not in str(refused_changes(old, rekeyed))


def test_a_new_model_is_a_variant_of_an_existing_one(tmp_path: Path) -> None:
    old = _cfg(tmp_path, model={"args": ["--mlock"]})
    variant = {"name": "b", "path": str(tmp_path / "a.gguf"), "args": ["--mlock"],
               "ctx_size": 8192}
    assert _keys(old, _cfg(tmp_path, variant, model={"args": ["--mlock"]})) == []
    # The reproducer: a served file with a template that reads any file.
    passwd = {**variant, "chat_template": "/etc/passwd"}
    assert _keys(old, _cfg(tmp_path, passwd, model={"args": ["--mlock"]})) == [
        "models.b.chat_template"]
    flags = {**variant, "args": ["--no-mmap"]}
    assert _keys(old, _cfg(tmp_path, flags, model={"args": ["--mlock"]})) == ["models.b.args"]
    elsewhere = {"name": "b", "path": "/etc/passwd"}
    assert "models.b.path" in _keys(old, _cfg(tmp_path, elsewhere, model={"args": ["--mlock"]}))
    # Removing a model runs nothing new.
    assert _keys(_cfg(tmp_path, variant, model={"args": ["--mlock"]}), old) == []


@pytest.mark.parametrize("first", [{"name": "b", "remotes": ["http://x:1"]},
                                   {"name": "b", "package": "this"}])
def test_a_first_model_is_compared_with_the_defaults(first: dict[str, Any]) -> None:
    keys = _keys(CorralConfig(), CorralConfig(models=[first]))
    assert keys == [f"models.b.{next(k for k in first if k != 'name')}"]
