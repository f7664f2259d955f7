"""Machine probes (CPU, RAM, NVIDIA GPUs) and GGUF model footprints.

Every function here blocks (psutil scans, NVML calls, file reads); async callers use
``asyncio.to_thread``. Probes never raise for a missing GPU stack: no ``pynvml``, no
driver or no GPU all read as "no GPUs".

GGUF metadata is parsed here rather than with ``gguf.GGUFReader``: the reader decodes
every tokenizer string (262,144 of them for Gemma 3), which took 15 s on a 253 MB model,
while the header walk below skips them in well under a second. The ``gguf`` package
still supplies the value-type and file-type enums.
"""

from __future__ import annotations

import collections
import importlib
import logging
import mmap
import os
import platform
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import psutil

from scheduler.errors import CorralError

log = logging.getLogger(__name__)

MiB = 1024 * 1024

# --- system ----------------------------------------------------------------------------


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


# --- GGUF ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GgufInfo:
    path: Path
    file_size: int
    architecture: str
    name: str | None
    size_label: str | None  # e.g. "270M", as the converter wrote it
    parameter_count: int  # summed over tensor shapes
    quantization: str | None  # e.g. "Q4_K_M"
    context_length: int | None  # the training context
    embedding_length: int | None
    block_count: int | None
    head_count: int | None
    head_count_kv: int | None  # the largest over layers when given per layer
    key_length: int | None
    value_length: int | None
    sliding_window: int | None
    has_chat_template: bool
    pooling_type: int | None = None  # set by embedding and reranking conversions


_SCALARS: dict[int, str] = {
    gguf.GGUFValueType.UINT8: "B",
    gguf.GGUFValueType.INT8: "b",
    gguf.GGUFValueType.UINT16: "H",
    gguf.GGUFValueType.INT16: "h",
    gguf.GGUFValueType.UINT32: "I",
    gguf.GGUFValueType.INT32: "i",
    gguf.GGUFValueType.FLOAT32: "f",
    gguf.GGUFValueType.BOOL: "?",
    gguf.GGUFValueType.UINT64: "Q",
    gguf.GGUFValueType.INT64: "q",
    gguf.GGUFValueType.FLOAT64: "d",
}
# Per-layer arrays (head counts) are at most a few hundred long; tokenizer arrays are
# hundreds of thousands and are skipped, not decoded.
_MAX_DECODED_ARRAY = 4096


@dataclass(frozen=True, slots=True)
class SkippedArray:
    """Stands in metadata for an array too long to decode (e.g. the tokenizer's vocabulary)."""

    count: int


class _Cursor:
    def __init__(self, buf: mmap.mmap, order: str) -> None:
        self.buf = buf
        self.order = order
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("Q")
        raw = self.buf[self.pos : self.pos + length]
        if len(raw) != length:
            raise struct.error("string runs past the end of the file")
        self.pos += length
        return raw.decode("utf-8", "replace")

    def skip_string(self) -> None:
        length = self.unpack("Q")
        self.pos += length

    def skip_strings(self, count: int) -> None:
        # A vocabulary is ~10^5 strings: a bound unpacker and locals make this loop
        # several times faster than unpack() per item (scanning thousands of models).
        unpack, buf, pos = struct.Struct(self.order + "Q").unpack_from, self.buf, self.pos
        for _ in range(count):
            pos += 8 + unpack(buf, pos)[0]
        self.pos = pos

    def value(self, vtype: int) -> object:
        if vtype == gguf.GGUFValueType.STRING:
            return self.string()
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == gguf.GGUFValueType.ARRAY:
            item_type = self.unpack("I")
            count = self.unpack("Q")
            if count <= _MAX_DECODED_ARRAY:
                return [self.value(item_type) for _ in range(count)]
            if item_type in _SCALARS:
                self.pos += count * struct.calcsize(_SCALARS[item_type])
            elif item_type == gguf.GGUFValueType.STRING:
                self.skip_strings(count)
            else:  # arrays of arrays: walk them
                for _ in range(count):
                    self.value(item_type)
            return SkippedArray(count)
        raise struct.error(f"unknown GGUF value type {vtype}")


