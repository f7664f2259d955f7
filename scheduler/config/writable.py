"""What a config write over HTTP may change: an allow-list (docs/security.md).

``PUT /admin/config``, the dashboard's editor and its pin all end in the reloader's
write, which refuses every change outside ``WRITABLE``. A key is writable only when
changing it alters neither what Corral executes (a program, its arguments beyond
Corral's own typed knobs, its environment, worker processes), nor what it reads or
writes on disk (any path, a template file, the slot cache), nor where it listens or
connects (hosts, ports, URLs, nodes), nor who may call it (keys, hosts, origins).
Everything else, and every key the schema gains later, changes only in the file on
disk: an allow-list fails closed, where the deny-list it replaces let
``chat_template = "/etc/passwd"`` and ``slot_cache_dir`` through.

``REFUSED`` names the keys refused on purpose, with why (a section or table refused
whole is one entry); tests/unit/test_writable.py walks the whole schema and fails on a
key in neither list, so a new key is a decision, not an accident.

Models are compared by name. Removing one is writable (it stops something). A new
one is writable only as a variant of a model the running config already has: every
key outside ``WRITABLE`` equal to that model's (another name, alias, context size or
slot count for the same file, flags and environment), which runs and reads nothing new.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from scheduler.config.root import CorralConfig, ModelConfig, parse_toml

# A key as a path from the top of the config; "*" stands for any model (by name).
Key = tuple[str, ...]

RUNS = "what Corral runs"
DISK = "what Corral reads or writes on disk"
NET = "where Corral listens or connects"
GUARD = "who may call Corral"
UNLISTED = "not on the allow-list of keys an HTTP write may change"

_SERVER_WRITABLE = (
    "log_level", "log_format", "default_model", "dashboard_history", "header_timeout",
    "body_timeout", "keepalive_timeout", "max_connections", "max_connections_per_client",
    "max_body_bytes_in_flight", "backlog", "gc_freeze", "gc_threshold",
)
_SCHEDULER_WRITABLE = (
    "max_instances", "max_load", "queue_size", "queue_timeout", "load_timeout",
    "default_ttl", "drain_timeout", "stop_timeout", "health_interval", "log_lines",
    "memory_budget", "memory_headroom", "vram_budget", "vram_headroom",
    "remote_check_interval", "ready_check_interval", "scan_interval", "max_ctx",
)
# Corral's own typed knobs: each becomes a fixed flag or a scheduling decision.
_MODEL_WRITABLE = (
    "name", "aliases", "ctx_size", "parallel", "n_gpu_layers", "threads", "ttl",
    "embedding", "load_timeout", "footprint", "remote_slots", "fallbacks",
    "connect_timeout", "first_byte_timeout", "stall_timeout", "rerank", "capabilities",
    "api", "loading_feedback", "evictable", "priority", "slot_cache", "passthrough_launch",
    # Request policy, variants, listings: what a call's body carries and which names
    # are shown. Corral's own fields (model, stream, id_slot) are out of a policy's reach.
    "unlisted", "variants",
)
# Tables of dotted body paths: each is writable whole, whatever paths it holds.
_MODEL_WRITABLE_TABLES = (
    ("request", "defaults"), ("request", "overrides"), ("request", "strip"),
    ("request", "clamp"),
)

WRITABLE: frozenset[Key] = frozenset({
    *(("server", k) for k in _SERVER_WRITABLE),
    *(("scheduler", k) for k in _SCHEDULER_WRITABLE),
    *(("models", "*", k) for k in _MODEL_WRITABLE),
    *(("models", "*", *k) for k in _MODEL_WRITABLE_TABLES),
    ("models", "*", "replicas", "min"),
    ("models", "*", "replicas", "max"),
})

REFUSED: dict[Key, str] = {
    ("server", "host"): NET,
    ("server", "port"): NET,
    ("server", "ollama_enabled"): NET,
    ("server", "ollama_port"): NET,
    ("server", "lmstudio_enabled"): NET,
    ("server", "lmstudio_port"): NET,
    ("server", "lmstudio_sdk_port"): NET,
    ("server", "workers"): RUNS,
    ("server", "api_keys"): GUARD,
    ("server", "allowed_hosts"): GUARD,
    ("server", "cors_origins"): GUARD,
    ("server", "admin_config_write"): GUARD,
    ("server", "capture"): DISK,
    ("scheduler", "slot_cache_dir"): DISK,
    ("scheduler", "slot_cache_size"): DISK,
    ("scheduler", "scan"): DISK,
    ("scheduler", "auto_pull"): NET,
    ("llama_server",): RUNS,
    ("models_dir",): DISK,
    ("keys",): GUARD,
    ("scan",): DISK,
    ("cluster",): NET,
    ("runtimes",): RUNS,
    ("providers",): NET,
    ("mcp_servers",): RUNS,
    # The loop's bounds limit what a call may spend on the tools above.
    ("mcp",): RUNS,
    ("models", "*", "path"): DISK,
    ("models", "*", "package"): RUNS,
    ("models", "*", "hf_repo"): NET,
    ("models", "*", "hf_file"): NET,
    ("models", "*", "hf_revision"): NET,
    ("models", "*", "args"): RUNS,
    ("models", "*", "env"): RUNS,
    ("models", "*", "remotes"): NET,
    ("models", "*", "chat_template"): DISK,
    ("models", "*", "mmproj"): DISK,
    ("models", "*", "lora"): DISK,
    # Set by Corral: "pulled" would let Ollama's delete remove the model's files.
    ("models", "*", "origin"): DISK,
    ("models", "*", "runtime"): RUNS,
    # The name a runtime is started with and calls go upstream under.
    ("models", "*", "upstream_model"): RUNS,
}


def reason(key: Key) -> str | None:
    """None when ``key`` (a normalised key: "*" for the model) may change over HTTP,
    else why not."""
    for n in range(len(key), 0, -1):
        # A writable table's keys are writable (request.defaults.temperature).
        if key[:n] in WRITABLE:
            return None
        why = REFUSED.get(key[:n])
        if why is not None:
            return why
    return UNLISTED


@dataclass(frozen=True)
class Refusal:
    """A key an HTTP write may not change: ``key`` names the model itself."""

    key: Key
    why: str

    @property
    def dotted(self) -> str:
        return ".".join(self.key)

    def __str__(self) -> str:
        return f"{self.dotted} ({self.why})"


_MISSING = object()


def _flat(data: Mapping[str, Any], prefix: Key = ()) -> Iterator[tuple[Key, Any]]:
    """(key, value) per leaf of a dump: tables are walked, arrays are leaves whole."""
    for k, v in data.items():
        if isinstance(v, Mapping):
            yield from _flat(v, (*prefix, str(k)))
        else:
            yield (*prefix, str(k)), v


def _model_leaves(m: Mapping[str, Any]) -> dict[Key, Any]:
    return dict(_flat(m))


def _defaults() -> dict[Key, Any]:
    """A model's leaves as its defaults have them (what a new model is compared with
    when the running config has none)."""
    out: dict[Key, Any] = {}
    for name, field in ModelConfig.model_fields.items():
        if field.is_required():
            continue
        value = field.get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            out.update(_flat(value.model_dump(), (name,)))
        elif isinstance(value, Mapping):
            out.update(_flat(value, (name,)))
        else:
            out[(name,)] = value
    return out


def _differences(before: Mapping[Key, Any], after: Mapping[Key, Any]) -> Iterator[Key]:
    for key in sorted(set(before) | set(after)):
        if before.get(key, _MISSING) != after.get(key, _MISSING):
            yield key


def _refused_in(before: Mapping[Key, Any], after: Mapping[Key, Any]) -> list[Key]:
    """Keys (model-relative) outside the allow-list that differ."""
    return [k for k in _differences(before, after) if reason(("models", "*", *k)) is not None]


def refused_changes(old: CorralConfig, new: CorralConfig) -> list[Refusal]:
    """Every change from ``old`` to ``new`` that an HTTP write may not make."""
    # Python mode: SecretStr values compare by their secret (a JSON dump shows
    # "**********" for every key, and a changed key would pass unseen).
    before = old.model_dump()
    after = new.model_dump()
    old_models = {m["name"]: _model_leaves(m) for m in before.pop("models")}
    new_models = {m["name"]: _model_leaves(m) for m in after.pop("models")}
    before_flat, after_flat = dict(_flat(before)), dict(_flat(after))
    out = [Refusal(k, why) for k in _differences(before_flat, after_flat)
           if (why := reason(k)) is not None]
    for name, leaves in new_models.items():
        if name in old_models:
            keys = _refused_in(old_models[name], leaves)
        else:
            # The closest model the config has: the keys in which this one differs
            # from it are what it would run or read anew, but for those it leaves at
            # their defaults (no file, no flags), which run and read nothing.
            defaults = _defaults()
            bases = list(old_models.values()) or [defaults]
            keys = min(([k for k in _refused_in(base, leaves)
                         if leaves.get(k, _MISSING) != defaults.get(k, _MISSING)]
                        for base in bases), key=len)
        out += [Refusal(("models", name, *k), reason(("models", "*", *k)) or UNLISTED)
                for k in keys]
    return out


def moved_models_dir(path: Path, text: str, current: CorralConfig) -> Refusal | None:
    """The refusal of an edit whose ``models_dir`` names another directory than the
    running one, told from the text alone: loading the edit would read the files
    there before ``refused_changes`` could refuse it."""
    try:
        wanted = parse_toml(text).get("models_dir")
    except ValueError:
        return None  # loading reports the TOML error, and reads nothing
    if not isinstance(wanted, str):
        return None
    if current.models_dir is not None and path.parent / wanted == current.models_dir:
        return None
    return Refusal(("models_dir",), DISK)
