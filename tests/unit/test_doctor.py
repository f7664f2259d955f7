from __future__ import annotations

import sys
from pathlib import Path

import pytest

from scheduler.installing import doctor, install
from scheduler.models import resources


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    bin_dir = tmp_path / "pathbin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CORRAL_LLAMA_VARIANT", "cpu")
    monkeypatch.delenv("CORRAL_LLAMA_SERVER", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", None)
    # Keep the probe off the real /usr/local/cuda so rows do not depend on the host.
    monkeypatch.setattr(install, "find_nvcc", lambda: None)
    return bin_dir


def fake_server(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\necho 'version: 9 (doctor)' >&2\n")
    path.chmod(0o755)
    return path


def test_human_bytes() -> None:
    assert doctor.human_bytes(0) == "0 B"
    assert doctor.human_bytes(1023) == "1023 B"
    assert doctor.human_bytes(1536) == "1.5 KiB"
    assert doctor.human_bytes(3 * 2**30) == "3.0 GiB"
    assert doctor.human_bytes(5 * 2**50) == "5120.0 TiB"


def test_tree_size_ignores_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "t"
    (root / "a").mkdir(parents=True)
    (root / "a" / "f").write_bytes(b"x" * 100)
    (root / "g").write_bytes(b"y" * 20)
    (root / "link").symlink_to(tmp_path / "elsewhere_big")
    (tmp_path / "elsewhere_big").write_bytes(b"z" * 10_000)
    assert doctor.tree_size(root) == 120


def test_report_without_a_binary(tmp_path: Path) -> None:
    rows = dict(doctor.doctor_report())
    assert rows["llama-server"] == doctor.NOT_FOUND
    assert "llama-server version" not in rows
    assert rows["GPUs"].startswith("none (NVML not available")
    assert rows["nvcc"] == "not found"
    assert rows["cmake"].startswith("not found")
    assert rows["install would build"] == "cpu (CORRAL_LLAMA_VARIANT)"
    assert rows["cache"] == f"{tmp_path / 'cache'} (empty)"
    assert rows["Python"].startswith(sys.version.split()[0])
    assert int(rows["cores"]) >= 1
    assert "total" in rows["RAM"] and "available" in rows["RAM"]


def test_report_with_a_cached_binary(tmp_path: Path) -> None:
    binary = fake_server(install.cached_binary(variant="cpu"))
    rows = dict(doctor.doctor_report())
    assert rows["llama-server"] == f"{binary} (from cache)"
    assert rows["llama-server version"] == "version: 9 (doctor)"
    assert rows["llama-server variant"] == "cpu"
    size = binary.stat().st_size
    assert rows["cache"] == f"{tmp_path / 'cache'} ({doctor.human_bytes(size)})"


def test_report_with_path_binary_and_tools(isolated: Path) -> None:
    binary = fake_server(isolated / "llama-server")
    cmake = isolated / "cmake"
    cmake.write_text("#!/bin/sh\necho 'cmake version 3.99.1'\n")
    cmake.chmod(0o755)
    rows = dict(doctor.doctor_report())
    assert rows["llama-server"] == f"{binary} (from PATH)"
    assert rows["llama-server variant"] == "unknown (not built by Corral)"
    assert rows["cmake"] == f"{cmake} (cmake version 3.99.1)"


def test_bad_configured_binary_is_a_row_not_a_crash(tmp_path: Path) -> None:
    rows = dict(doctor.doctor_report(tmp_path / "missing-llama-server"))
    assert rows["llama-server"].startswith("error: configured llama-server")


def test_gpu_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = resources.GpuInfo(index=0, name="NVIDIA H100", vram_total=80 * 2**30, vram_free=2**30)
    monkeypatch.setattr(resources, "probe_gpus", lambda: ([gpu], "driver 580.1"))
    rows = dict(doctor.doctor_report())
    assert rows["GPU 0"] == "NVIDIA H100, 80.0 GiB total, 1.0 GiB free"
    assert rows["NVIDIA"] == "driver 580.1"
    assert "GPUs" not in rows


def test_backlog_row_reports_somaxconn(monkeypatch: pytest.MonkeyPatch) -> None:
    from scheduler.config.root import CorralConfig, ServerConfig
    from scheduler.process import limits

    monkeypatch.setattr(limits, "somaxconn", lambda: 128)
    name, text = doctor._backlog_row(CorralConfig(server=ServerConfig(backlog=4096)))
    assert name == "listen backlog"
    assert text.startswith("128 per port") and "somaxconn 128" in text and "WARNING" in text
    monkeypatch.setattr(limits, "somaxconn", lambda: 8192)
    _, text = doctor._backlog_row()
    assert text.startswith("4096 per port") and "WARNING" not in text
    assert any(r[0] == "listen backlog" for r in doctor.doctor_report())
