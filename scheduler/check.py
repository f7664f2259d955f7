"""What `corral check` finds beyond the schema: files that are not there and models
that can never fit their memory budget. Shared by the command and the dashboard's
dry run of a config edit (``proxy/ops/config_edit.py``), so both say the same.

Blocking (stats files, probes RAM and GPUs): call through ``asyncio.to_thread``.
"""

from __future__ import annotations

from pathlib import Path

from scheduler.config import CorralConfig


def problems(path: Path, cfg: CorralConfig) -> list[str]:
    """Every problem, one line each, prefixed with ``path`` like load errors are."""
    out = []
    for m in cfg.models:
        if m.path is not None and not m.path.is_file():
            out.append(f"{path}: model {m.name!r}: path: {m.path} does not exist")
    if cfg.llama_server.binary is not None and not cfg.llama_server.binary.is_file():
        out.append(f"{path}: llama_server.binary: {cfg.llama_server.binary} does not exist")
    return out + memory_problems(path, cfg)


def memory_problems(path: Path, cfg: CorralConfig) -> list[str]:
    """Models whose RAM or VRAM need can never fit its budget, whatever is evicted."""
    from scheduler.resources import probe_system
    from scheduler.sources import materialised_file, model_placement

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
    out = []
    for m in cfg.models:
        if not m.local:
            continue
        need_ram, need_vram = model_placement(m, vram is not None, materialised_file(m))
        for need, budget, what, key in (
            (need_ram, ram, "memory", "memory_budget"),
            (need_vram, vram, "VRAM", "vram_budget"),
        ):
            if budget is not None and need > budget:
                out.append(
                    f"{path}: model {m.name!r}: needs {need / 2**20:.0f} MiB but the {what} "
                    f"budget is {budget / 2**20:.0f} MiB (scheduler.{key})"
                )
    return out
