"""Models without config through the real llama-server and Gemma 3 270M: `corral
serve` with only `scan = [DIR]` over every layout, a pull from the fake Hub on the
Ollama port (and `corral pull`), an image sent to a model without projector, and a
LoRA adapter written with the gguf package."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest

from scheduler.models.gguf_file import read_gguf_info
from tests.e2e.conftest import REPO, CorralProc, wait_until
from tests.e2e.gguf_split import split_in_two
from tests.fakes.hf_hub import FakeHub, hub_in_thread

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Say hello."}]
IMAGE = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kg"
         "AAAABJRU5ErkJggg==")


def place(src: Path, dst: Path) -> Path:
    """A hard link where the filesystem allows one, else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


def every_layout(gemma: Path, root: Path) -> None:
    place(gemma, root / "models" / "Gemma-3-270M-Q4_K_M.gguf")
    (root / "models" / "split").mkdir(parents=True)
    split_in_two(gemma, root / "models" / "split", "Gemma-Split-Q4_K_M")
    (root / "models" / "broken.gguf").write_bytes(b"GGUF but not really")
    repo = root / "hub" / "models--unsloth--gemma-3-270m-it-GGUF"
    blob = place(gemma, repo / "blobs" / hashlib.sha256(b"gemma").hexdigest())
    commit = "1" * 40
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "gemma-3-270m-it-Q4_K_M.gguf").symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    place(gemma, root / "lmstudio" / "bartowski" / "google_gemma-3-270m-it-GGUF"
          / "google_gemma-3-270m-it-Q4_K_M.gguf")
    store = root / "ollama"
    digest = hashlib.sha256(gemma.read_bytes()).hexdigest()
    place(gemma, store / "blobs" / f"sha256-{digest}")
    man = store / "manifests" / "registry.ollama.ai" / "library" / "gemma3" / "270m"
    man.parent.mkdir(parents=True)
    man.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}",
         "size": gemma.stat().st_size}]}))


EXPECTED = {
    "gemma-3-270m-q4_k_m": "scan:plain",
    "gemma-split-q4_k_m": "scan:plain",
    "gemma-3-270m-it-q4_k_m": "scan:hf",
    "google_gemma-3-270m-it-q4_k_m": "scan:lmstudio",
    "gemma3:270m": "scan:ollama",
}


