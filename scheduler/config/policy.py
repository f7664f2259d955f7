"""Request policy and variants: the operator's rules for the body an upstream receives.

A model's ``request`` table (and a variant's) holds four kinds of rule, each keyed by
a dotted path into the JSON body (``chat_template_kwargs.enable_thinking``):

- ``strip``: paths removed;
- ``defaults``: values set where the body has none;
- ``overrides``: values always set;
- ``clamp``: ``{min, max}`` bounds for a number the client sent.

They apply in that order to the body *the upstream receives*, after any translation
(Ollama's ``options``, LM Studio's REST and SDK fields, Anthropic Messages or Responses
turned into chat), so one rule covers a call from every port and family. A nested TOML
table is the same as its dotted keys: ``defaults = {chat_template_kwargs = {a = 1}}``
sets the one leaf ``chat_template_kwargs.a``, leaving the client's other keys.

The token limit has a different name in each body (``max_tokens``, OpenAI's
``max_completion_tokens``, Responses' ``max_output_tokens``, llama-server's
``n_predict``, which it reads first): a rule on any of them is a rule on all of them,
so a client cannot slip past a clamp by using another name. For the token limit
alone an absent or negative value means "unlimited", so a ``max`` bound also sets it
where the client sent none (Ollama's default, llama-server's -1).

A **variant** (``[[models.variants]]``: ``name``, ``params``, ``aliases``, its own
``request``) is another name for the same instances: leasing it leases its model,
and its ``params`` are overrides on top of the model's policy. ``unlisted`` hides a
model or a variant from every listing; it stays callable.

Everything here is pure: the schema, its checks, ``compile`` and ``apply``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field, JsonValue, field_validator, model_validator

from scheduler.config.base import _NAME_RE, _Strict

Path = tuple[str, ...]

# Fields Corral owns on every call: the model's name (egress), whether the dialect
# reads a stream, and the slot the slot cache chose.
RESERVED = {
    "model": "Corral sets the model's name",
    "stream": "each dialect decides whether it reads a stream",
    "id_slot": "the slot cache picks the slot",
}
# The token limit under each of its names; the first is the canonical one.
LIMIT_NAMES = ("max_tokens", "max_completion_tokens", "max_output_tokens", "n_predict")
# Upstream paths whose bodies generate text: only their calls are shaped (a tokenize
# or an embeddings call is left alone).
GENERATING = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses",
    "/completion", "/completions", "/infill",
})


def parse_path(dotted: str) -> Path:
    parts = tuple(dotted.split("."))
    if not dotted or any(not p for p in parts):
        raise ValueError(f"{dotted!r} is not a dotted path into the body (e.g. "
                         "'temperature' or 'chat_template_kwargs.enable_thinking')")
    if parts[0] in RESERVED:
        raise ValueError(f"{dotted!r}: {RESERVED[parts[0]]}, a policy may not touch it")
    if parts[0] in LIMIT_NAMES and len(parts) > 1:
        raise ValueError(f"{dotted!r}: {parts[0]} is the token limit, a number")
    return parts


def _flatten(table: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Nested tables as dotted keys; an empty table and every array stay a value."""
    for key, value in table.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, dotted)
        else:
            yield dotted, value


def _flat_values(value: object) -> object:
    return dict(_flatten(value)) if isinstance(value, Mapping) else value


_BOUND_KEYS = frozenset({"min", "max"})


