"""The context rule (scheduler/scheduling/contexts.py), pure: ctx_size = "auto" and the
context a call gets."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.config.models import ModelConfig
from scheduler.models.gguf_file import ModelSize
from scheduler.scheduling import contexts
from scheduler.scheduling.contexts import Contexts, Sizer

MiB = 2**20
# 16 KiB of KV cache per token: 64 MiB at 4,096 tokens.
KV = 16 * 1024


def linear(base: int = 64 * MiB, per_token: int = KV, gpu: bool = False) -> contexts.Placement:
    return lambda ctx: (0, base + per_token * ctx) if gpu else (base + per_token * ctx, 0)


def auto(name: str, ceiling: int = 32768, resident: int = 0, pinned: bool = False,
         placement: contexts.Placement | None = None) -> Sizer:
    return Sizer(name, None, ceiling, resident, pinned, placement or linear())


def test_ceiling_is_the_training_context_capped_by_max_ctx() -> None:
    assert contexts.ceiling("auto", 32768, 16384) == 16384
    assert contexts.ceiling("auto", 8192, 32768) == 8192
    # A header that says nothing: the floor, the old default.
    assert contexts.ceiling("auto", None, 32768) == 4096
    # ctx_size = N is kept as it is; 0 is the model's own, uncapped.
    assert contexts.ceiling(2048, 131072, 32768) == 2048
    assert contexts.ceiling(0, 131072, 32768) == 131072


def test_auto_without_a_budget_is_the_ceiling() -> None:
    assert contexts.plan([auto("a")], None, None) == {"a": Contexts(32768, 32768)}


def test_auto_shrinks_to_what_fits_in_steps() -> None:
    # 64 MiB + 16 KiB × ctx must fit 200 MiB: 8,704 tokens; a multiple of 1,024: 8,192.
    (ctx,) = contexts.plan([auto("a")], 200 * MiB, None).values()
    assert ctx == Contexts(8192, 8192)
    # Never below the floor, even when nothing fits (the launch then fails as before).
    assert contexts.plan([auto("a")], 10 * MiB, None)["a"].default == 4096


def test_fixed_contexts_are_kept_whatever_the_memory() -> None:
    fixed = Sizer("f", 2048, 2048, 0, False, linear())
    assert contexts.plan([fixed], 1, None)["f"] == Contexts(2048, 2048)


def test_default_fits_beside_residents_and_maximum_beside_pinned_only() -> None:
    # b keeps one instance loaded (replicas.min = 1) at 100 MiB; p is pinned at 100 MiB.
    b = Sizer("b", 2048, 2048, 1, False, lambda c: (100 * MiB, 0))
    p = Sizer("p", 2048, 2048, 1, True, lambda c: (100 * MiB, 0))
    a = auto("a", ceiling=16384)
    planned = contexts.plan([a, b, p], 400 * MiB, None)
    # Default: 200 MiB left beside b and p: 64 MiB + 16 KiB × 8,704 → 8,192.
    # Maximum: 300 MiB beside p alone (b can be evicted for it): 15,104 tokens → 14,336.
    assert planned["a"].default == 8192
    assert planned["a"].maximum == 14336
    assert planned["b"] == Contexts(2048, 2048)


def test_residents_leave_later_residents_their_floor() -> None:
    # Two pinned auto models on 300 MiB: the first may not take the room the second
    # needs at its floor (64 MiB + 64 MiB).
    first, second = auto("x", pinned=True, resident=1), auto("y", pinned=True, resident=1)
    planned = contexts.plan([first, second], 300 * MiB, None)
    need = sum(64 * MiB + KV * planned[n].default for n in ("x", "y"))
    assert need <= 300 * MiB
    assert planned["y"].default >= 4096


def test_a_model_with_several_minimum_replicas_fits_them_all() -> None:
    a = auto("a", resident=2)
    planned = contexts.plan([a], 400 * MiB, None)
    assert 2 * (64 * MiB + KV * planned["a"].default) <= 400 * MiB
    # One instance alone could have more: the maximum.
    assert planned["a"].maximum > planned["a"].default


def test_vram_budget_caps_too() -> None:
    planned = contexts.plan([auto("a", placement=linear(gpu=True))], None, 200 * MiB)
    assert planned["a"].default == 8192


@pytest.mark.parametrize(("need", "size"), [
    (0, 4096), (3000, 4096), (4097, 8192), (9000, 16384), (20000, 20000), (16384, 16384),
])
def test_launch_size_is_the_default_or_the_next_power_of_two(need: int, size: int) -> None:
    assert contexts.launch_size(need, Contexts(4096, 20000)) == size


def test_requirement_takes_a_wish_only_as_far_as_the_model_can() -> None:
    ctx = Contexts(4096, 8192)
    assert contexts.requirement(0, 0, ctx) == 0
    assert contexts.requirement(0, 16384, ctx) == 8192  # num_ctx above the maximum
    assert contexts.requirement(9000, 2048, ctx) == 9000  # a need is a need
    assert contexts.requirement(0, 16384, None) == 16384  # not known yet


@dataclass
class Inst:
    id: str
    ctx: int


def test_fitting_keeps_instances_with_room_and_those_of_unknown_size() -> None:
    small, big, remote = Inst("s", 4096), Inst("b", 16384), Inst("r", 0)
    assert contexts.fitting([small, big, remote], 0) == [small, big, remote]
    assert contexts.fitting([small, big, remote], 8000) == [big, remote]


def test_sizer_from_a_model_config() -> None:
    size = ModelSize(file_size=10 * MiB, kv_per_token=KV, training_ctx=8192, layers=4)
    cfg = ModelConfig(name="m", path="/m.gguf", parallel=2)
    s = contexts.sizer(cfg, size, False, 32768, 0)
    assert (s.fixed, s.ceiling) == (None, 8192)
    # Two slots: the KV cache of both.
    assert s.placement(1024)[0] == size.bytes(2048)
    fixed = contexts.sizer(cfg.model_copy(update={"ctx_size": 0}), size, False, 4096, 0)
    assert (fixed.fixed, fixed.ceiling) == (8192, 8192)


@given(st.lists(st.tuples(st.integers(0, 2), st.booleans(), st.integers(2048, 65536)),
                min_size=1, max_size=5),
       st.integers(64, 4096))
def test_residents_planned_together_fit_whenever_their_floors_do(
    models: list[tuple[int, bool, int]], budget_mib: int
) -> None:
    sizers = [auto(f"m{i}", ceiling=top, resident=res, pinned=pin)
              for i, (res, pin, top) in enumerate(models)]
    budget = budget_mib * MiB
    planned = contexts.plan(sizers, budget, None)

    def need(s: Sizer, ctx: int) -> int:
        return s.resident * s.placement(ctx)[0]

    floors = sum(need(s, contexts.floor(s)) for s in sizers)
    for s in sizers:
        c = planned[s.name]
        assert contexts.floor(s) <= c.default <= c.maximum <= s.ceiling
        assert c.default == s.ceiling or c.default % contexts.STEP == 0
    if floors <= budget:
        assert sum(need(s, planned[s.name].default) for s in sizers) <= budget
