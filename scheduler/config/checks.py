"""What a config must pass beyond its schema: files that exist, packages that are
installed, engines that can run, models that fit their memory budgets. ``corral check``
and the dashboard's dry run of a config edit (proxy/ops/config_edit.py) report the same
lines. Nothing here imports, executes or downloads what the config names: packages are
looked up (scheduler/models/sources.py), Hugging Face names were checked by syntax."""

from __future__ import annotations

from pathlib import Path

from scheduler.config.models import chat_template_file, shipped_templates
from scheduler.config.root import CorralConfig
from scheduler.engines.runtime import engine_problems
from scheduler.scheduling import contexts
from scheduler.scheduling.contexts import Contexts


def check_problems(path: Path, cfg: CorralConfig) -> list[str]:
    """What `corral check` finds beyond the schema, one line each; the dashboard's dry
    run of a config edit (proxy/ops/config_edit.py) reports the same."""
    from scheduler.models.sources import package_problem

    problems = []
    for m in cfg.models:
        if m.path is not None and not m.path.is_file():
            problems.append(f"{path}: model {m.name!r}: path: {m.path} does not exist")
        if m.chat_template and not chat_template_file(m.chat_template).is_file():
            problems.append(
                f"{path}: model {m.name!r}: chat_template: {m.chat_template!r} is neither a "
                f"file nor a template Corral ships ({', '.join(shipped_templates())})")
        # Looked up, never imported: a check runs nothing the config names.
        if m.package is not None and (why := package_problem(m.package)) is not None:
            problems.append(f"{path}: model {m.name!r}: package: {why}")
    if cfg.llama_server.binary is not None and not cfg.llama_server.binary.is_file():
        problems.append(f"{path}: llama_server.binary: {cfg.llama_server.binary} does not exist")
    problems += memory_problems(path, cfg)
    problems += [f"{path}: {p}" for p in engine_problems(cfg)]
    return problems


def _budgets(cfg: CorralConfig) -> tuple[int | None, int | None]:
    from scheduler.models.resources import probe_system

    sc = cfg.scheduler
    info = probe_system()
    ram = max(0, info.ram_total - sc.memory_headroom) if sc.memory_budget == "auto" else (
        sc.memory_budget
    )
    vram = (
        sum(max(0, g.vram_total - sc.vram_headroom) for g in info.gpus) or None
        if sc.vram_budget == "auto"
        else sc.vram_budget
    )
    return ram, vram


def planned_contexts(cfg: CorralConfig) -> dict[str, Contexts]:
    """Blocking: the context each local model whose file is on disk would get, as the
    scheduler plans it at start (``corral models``)."""
    from scheduler.models.sources import materialised_file, model_size

    ram, vram = _budgets(cfg)
    sizers = []
    for m in cfg.models:
        size = model_size(m, materialised_file(m)) if m.local else None
        if size is not None or (m.local and m.footprint):
            resident = max(m.replicas.min, 0 if m.evictable else 1)
            sizers.append(contexts.sizer(m, size, vram is not None, cfg.scheduler.max_ctx,
                                         resident))
    return contexts.plan(sizers, ram, vram)


def memory_problems(path: Path, cfg: CorralConfig) -> list[str]:
    """Models whose RAM or VRAM need can never fit its budget, whatever is evicted."""
    from scheduler.models.sources import materialised_file, model_placement

    ram, vram = _budgets(cfg)
    out = []
    pinned: dict[str, tuple[int, int]] = {}
    for m in cfg.models:
        if not m.local:
            continue
        need_ram, need_vram = model_placement(m, vram is not None, materialised_file(m))
        if not m.evictable:
            n = max(1, m.replicas.min)
            pinned[m.name] = (need_ram * n, need_vram * n)
        for need, budget, what, key in (
            (need_ram, ram, "memory", "memory_budget"),
            (need_vram, vram, "VRAM", "vram_budget"),
        ):
            if budget is not None and need > budget:
                out.append(
                    f"{path}: model {m.name!r}: needs {need / 2**20:.0f} MiB but the {what} "
                    f"budget is {budget / 2**20:.0f} MiB (scheduler.{key})"
                )
    out += pinned_problems(path, pinned, ram, vram)
    return out


def pinned_problems(path: Path, pinned: dict[str, tuple[int, int]], ram: int | None,
                    vram: int | None) -> list[str]:
    """Pinned models (evictable = false) are all loaded at once: they must fit
    together, or one of them could never start."""
    out = []
    names = ", ".join(pinned)
    for i, (budget, what, key) in enumerate(((ram, "memory", "memory_budget"),
                                             (vram, "VRAM", "vram_budget"))):
        need = sum(p[i] for p in pinned.values())
        if budget is not None and len(pinned) > 1 and need > budget:
            out.append(f"{path}: pinned models ({names}, evictable = false) need "
                       f"{need / 2**20:.0f} MiB together but the {what} budget is "
                       f"{budget / 2**20:.0f} MiB (scheduler.{key})")
    return out