def _read_gguf_header(
    path: Path, brief: bool = False
) -> tuple[dict[str, object], dict[int, int], int]:
    """Metadata, element count per tensor type, total parameters. Touches no tensor data.

    ``brief``: stop at the first long string array (the tokenizer's vocabulary, which
    converters write after the general and architecture keys) and read no tensor
    infos: ~0.1 ms instead of ~60 ms for a 262k-token vocabulary."""
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise CorralError(f"{path} is not a GGUF file (bad magic {bytes(buf[:4])!r})")
        # The version is tiny; read in the wrong byte order it has its low bytes zero.
        (version,) = struct.unpack_from("<I", buf, 4)
        order = "<" if version & 0xFFFF else ">"
        cur = _Cursor(buf, order)
        cur.pos = 4
        version = cur.unpack("I")
        if version < 2:
            raise CorralError(f"{path}: GGUF version {version} is too old (need 2 or newer)")
        tensor_count = cur.unpack("Q")
        kv_count = cur.unpack("Q")
        meta: dict[str, object] = {}
        for _ in range(kv_count):
            key = cur.string()
            vtype = cur.unpack("I")
            if brief and vtype == gguf.GGUFValueType.ARRAY:
                item_type, count = struct.unpack_from(order + "IQ", buf, cur.pos)
                if item_type == gguf.GGUFValueType.STRING and count > _MAX_DECODED_ARRAY:
                    return meta, {}, 0
            meta[key] = cur.value(vtype)
        if brief:
            return meta, {}, 0
        per_type: collections.Counter[int] = collections.Counter()
        for _ in range(tensor_count):
            cur.skip_string()  # tensor name
            n_dims = cur.unpack("I")
            elements = 1
            for _ in range(n_dims):
                elements *= cur.unpack("Q")
            per_type[cur.unpack("I")] += elements
            cur.unpack("Q")  # data offset
        return meta, dict(per_type), sum(per_type.values())


def _read_checked(
    path: Path, brief: bool = False
) -> tuple[dict[str, object], dict[int, int], int]:
    try:
        return _read_gguf_header(path, brief)
    except (OSError, ValueError) as exc:  # mmap of an empty file raises ValueError
        raise CorralError(f"cannot read GGUF file {path}: {exc}") from exc
    except struct.error as exc:
        raise CorralError(f"{path} is truncated or corrupt: {exc}") from exc


def read_gguf_metadata(path: Path) -> dict[str, object]:
    """Every key/value of the GGUF header, in file order.

    Values are str, int, float, bool or lists of them; arrays longer than 4096 items
    are :class:`SkippedArray` (only their length is known).
    """
    meta, _, _ = _read_checked(path)
    return meta


def read_gguf_info(path: Path, *, brief: bool = False) -> GgufInfo:
    """Read a model's metadata from its GGUF header.

    ``brief`` (scanning, sizing): the keys before the vocabulary only; then
    ``parameter_count`` is 0 and ``has_chat_template`` False, and a file without
    ``general.file_type`` has no ``quantization``."""
    meta, per_type, params = _read_checked(path, brief)
    try:
        file_size = path.stat().st_size
    except OSError as exc:
        raise CorralError(f"cannot read GGUF file {path}: {exc}") from exc

    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise CorralError(f"{path} has no general.architecture")

    def text(key: str) -> str | None:
        value = meta.get(key)
        return value if isinstance(value, str) else None

    def number(key: str) -> int | None:
        value = meta.get(f"{arch}.{key}")
        if isinstance(value, list):  # per-layer values, e.g. head_count_kv of hybrid models
            ints = [v for v in value if isinstance(v, int)]
            return max(ints) if ints else None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    head_count = number("attention.head_count")
    head_count_kv = number("attention.head_count_kv")
    return GgufInfo(
        path=path,
        file_size=file_size,
        architecture=arch,
        name=text("general.name"),
        size_label=text("general.size_label"),
        parameter_count=params,
        quantization=_quantization(meta.get("general.file_type"), per_type),
        context_length=number("context_length"),
        embedding_length=number("embedding_length"),
        block_count=number("block_count"),
        head_count=head_count,
        # Absent means no grouped-query attention: one KV head per query head.
        head_count_kv=head_count_kv if head_count_kv is not None else head_count,
        key_length=number("attention.key_length"),
        value_length=number("attention.value_length"),
        sliding_window=number("attention.sliding_window"),
        has_chat_template="tokenizer.chat_template" in meta,
        pooling_type=number("pooling_type"),
    )


