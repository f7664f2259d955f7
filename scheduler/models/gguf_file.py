"""GGUF model files: their metadata, read by a walk of the header, and the footprint
(weights, KV cache, compute) a model needs at a context size.

Every function here blocks (file reads); async callers use ``asyncio.to_thread``.
GGUF metadata is parsed here rather than with ``gguf.GGUFReader``: the reader decodes
every tokenizer string (262,144 of them for Gemma 3), which took 15 s on a 253 MB model,
while the header walk below skips them in well under a second. The ``gguf`` package
still supplies the value-type and file-type enums.
"""

from __future__ import annotations

import collections
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from scheduler.errors import CorralError

MiB = 1024 * 1024


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