def _flat_bounds(table: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in table.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value and not set(value) <= _BOUND_KEYS:
            yield from _flat_bounds(value, dotted)
        else:
            yield dotted, value


def _overlap(a: Path, b: Path) -> bool:
    """One path is the other or inside it (``x`` and ``x.y``)."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _limit(path: Path) -> bool:
    return len(path) == 1 and path[0] in LIMIT_NAMES


def _canonical(path: Path) -> Path:
    return (LIMIT_NAMES[0],) if _limit(path) else path


class Bounds(_Strict):
    # int first: a token limit's bound stays an integer in views and bodies.
    min: int | float | None = None
    max: int | float | None = None

    @model_validator(mode="after")
    def _sane(self) -> Bounds:
        if self.min is None and self.max is None:
            raise ValueError("a clamp needs 'min', 'max' or both")
        for v in (self.min, self.max):
            if v is not None and not math.isfinite(v):
                raise ValueError("clamp bounds must be finite numbers")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"clamp min ({self.min}) exceeds max ({self.max})")
        return self


class RequestPolicy(_Strict):
    defaults: dict[str, JsonValue] = Field(
        default_factory=dict, description="dotted paths set where the body has none")
    overrides: dict[str, JsonValue] = Field(
        default_factory=dict, description="dotted paths always set")
    strip: tuple[str, ...] = Field((), description="dotted paths removed")
    clamp: dict[str, Bounds] = Field(
        default_factory=dict, description="dotted paths held within {min, max}; "
        "max_tokens covers every name of the token limit")

    @field_validator("defaults", "overrides", mode="before")
    @classmethod
    def _flat(cls, value: object) -> object:
        return _flat_values(value)

    @field_validator("clamp", mode="before")
    @classmethod
    def _flat_clamp(cls, value: object) -> object:
        return dict(_flat_bounds(value)) if isinstance(value, Mapping) else value

    @field_validator("defaults", "overrides", "strip", "clamp")
    @classmethod
    def _paths(cls, value: Mapping[str, object] | tuple[str, ...]) -> object:
        for dotted in value:
            parse_path(dotted)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RequestPolicy:
        check_paths(self, {})
        return self

    @property
    def empty(self) -> bool:
        return not (self.defaults or self.overrides or self.strip or self.clamp)


def check_paths(policy: RequestPolicy, params: Mapping[str, object]) -> None:
    """Every path well formed; no path both stripped and set, or both defaulted and
    overridden (with ``params``, a variant's overrides, counted as overrides)."""
    sets = {**policy.overrides, **params}
    kinds = {"strip": policy.strip, "defaults": policy.defaults, "overrides": sets,
             "clamp": policy.clamp}
    paths = {kind: [_canonical(parse_path(p)) for p in keys] for kind, keys in kinds.items()}
    for kind, found in paths.items():
        if len(set(found)) < len(found):
            raise ValueError(f"{kind} names the token limit twice (max_tokens, "
                             "max_completion_tokens, max_output_tokens and n_predict are one)")
    for a_kind, b_kind in (("strip", "overrides"), ("strip", "defaults"),
                           ("defaults", "overrides"), ("strip", "clamp"),
                           ("overrides", "clamp")):
        for a in paths[a_kind]:
            for b in paths[b_kind]:
                if _overlap(a, b):
                    both = ".".join(a if len(a) <= len(b) else b)
                    raise ValueError(f"{a_kind} and {b_kind} both name '{both}': keep one")


class Variant(_Strict):
    name: str = Field(description="a model name clients call; served by its model's "
                      "instances")
    aliases: tuple[str, ...] = ()
    params: dict[str, JsonValue] = Field(
        default_factory=dict, description="dotted paths always set for this variant")
    request: RequestPolicy = RequestPolicy()
    unlisted: bool = Field(False, description="callable, but hidden from every listing")

    @field_validator("name", "aliases")
    @classmethod
    def _names(cls, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
        for name in (value,) if isinstance(value, str) else value:
            if not _NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a valid model name (letters, digits "
                                 "and ._:/@+- only)")
        return value

    @field_validator("params", mode="before")
    @classmethod
    def _flat(cls, value: object) -> object:
        return _flat_values(value)

    @field_validator("params")
    @classmethod
    def _paths(cls, value: Mapping[str, object]) -> object:
        for dotted in value:
            parse_path(dotted)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Variant:
        check_paths(self.request, self.params)
        return self


# --- compiled rules and their application --------------------------------------------


@dataclass(frozen=True, slots=True)
class Rules:
    """A policy ready to apply: paths split, the token limit's names made one."""

    strip: tuple[Path, ...] = ()
    defaults: tuple[tuple[Path, Any], ...] = ()
    overrides: tuple[tuple[Path, Any], ...] = ()
    clamp: tuple[tuple[Path, float | None, float | None], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.strip or self.defaults or self.overrides or self.clamp)


@dataclass(frozen=True, slots=True)
class Shape:
    """What a called name does to its calls: the model whose instances serve it, the
    name its calls are counted under, and its rules (empty: none)."""

    model: str
    label: str
    rules: Rules


def compile_rules(model: RequestPolicy, variant: Variant | None = None) -> Rules:
    """The model's policy, with a variant's on top: for a path the variant names in
    any way, the variant's rule replaces the model's."""
    strip = {_canonical(parse_path(p)): None for p in model.strip}
    defaults = {_canonical(parse_path(p)): v for p, v in model.defaults.items()}
    overrides = {_canonical(parse_path(p)): v for p, v in model.overrides.items()}
    clamp = {_canonical(parse_path(p)): (b.min, b.max) for p, b in model.clamp.items()}
    if variant is not None:
        own = variant.request
        v_strip = [_canonical(parse_path(p)) for p in own.strip]
        v_sets = {_canonical(parse_path(p)): v
                  for p, v in {**own.overrides, **variant.params}.items()}
        v_defaults = {_canonical(parse_path(p)): v for p, v in own.defaults.items()}
        named = [*v_strip, *v_sets, *v_defaults]
        for table in (strip, defaults, overrides):
            for path in list(table):
                if any(_overlap(path, n) for n in named):
                    del table[path]
        strip.update(dict.fromkeys(v_strip))
        defaults.update(v_defaults)
        overrides.update(v_sets)
        clamp.update({_canonical(parse_path(p)): (b.min, b.max) for p, b in own.clamp.items()})
        for path in list(clamp):
            if any(_overlap(path, s) for s in v_strip):
                del clamp[path]
    return Rules(tuple(strip), tuple(defaults.items()), tuple(overrides.items()),
                 tuple((p, lo, hi) for p, (lo, hi) in clamp.items()))


def limit_name(path: str) -> str:
    """The token limit's name in a body sent to ``path``."""
    if path == "/v1/responses":
        return "max_output_tokens"
    if path in ("/completion", "/completions", "/infill"):
        return "n_predict"
    return "max_tokens"


def apply(rules: Rules, body: Mapping[str, Any], path: str) -> dict[str, Any]:
    """A new body with ``rules`` applied (``body`` itself is never changed: a resend
    reuses it). ``path`` is the upstream path, which names the token limit."""
    out = dict(body)
    for p in rules.strip:
        if _limit(p):
            for name in LIMIT_NAMES:
                out.pop(name, None)
        else:
            _remove(out, p)
    for p, value in rules.defaults:
        if _limit(p):
            if not any(name in out for name in LIMIT_NAMES):
                out[limit_name(path)] = copy.deepcopy(value)
        elif not _has(out, p):
            _set(out, p, value)
    for p, value in rules.overrides:
        if _limit(p):
            for name in LIMIT_NAMES:
                out.pop(name, None)
            out[limit_name(path)] = copy.deepcopy(value)
        else:
            _set(out, p, value)
    for p, lo, hi in rules.clamp:
        if _limit(p):
            _clamp_limit(out, path, lo, hi)
        else:
            _clamp_at(out, p, lo, hi)
    return out


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _bounded(value: float, lo: float | None, hi: float | None) -> float:
    if lo is not None and value < lo:
        value = lo
    if hi is not None and value > hi:
        value = hi
    return value


def _as_count(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _clamp_limit(out: dict[str, Any], path: str, lo: float | None, hi: float | None) -> None:
    present = [name for name in LIMIT_NAMES if name in out]
    if not present and hi is not None:
        # No limit sent: llama-server would generate until the context is full.
        out[limit_name(path)] = _as_count(hi)
    for name in present:
        value = out[name]
        if not _number(value):
            continue  # the upstream answers its own error for a limit that is no number
        if value < 0 and hi is not None:
            out[name] = _as_count(hi)  # -1: unlimited
        elif value >= 0:
            out[name] = _as_count(_bounded(value, lo, hi))


def _clamp_at(out: dict[str, Any], p: Path, lo: float | None, hi: float | None) -> None:
    parent = _parent(out, p, create=False)
    if parent is None or not _number(parent.get(p[-1])):
        return
    value = parent[p[-1]]
    bounded = _bounded(value, lo, hi)
    if bounded != value:
        parent[p[-1]] = _as_count(bounded) if isinstance(value, int) else float(bounded)


def _has(out: Mapping[str, Any], p: Path) -> bool:
    node: Any = out
    for seg in p:
        if not isinstance(node, Mapping) or seg not in node:
            return False
        node = node[seg]
    return True


def _parent(out: dict[str, Any], p: Path, *, create: bool) -> dict[str, Any] | None:
    """The object holding ``p``'s last step, each object on the way copied (the body's
    own are never changed); None when the way is missing and not ``create``."""
    node = out
    for seg in p[:-1]:
        child = node.get(seg)
        if isinstance(child, dict):
            child = dict(child)
        elif create:
            child = {}
        else:
            return None
        node[seg] = child
        node = child
    return node


def _set(out: dict[str, Any], p: Path, value: Any) -> None:
    parent = _parent(out, p, create=True)
    assert parent is not None
    parent[p[-1]] = copy.deepcopy(value)


def _remove(out: dict[str, Any], p: Path) -> None:
    if _has(out, p):
        parent = _parent(out, p, create=False)
        if parent is not None:
            parent.pop(p[-1], None)


# --- names and reloads ---------------------------------------------------------------

# A model's keys that change what its calls carry and which names exist, never what
# runs: a reload that changes only these restarts nothing.
POLICY_KEYS = ("request", "variants", "unlisted")


def policy_only(old: BaseModel, new: BaseModel) -> bool:
    """Whether two model configs differ in ``POLICY_KEYS`` alone."""
    return old.model_copy(update={k: getattr(new, k) for k in POLICY_KEYS}) == new


def variant_names(variants: Iterable[Variant]) -> Iterator[str]:
    for v in variants:
        yield v.name
        yield from v.aliases