_FTYPE_GUESSED = 1024  # llama.cpp's LLAMA_FTYPE_GUESSED flag


def _quantization(file_type: object, per_type: dict[int, int]) -> str | None:
    if isinstance(file_type, int) and not isinstance(file_type, bool):
        try:
            name = gguf.LlamaFileType(file_type & ~_FTYPE_GUESSED).name
        except ValueError:
            return f"file type {file_type}"
        return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    # Old converters left file_type out: name the tensor type holding most weights.
    if not per_type:
        return None
    dominant = max(per_type, key=lambda t: per_type[t])
    try:
        return gguf.GGMLQuantizationType(dominant).name
    except ValueError:
        return None


# Compute buffers (activations, logits, scratch) are not in the file or the KV cache.
# llama-server's for small models are tens of MiB; 64 MiB plus 5 % of weights + KV
# covers the models measured here with room to spare, without inflating large ones.
COMPUTE_ALLOWANCE_FIXED = 64 * MiB
COMPUTE_ALLOWANCE_FRACTION = 0.05


def kv_bytes_per_token(info: GgufInfo, kv_bytes_per_elem: int = 2) -> int:
    """K and V of one token over all layers (f16 by default); 0 without attention
    metadata (e.g. recurrent models): nothing we can size.

    Sliding-window layers are counted at full context: an overestimate for models like
    Gemma 3, and a safe one (the slot cache launches them with --swa-full anyway).
    """
    if not (info.block_count and info.head_count_kv):
        return 0
    fallback_dim = (
        info.embedding_length // info.head_count if info.embedding_length and info.head_count else 0
    )
    key_dim = info.key_length or fallback_dim
    value_dim = info.value_length or key_dim
    return info.block_count * info.head_count_kv * (key_dim + value_dim) * kv_bytes_per_elem


def kv_cache_bytes(info: GgufInfo, ctx_total: int, kv_bytes_per_elem: int = 2) -> int:
    """K and V for ``ctx_total`` tokens over all layers. ``ctx_total`` is llama-server's
    ``--ctx-size``, which its ``--parallel`` slots share."""
    return kv_bytes_per_token(info, kv_bytes_per_elem) * ctx_total


@dataclass(frozen=True, slots=True)
class ModelSize:
    """What a model's memory need depends on, read once from its GGUF header: the need
    itself is a function of the context an instance is launched with (``bytes``)."""

    file_size: int
    kv_per_token: int  # bytes of KV cache per token of total context (all slots)
    training_ctx: int | None
    layers: int
    extra: int = 0  # projector and adapters, mapped whole beside the weights

    @classmethod
    def of(cls, info: GgufInfo) -> ModelSize:
        return cls(info.file_size, kv_bytes_per_token(info), info.context_length,
                   info.block_count or 0)

    def bytes(self, ctx_total: int) -> int:
        """Bytes a llama-server holding the model with ``ctx_total`` context needs: file
        + KV cache + compute allowance (``COMPUTE_ALLOWANCE_FIXED`` +
        ``COMPUTE_ALLOWANCE_FRACTION`` of the two) + extras."""
        base = self.file_size + self.kv_per_token * ctx_total
        return base + COMPUTE_ALLOWANCE_FIXED + int(base * COMPUTE_ALLOWANCE_FRACTION) + self.extra


def estimate_footprint(info: GgufInfo, ctx_total: int, kv_bytes_per_elem: int = 2) -> int:
    """Bytes a llama-server holding this model with ``ctx_total`` context will need
    (``ModelSize.bytes``)."""
    size = ModelSize(info.file_size, kv_bytes_per_token(info, kv_bytes_per_elem),
                     info.context_length, info.block_count or 0)
    return size.bytes(ctx_total)
