"""Machine probes: CPU, RAM (and a cgroup's limit), NVIDIA GPUs.

Every function here blocks (psutil scans, NVML calls, file reads); async callers use
``asyncio.to_thread``. Probes never raise for a missing GPU stack: no ``pynvml``, no
driver or no GPU all read as "no GPUs". What a model file needs is
``scheduler/models/gguf_file.py``.
"""

from __future__ import annotations

import importlib
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GpuInfo:
    index: int
    name: str
    vram_total: int
    vram_free: int


@dataclass(frozen=True, slots=True)
class SystemInfo:
    cpu_model: str
    logical_cores: int
    ram_total: int
    ram_available: int  # already capped by a cgroup memory limit, when there is one
    cgroup_limit: int | None  # bytes; None when the process is not memory-limited
    gpus: tuple[GpuInfo, ...]
    gpu_note: str  # why ``gpus`` is empty, or the NVML driver version when it is not


def probe_system() -> SystemInfo:
    vm = psutil.virtual_memory()
    limit = cgroup_memory_limit()
    gpus, note = probe_gpus()
    return SystemInfo(
        cpu_model=cpu_model(),
        logical_cores=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        ram_total=min(vm.total, limit) if limit else vm.total,
        ram_available=ram_available(),
        cgroup_limit=limit,
        gpus=tuple(gpus),
        gpu_note=note,
    )


def ram_available() -> int:
    """Bytes a new process can still use: host available RAM, capped by our cgroup.

    In a container /proc/meminfo shows the host; budgeting against it instead of the
    container limit gets children OOM-killed.
    """
    available = int(psutil.virtual_memory().available)
    headroom = cgroup_memory_headroom()
    return min(available, headroom) if headroom is not None else available


def vram_free() -> list[int]:
    """Free VRAM per GPU in NVML index order; empty when there are no usable GPUs."""
    gpus, _ = probe_gpus()
    return [gpu.vram_free for gpu in gpus]


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        with cpuinfo.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                key, _, value = line.partition(":")
                # x86 says "model name"; some ARM kernels only say "Hardware" or "Model".
                if key.strip() in ("model name", "Hardware", "Model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def probe_gpus() -> tuple[list[GpuInfo], str]:
    """NVIDIA GPUs via NVML, and a note for humans (driver version, or why none)."""
    try:
        # Imported by name: nvidia-ml-py is optional and has no type information.
        nvml: Any = importlib.import_module("pynvml")
    except ImportError:
        return [], "NVML not available: no pynvml module (pip install nvidia-ml-py)"
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError subclasses, or OSError from loading the library
        return [], f"NVML not available: {exc}"
    try:
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                GpuInfo(
                    index=index,
                    # Older nvidia-ml-py releases return bytes.
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    vram_total=int(memory.total),
                    vram_free=int(memory.free),
                )
            )
        driver = nvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        return gpus, f"driver {driver}"
    except Exception as exc:  # a GPU falling off the bus must not break a memory probe
        log.warning("NVML query failed: %s", exc)
        return [], f"NVML query failed: {exc}"
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception as exc:
            log.debug("nvmlShutdown failed: %s", exc)


# Limits at or above this mean "unlimited" (cgroup v1 reports PAGE_COUNTER_MAX pages).
_UNLIMITED = 1 << 60


def _cgroup_memory_dir(root: Path, proc_cgroup: Path) -> tuple[Path, int] | None:
    """The memory cgroup directory of this process and its cgroup version."""
    try:
        entries = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for entry in entries:
        hierarchy, _, rest = entry.partition(":")
        controllers, _, rel = rest.partition(":")
        if hierarchy == "0" and not controllers:
            candidates, version = [root / rel.lstrip("/"), root], 2
        elif "memory" in controllers.split(","):
            candidates, version = [root / "memory" / rel.lstrip("/"), root / "memory"], 1
        else:
            continue
        # Inside a cgroup namespace the listed path is not under the mount; the mount
        # root is then our own cgroup.
        limit_file = "memory.max" if version == 2 else "memory.limit_in_bytes"
        for directory in candidates:
            if (directory / limit_file).is_file():
                return directory, version
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def cgroup_memory_limit(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int | None:
    found = _cgroup_memory_dir(root, proc_cgroup)
    if found is None:
        return None
    directory, version = found
    limit = _read_int(directory / ("memory.max" if version == 2 else "memory.limit_in_bytes"))
    return limit if limit is not None and limit < _UNLIMITED else None


def cgroup_memory_headroom(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int | None:
    """Limit minus usage of our memory cgroup, or None when unlimited.

    Page cache counts as usage but is reclaimed before the OOM killer acts, so
    inactive file pages are counted as free, as the kernel and kubelet do.
    """
    found = _cgroup_memory_dir(root, proc_cgroup)
    if found is None:
        return None
    directory, version = found
    if version == 2:
        limit = _read_int(directory / "memory.max")
        usage = _read_int(directory / "memory.current")
        cache_key = "inactive_file"
    else:
        limit = _read_int(directory / "memory.limit_in_bytes")
        usage = _read_int(directory / "memory.usage_in_bytes")
        cache_key = "total_inactive_file"
    if limit is None or limit >= _UNLIMITED or usage is None:
        return None
    inactive = 0
    try:
        for line in (directory / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == cache_key and value.strip().isdigit():
                inactive = int(value)
    except OSError:
        pass
    return max(0, limit - max(0, usage - inactive))
