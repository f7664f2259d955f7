"""``corral doctor``: what Corral can see of this machine, as (label, value) rows.

Diagnostics must work on a broken setup, so nothing here raises for a missing
binary, toolchain or GPU stack; each problem becomes the text of its row.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from scheduler.config.root import CorralConfig
from scheduler.errors import BinaryNotFound, CorralError
from scheduler.installing import install
from scheduler.models import resources
from scheduler.process import limits

Row = tuple[str, str]

NOT_FOUND = "not found — run `corral install-llama-server`"


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def tree_size(root: Path) -> int:
    """Bytes of regular files under ``root``; symlinks are not followed."""
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(directory, name))
            except OSError:  # removed while we walk: a build may be running
                continue
            if not os.path.islink(os.path.join(directory, name)):
                total += st.st_size
    return total


def _corral_version() -> str:
    try:
        return importlib.metadata.version("corral")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed as a package)"


def _tool_version(path: str) -> str:
    try:
        done = subprocess.run(
            [path, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return path
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    # nvcc ends with "Build cuda_13.0...", cmake starts with "cmake version 3.25.1".
    release = next((line for line in lines if "release" in line), lines[0] if lines else "")
    return f"{path} ({release.strip()})" if release else path


def _binary_rows(configured: Path | None) -> list[Row]:
    try:
        found = install.locate_llama_server(configured)
    except BinaryNotFound as exc:
        return [("llama-server", f"error: {exc.message}")]
    if found is None:
        return [("llama-server", NOT_FOUND)]
    rows = [
        ("llama-server", f"{found.path} (from {found.source})"),
        ("llama-server version", install.binary_version(found.path) or "unknown"),
    ]
    if found.source == "cache":
        rows.append(("llama-server variant", found.path.parent.parent.name))
    else:
        rows.append(("llama-server variant", "unknown (not built by Corral)"))
    return rows


def _build_variant_row() -> Row:
    try:
        variant = install.default_variant()
    except CorralError as exc:
        return ("install would build", f"error: {exc.message}")
    if os.environ.get("CORRAL_LLAMA_VARIANT"):
        why = "CORRAL_LLAMA_VARIANT"
    elif variant == "cuda":
        why = "nvcc and an NVIDIA driver found"
    elif install.find_nvcc() is not None:
        why = "nvcc found but no NVIDIA driver"
    else:
        why = "no nvcc"
    return ("install would build", f"{variant} ({why})")


def _memory_row(info: resources.SystemInfo) -> Row:
    text = f"{human_bytes(info.ram_total)} total, {human_bytes(info.ram_available)} available"
    if info.cgroup_limit is not None:
        text += f" (cgroup limit {human_bytes(info.cgroup_limit)})"
    return ("RAM", text)


def _gpu_rows(info: resources.SystemInfo) -> list[Row]:
    if not info.gpus:
        return [("GPUs", f"none ({info.gpu_note})")]
    return [
        (
            f"GPU {gpu.index}",
            f"{gpu.name}, {human_bytes(gpu.vram_total)} total, {human_bytes(gpu.vram_free)} free",
        )
        for gpu in info.gpus
    ] + [("NVIDIA", info.gpu_note)]


def doctor_report(configured_binary: Path | None = None) -> list[Row]:
    """Rows for ``corral doctor``; blocking (runs binaries, walks the cache)."""
    system = resources.probe_system()
    nvcc = install.find_nvcc()
    cmake = shutil.which("cmake")
    cache = install.corral_cache_dir()
    cache_text = (
        f"{cache} ({human_bytes(tree_size(cache))})" if cache.is_dir() else f"{cache} (empty)"
    )
    return [
        ("Corral", _corral_version()),
        ("Python", f"{platform.python_version()} ({sys.executable})"),
        *_binary_rows(configured_binary),
        _build_variant_row(),
        ("CPU", system.cpu_model),
        ("cores", str(system.logical_cores)),
        _memory_row(system),
        *_gpu_rows(system),
        ("nvcc", _tool_version(str(nvcc)) if nvcc else "not found"),
        ("cmake", _tool_version(cmake) if cmake else "not found (needed to build llama-server)"),
        ("cache", cache_text),
        _nofile_row(),
        _backlog_row(),
    ]


def _nofile_row(config: CorralConfig | None = None) -> Row:
    """The open-file limit against what the default (or given) config may need."""
    cfg = config or CorralConfig()
    ports = 1 + cfg.server.ollama_enabled + cfg.server.lmstudio_enabled
    need = limits.needed(cfg.scheduler.max_instances, cfg.server.max_connections, ports)
    soft, hard = limits.nofile()
    text = f"soft {soft}, hard {hard}; Corral raises the soft limit to {hard} at start"
    if hard < need:
        text += (f" — WARNING: up to {need} may be needed (max_connections × ports + "
                 "instances); raise LimitNOFILE / ulimit -n")
    return ("open files", text)


def _backlog_row(config: CorralConfig | None = None) -> Row:
    """The listen backlog in force against the configured one: a burst of new
    connections beyond it is dropped by the kernel (ListenOverflows) and retried by
    clients a second or more later."""
    wanted = (config or CorralConfig()).server.backlog
    cap = limits.somaxconn()
    if cap is None:
        return ("listen backlog", f"{wanted} ([server] backlog); somaxconn unreadable")
    used = limits.backlog(wanted, cap)
    text = f"{used} per port ([server] backlog {wanted}, net.core.somaxconn {cap})"
    if used < wanted:
        text += (f" — WARNING: capped by somaxconn; raise it with "
                 f"sysctl -w net.core.somaxconn={wanted}")
    return ("listen backlog", text)