def test_scan_one_directory_of_every_layout(
        corral: Callable[..., CorralProc], gemma: Path, tmp_path: Path) -> None:
    root = tmp_path / "DIR"
    every_layout(gemma, root)
    c = corral("", scheduler=f'scan = ["{root}"]')

    def listed() -> set[str]:
        return {m["id"] for m in httpx.get(c.url + "/v1/models").json()["data"]}

    wait_until(lambda: set(EXPECTED) <= listed(), timeout=20)
    ids = listed()
    assert "hf.co/unsloth/gemma-3-270m-it-GGUF:Q4_K_M" in ids
    assert "bartowski/google_gemma-3-270m-it-gguf" in ids
    tags = {m["name"] for m in httpx.get(
        f"http://127.0.0.1:{c.ollama_port}/api/tags").json()["models"]}
    assert {"gemma3:270m", "gemma-3-270m-q4_k_m:latest",
            "hf.co/unsloth/gemma-3-270m-it-GGUF:Q4_K_M"} <= tags
    lms = {m["id"] for m in httpx.get(
        f"http://127.0.0.1:{c.lmstudio_port}/api/v0/models").json()["data"]}
    assert set(EXPECTED) <= lms
    admin = httpx.get(c.url + "/admin/models").json()
    assert {m["name"]: m["origin"] for m in admin["models"]} == EXPECTED
    assert any("broken.gguf: not a valid GGUF" in p for p in admin["scan_problems"])
    # A real answer from each, through each port's dialect.
    # (The split model is launched from its first part; llama-server finds the second.)
    for name in ("gemma-split-q4_k_m", "hf.co/unsloth/gemma-3-270m-it-GGUF:Q4_K_M"):
        r = httpx.post(c.url + "/v1/chat/completions", timeout=120, json={
            "model": name, "messages": HELLO, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
    r = httpx.post(f"http://127.0.0.1:{c.ollama_port}/api/chat", timeout=120, json={
        "model": "gemma3:270m", "messages": HELLO, "stream": False,
        "options": {"num_predict": 4, "temperature": 0}})
    assert r.status_code == 200, r.text
    assert r.json()["message"]["content"] and r.json()["model"] == "gemma3:270m"
    r = httpx.post(f"http://127.0.0.1:{c.lmstudio_port}/api/v0/chat/completions",
                   timeout=120, json={"model": "bartowski/google_gemma-3-270m-it-gguf",
                                      "messages": HELLO, "max_tokens": 4})
    assert r.status_code == 200, r.text
    # Gemma 270M has no projector: an image is a clear 400, nothing relayed.
    r = httpx.post(f"http://127.0.0.1:{c.ollama_port}/api/chat", timeout=30, json={
        "model": "gemma3:270m", "stream": False,
        "messages": [{"role": "user", "content": "What is this?", "images": [IMAGE]}]})
    assert r.status_code == 400
    assert "cannot serve vision" in r.json()["error"]
    # `corral check` reports the scan, the skipped file included.
    cfg = sorted(tmp_path.glob("corral-*.toml"))[0]
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "check", str(cfg)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "scan: 5 model(s) found" in out.stdout and "broken.gguf" in out.stdout
    # A vanished file stops being offered; its instance drains and stops.
    children = len(c.children())
    for f in (root / "ollama" / "manifests").rglob("270m"):
        f.unlink()
    wait_until(lambda: "gemma3:270m" not in listed(), timeout=20)
    wait_until(lambda: len(c.children()) == children - 1, timeout=30)


@pytest.fixture
def hub(gemma: Path) -> Iterator[str]:
    """The fake Hub on a loopback port of its own thread, serving Gemma."""
    data = gemma.read_bytes()
    fake = FakeHub({"google/gemma-3-270m-GGUF/gemma-3-270m-Q4_K_M.gguf": data,
                    "google/gemma-3-270m-GGUF/README.md": b"# a repo",
                    "google/gemma-auto-GGUF/gemma-auto-Q4_K_M.gguf": data})
    with hub_in_thread(fake) as url:
        yield url


def test_pull_from_the_hub_then_chat(
        corral: Callable[..., CorralProc], hub: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, gemma: Path) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub)
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path / "cache"))
    c = corral("", scheduler="auto_pull = true")
    ollama_url = f"http://127.0.0.1:{c.ollama_port}"
    lines = []
    with httpx.stream("POST", ollama_url + "/api/pull", timeout=120,
                      json={"model": "hf.co/google/gemma-3-270m-GGUF"}) as r:
        assert r.status_code == 200
        lines = [json.loads(x) for x in r.iter_lines() if x]
    digest = hashlib.sha256(gemma.read_bytes()).hexdigest()
    size = gemma.stat().st_size
    assert lines[0] == {"status": "pulling manifest"}
    assert lines[-1] == {"status": "success"}
    progress = [x for x in lines if x.get("digest") == f"sha256:{digest}"]
    assert progress[-1] == {"status": f"pulling {digest[:12]}", "digest": f"sha256:{digest}",
                            "total": size, "completed": size}
    assert {"status": "verifying sha256 digest"} in lines
    name = "hf.co/google/gemma-3-270m-GGUF:Q4_K_M"
    assert name in {m["name"] for m in httpx.get(ollama_url + "/api/tags").json()["models"]}
    r = httpx.post(ollama_url + "/api/chat", timeout=120, json={
        "model": name, "messages": HELLO, "stream": False,
        "options": {"num_predict": 4, "temperature": 0}})
    assert r.status_code == 200, r.text
    assert r.json()["message"]["content"]
    # The CLI asks the running Corral and draws a bar; by file name this time, and
    # the file is already here: nothing is fetched again.
    by_file = "hf.co/google/gemma-3-270m-GGUF:gemma-3-270m-Q4_K_M.gguf"
    out = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "pull", by_file, "--url", ollama_url], cwd=REPO,
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"pulling {digest[:12]} 100% |" in out.stderr
    assert out.stderr.rstrip().endswith("success")
    assert by_file in {m["id"] for m in httpx.get(c.url + "/v1/models").json()["data"]}
    # auto_pull: a chat naming a model nobody pulled yet downloads it, then answers.
    r = httpx.post(c.url + "/v1/chat/completions", timeout=180, json={
        "model": "hf.co/google/gemma-auto-GGUF", "messages": HELLO, "max_tokens": 4,
        "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]


def write_lora(gemma: Path, path: Path, rank: int = 4) -> Path:
    """A tiny LoRA adapter for Gemma 3 270M's first attention query projection,
    shaped from the model's header: [embedding, heads × key length] (ggml ne order)."""
    info = read_gguf_info(gemma, brief=True)
    assert info.embedding_length and info.head_count and info.key_length
    n_in, n_out = info.embedding_length, info.head_count * info.key_length
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
    rng = np.random.default_rng(0)
    # numpy shapes are ne reversed: lora_a ne [in, r], lora_b ne [r, out].
    w.add_tensor("blk.0.attn_q.weight.lora_a",
                 (rng.standard_normal((rank, n_in)) * 1e-3).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b",
                 (rng.standard_normal((n_out, rank)) * 1e-3).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_lora_adapter_reaches_the_real_llama_server(
        corral: Callable[..., CorralProc], gemma: Path, tmp_path: Path) -> None:
    lora = write_lora(gemma, tmp_path / "lora.gguf")
    c = corral(
        f'[[models]]\nname = "gemma-lora"\npath = "{gemma}"\nctx_size = 1024\nthreads = 1\n'
        f'lora = [{{ path = "{lora}", scale = 0.5 }}]\n')
    r = httpx.post(c.url + "/v1/chat/completions", timeout=120, json={
        "model": "gemma-lora", "messages": HELLO, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    inst = httpx.get(c.url + "/admin/instances").json()
    base = (inst["instances"] if isinstance(inst, dict) else inst)[0]["base_url"]
    # llama-server's own list of the adapters it loaded, and at which scale.
    adapters = httpx.get(base + "/lora-adapters").json()
    assert [(a["path"], a["scale"]) for a in adapters] == [(str(lora), 0.5)]
    status = httpx.get(c.url + "/admin/models").json()["models"][0]
    assert status["footprint_bytes"] > gemma.stat().st_size + lora.stat().st_size
