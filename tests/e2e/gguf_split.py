"""Split a GGUF file in two the way llama.cpp's gguf-split does, fast: the header and
tensor data are copied as bytes (gguf's GGUFReader takes half a minute to decode
Gemma's 262k-token vocabulary; this takes the time of a file copy).

The first part keeps every key; each part adds ``split.no``, ``split.count`` and
``split.tensors.count`` and holds its tensors' infos and data, aligned."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import gguf

from scheduler.models.gguf_file import _Cursor

U16, I32 = gguf.GGUFValueType.UINT16, gguf.GGUFValueType.INT32


def _string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, vtype: int, fmt: str, value: int) -> bytes:
    return _string(key) + struct.pack("<I", vtype) + struct.pack("<" + fmt, value)


def split_in_two(src: Path, out_dir: Path, stem: str) -> list[Path]:
    with src.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf, "<")
        cur.pos = 8
        n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
        kv_start = cur.pos
        alignment = 32
        for _ in range(n_kv):
            key = cur.string()
            value = cur.value(cur.unpack("I"))
            if key == "general.alignment" and isinstance(value, int):
                alignment = value
        kv_bytes = bytes(buf[kv_start:cur.pos])
        tensors = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.unpack("Q") for _ in range(cur.unpack("I"))]
            ttype, offset = cur.unpack("I"), cur.unpack("Q")
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
            count = 1
            for d in dims:
                count *= d
            tensors.append((name, dims, ttype, offset, count // block * size))
        data_start = -(-cur.pos // alignment) * alignment
        half = len(tensors) // 2
        paths = []
        for no, part in enumerate((tensors[:half], tensors[half:])):
            split = (_kv("split.no", U16, "H", no) + _kv("split.count", U16, "H", 2)
                     + _kv("split.tensors.count", I32, "i", n_tensors))
            kvs = (kv_bytes if no == 0 else b"") + split
            infos, offset = b"", 0
            for name, dims, ttype, _, nbytes in part:
                infos += (_string(name) + struct.pack("<I", len(dims))
                          + b"".join(struct.pack("<Q", d) for d in dims)
                          + struct.pack("<IQ", ttype, offset))
                offset += -(-nbytes // alignment) * alignment
            n_kv_part = (n_kv if no == 0 else 0) + 3
            head = b"GGUF" + struct.pack("<IQQ", 3, len(part), n_kv_part) + kvs + infos
            path = out_dir / f"{stem}-{no + 1:05d}-of-00002.gguf"
            with path.open("wb") as out:
                out.write(head + bytes(-len(head) % alignment))
                for _, _, _, src_off, nbytes in part:
                    start = data_start + src_off
                    out.write(buf[start:start + nbytes])
                    out.write(bytes(-nbytes % alignment))
            paths.append(path)
        return paths
