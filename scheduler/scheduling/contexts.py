"""How much context each instance of a model gets. Pure: no I/O, no logging.

``ctx_size = "auto"`` (the default) gives a model its training context, capped by
``[scheduler] max_ctx`` and by memory; ``ctx_size = N`` gives every instance N tokens per
slot, as before. Two figures per model come out of ``plan()``:

* ``default``: what a launch gets unless a call needs more. The largest context (a
  multiple of ``STEP``, or the cap itself) whose footprint fits the budget beside what
  stays loaded whatever happens: pinned models and every model's ``replicas.min``
  instances, each at its own default. Models that stay loaded are planned first, in
  config order, each leaving the later ones room for their ``FLOOR``; the others fit
  beside all of them.
* ``maximum``: the most a call can get: the largest context whose footprint fits
  beside the *pinned* models alone (everything else can be evicted for it).

A call that needs more than the instances it could use have (an Ollama ``num_ctx``, an
LM Studio ``context_length``, or a prompt longer than their context) is served by an
instance whose context fits: a running one, or a replica launched at ``launch_size()``.
A need above ``maximum`` fits nothing: the caller gets its family's "too long" error.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from scheduler.config.models import AUTO_CTX_FLOOR as FLOOR
from scheduler.config.models import ModelConfig
from scheduler.models.sources import placement_at

if TYPE_CHECKING:
    from scheduler.models.gguf_file import ModelSize

# Contexts chosen to fit memory are multiples of this many tokens.
STEP = 1024

# ctx per slot -> (RAM, VRAM) that one instance launched with it needs.
Placement = Callable[[int], tuple[int, int]]


@dataclass(frozen=True, slots=True)
class Sizer:
    """What plan() needs to know about one local model."""

    name: str
    # The context every instance gets, set by the config (ctx_size = N, or 0 resolved to
    # the training context); None: "auto".
    fixed: int | None
    # The most context an instance may get before memory is considered.
    ceiling: int
    # Instances kept loaded whatever happens (pinned: max(1, replicas.min); else min).
    resident: int
    pinned: bool
    placement: Placement


@dataclass(frozen=True, slots=True)
class Contexts:
    default: int  # tokens per slot a launch gets unless a call needs more
    maximum: int  # the most tokens per slot a call of the model can get


def sizer(cfg: ModelConfig, size: ModelSize | None, gpu: bool, max_ctx: int,
          resident: int) -> Sizer:
    """A model's Sizer from its config and what its GGUF header says (None: unknown)."""
    top = ceiling(cfg.ctx_size, size.training_ctx if size else None, max_ctx)
    return Sizer(cfg.name, cfg.fixed_ctx or (top if cfg.ctx_size == 0 else None), top,
                 resident, not cfg.evictable, functools.partial(placement_at, cfg, size, gpu))


def ceiling(ctx_size: int | str, training: int | None, max_ctx: int) -> int:
    """The most context a model may get before memory is considered."""
    if isinstance(ctx_size, int) and ctx_size > 0:
        return ctx_size
    if ctx_size == 0:
        return training or FLOOR
    return min(training or FLOOR, max_ctx)


def floor(s: Sizer) -> int:
    return s.fixed if s.fixed is not None else min(s.ceiling, FLOOR)


def fit(s: Sizer, ram: int | None, vram: int | None, count: int = 1) -> int:
    """The largest context for ``s`` whose ``count`` instances fit in ``ram`` and
    ``vram`` bytes (None: not enforced); ``floor(s)`` when even that does not fit (the
    launch then waits for room, or fails, as any launch does)."""
    if s.fixed is not None:
        return s.fixed

    def fits(ctx: int) -> bool:
        r, v = s.placement(ctx)
        return ((ram is None or r * count <= ram)
                and (vram is None or v * count <= vram))

    if fits(s.ceiling):
        return s.ceiling
    low = floor(s)
    # Footprints grow with the context: a binary search over multiples of STEP.
    lo, hi = max(1, low // STEP), (s.ceiling - 1) // STEP
    best = 0
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(mid * STEP):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return max(low, best * STEP)


def _less(budget: int | None, used: int) -> int | None:
    return None if budget is None else budget - used


def plan(sizers: Sequence[Sizer], ram: int | None, vram: int | None) -> dict[str, Contexts]:
    """Each model's default and maximum context (module docstring)."""
    defaults: dict[str, int] = {}
    residents = [s for s in sizers if s.resident > 0]

    def need(s: Sizer, ctx: int, count: int) -> tuple[int, int]:
        r, v = s.placement(ctx)
        return r * count, v * count

    # What the residents not planned yet need at least.
    pending = {s.name: need(s, floor(s), s.resident) for s in residents}
    used_ram = used_vram = 0
    for s in residents:
        del pending[s.name]
        later_ram = sum(r for r, _ in pending.values())
        later_vram = sum(v for _, v in pending.values())
        ctx = fit(s, _less(ram, used_ram + later_ram), _less(vram, used_vram + later_vram),
                  s.resident)
        defaults[s.name] = ctx
        r, v = need(s, ctx, s.resident)
        used_ram, used_vram = used_ram + r, used_vram + v
    for s in sizers:
        if s.name not in defaults:
            defaults[s.name] = fit(s, _less(ram, used_ram), _less(vram, used_vram))
    out: dict[str, Contexts] = {}
    for s in sizers:
        pinned = [need(p, defaults[p.name], p.resident) for p in sizers
                  if p.pinned and p.name != s.name]
        most = fit(s, _less(ram, sum(r for r, _ in pinned)),
                   _less(vram, sum(v for _, v in pinned)))
        out[s.name] = Contexts(defaults[s.name], max(most, defaults[s.name]))
    return out


def launch_size(need: int, ctx: Contexts) -> int:
    """The context to launch a replica with for a call that needs ``need`` tokens per
    slot (need <= ctx.maximum): the default when it is enough, else the next power of
    two (fewer distinct sizes, each reused by more calls), capped at the maximum."""
    if need <= ctx.default:
        return ctx.default
    size = 1 << max(0, need - 1).bit_length()
    return max(need, min(size, ctx.maximum))


def requirement(need: int, want: int, ctx: Contexts | None) -> int:
    """Tokens per slot a call must have: what it needs (its prompt), and what it asked
    for (num_ctx, context_length) as far as the model can give it."""
    if want <= need:
        return need
    return max(need, want if ctx is None else min(want, ctx.maximum))


S = TypeVar("S")


def context_of(servable: object) -> int:
    """Tokens per slot of an instance; 0 when unknown (a remote, another runtime)."""
    ctx = getattr(servable, "ctx", 0)
    return ctx if isinstance(ctx, int) else 0


def fitting(servables: Iterable[S], need: int) -> list[S]:
    """The upstreams whose context holds ``need`` tokens per slot; those whose context
    is unknown (remotes) are left in: they answer for themselves."""
    items = list(servables)
    if need <= 0:
        return items
    return [s for s in items if context_of(s) == 0 or context_of(s) >= need]
