"""Models found by scanning directories, served through the fake llama-server:
listed on all three ports, configured models winning, files that vanish drained,
skipped files reported, new directories picked up on reload."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import CoreOptions, build_openai_app
from proxy.keys import SCHEDULER
from proxy.ops.reload import RELOADER
from tests.conftest import make_config, wait_for
from tests.unit.test_discovery import ollama_store, write_gguf


def tree(root: Path) -> None:
    """One tree with every layout the scanner knows."""
    write_gguf(root / "plain" / "Qwen2.5-0.5B-Instruct-Q4_K_M.gguf", "Qwen2.5 0.5B Instruct")
    for part in (1, 2):
        write_gguf(root / "plain" / "split" / f"Big-Q8_0-{part:05d}-of-00002.gguf", "Big")
    write_gguf(root / "plain" / "vision" / "SmolVLM-Q4_K_M.gguf", "SmolVLM")
    write_gguf(root / "plain" / "vision" / "mmproj-SmolVLM-f16.gguf", "proj", "clip")
    (root / "plain" / "notes.gguf").write_text("not a model")
    hf = root / "hf" / "models--bartowski--Phi-GGUF"
    blob = write_gguf(hf / "blobs" / ("c" * 64), "Phi")
    snap = hf / "snapshots" / ("d" * 40)
    snap.mkdir(parents=True)
    (snap / "Phi-Q5_K_M.gguf").symlink_to(os.path.relpath(blob, snap))
    write_gguf(root / "lmstudio" / "lmstudio-community" / "Llama-GGUF" / "Llama-Q4_K_M.gguf",
               "Llama")
    ollama_store(root / "ollama", ("registry.ollama.ai", "library", "gemma3", "270m"),
                 write_gguf(root / "src" / "g.gguf", "Gemma"))


NAMES = {"qwen2.5-0.5b-instruct-q4_k_m", "big-q8_0", "smolvlm-q4_k_m", "phi-q5_k_m",
         "llama-q4_k_m", "gemma3:270m"}


@pytest.fixture
async def ports(corral_ports: Any, tmp_path: Path) -> Any:
    root = tmp_path / "models"
    tree(root)
    cfg = make_config(tmp_path, [{"name": "phi-q5_k_m", "ctx_size": 777}], scheduler={
        "scan": [str(root / d) for d in ("plain", "hf", "lmstudio", "ollama")],
        "scan_interval": 0.1})
    p = await corral_ports(cfg)
    sched = p.openai.app[SCHEDULER]
    await wait_for(lambda: set(sched.names()) >= NAMES)
    return p


async def test_every_layout_is_listed_on_every_port(ports: Any) -> None:
    ids = {m["id"] for m in (await (await ports.openai.get("/v1/models")).json())["data"]}
    assert NAMES | {"lmstudio-community/llama-gguf"} <= ids
    tags = {m["name"] for m in (await (await ports.ollama.get("/api/tags")).json())["models"]}
    assert {"gemma3:270m", "big-q8_0:latest", "llama-q4_k_m:latest"} <= tags
    lms = {m["id"] for m in (await (await ports.lmstudio.get("/api/v0/models")).json())["data"]}
    assert lms >= NAMES
    assert "mmproj-smolvlm-f16" not in ids and "notes" not in ids


async def test_origin_projector_problems_and_configured_models_win(ports: Any) -> None:
    r = await ports.openai.get("/admin/models")
    body = await r.json()
    by_name = {m["name"]: m for m in body["models"]}
    assert by_name["gemma3:270m"]["origin"] == "scan:ollama"
    assert by_name["smolvlm-q4_k_m"]["origin"] == "scan:plain"
    assert by_name["llama-q4_k_m"]["origin"] == "scan:lmstudio"
    # The configured model of the same name wins over the scanned file...
    assert by_name["phi-q5_k_m"]["origin"] == "config"
    assert by_name["phi-q5_k_m"]["ctx_size"] == 777
    # ...and the scanned one is not offered under another name either.
    assert "hf.co/bartowski/Phi-GGUF:Q5_K_M" not in ports.openai.app[SCHEDULER].names()
    assert any("notes.gguf: not a valid GGUF" in p for p in body["scan_problems"])
    sched = ports.openai.app[SCHEDULER]
    assert sched.resolve("smolvlm-q4_k_m").mmproj is not None
    models = {m["id"]: m for m in (await (await ports.openai.get("/v1/models")).json())["data"]}
    assert "vision" in models["smolvlm-q4_k_m"]["capabilities"]
    assert "vision" not in models["big-q8_0"]["capabilities"]
    r = await ports.ollama.delete("/api/delete", json={"model": "big-q8_0"})
    assert r.status == 501 and "scanned directory" in (await r.json())["error"]


async def test_chat_through_a_scanned_model_then_its_file_vanishes(
        ports: Any, tmp_path: Path) -> None:
    r = await ports.ollama.post("/api/chat", json={
        "model": "gemma3:270m", "stream": False,
        "messages": [{"role": "user", "content": "hello"}]})
    assert r.status == 200, await r.text()
    assert (await r.json())["model"] == "gemma3:270m"
    sched = ports.openai.app[SCHEDULER]
    assert len(sched.instances()) == 1
    manifest = tmp_path / "models" / "ollama" / "manifests" / "registry.ollama.ai"
    (manifest / "library" / "gemma3" / "270m").unlink()
    await wait_for(lambda: "gemma3:270m" not in sched.names())
    await wait_for(lambda: sched.instances() == [])
    r = await ports.ollama.post("/api/chat", json={"model": "gemma3:270m", "messages": [
        {"role": "user", "content": "hello"}]})
    assert r.status == 404
    # A new file is picked up without a reload.
    write_gguf(tmp_path / "models" / "plain" / "new-Q2_K.gguf")
    await wait_for(lambda: "new-q2_k" in sched.names())


async def test_reload_with_a_new_scan_directory(tmp_path: Path) -> None:
    write_gguf(tmp_path / "a" / "first.gguf")
    write_gguf(tmp_path / "b" / "second.gguf")
    cfg_file = tmp_path / "corral.toml"
    cfg_file.write_text(f'[scheduler]\nscan = ["{tmp_path / "a"}"]\n')
    app = build_openai_app(make_config(tmp_path, [], scheduler={"scan": [str(tmp_path / "a")]}),
                           CoreOptions(), config_path=cfg_file)
    async with TestClient(TestServer(app)) as c:
        sched = c.app[SCHEDULER]
        await wait_for(lambda: "first" in sched.names())
        cfg_file.write_text(
            f'[[scan]]\npath = "{tmp_path / "b"}"\nctx_size = 256\nparallel = 2\n')
        await c.app[RELOADER].reload("test")
        await wait_for(lambda: "second" in sched.names() and "first" not in sched.names())
        second = sched.resolve("second")
        assert (second.ctx_size, second.parallel) == (256, 2)


async def test_a_folder_of_links_is_served_and_watched_through_them(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Links to another disk: served, a file added there picked up, a link that breaks
    is one warning (however many scans see it) and its model drains away."""
    disk = tmp_path / "disk2"
    write_gguf(disk / "blob.gguf", "Qwen")
    root = tmp_path / "models"
    root.mkdir()
    (root / "Qwen-Q4_K_M.gguf").symlink_to(disk / "blob.gguf")
    (root / "more").symlink_to(disk / "more", target_is_directory=True)
    (disk / "more").mkdir()
    app = build_openai_app(make_config(tmp_path, [], scheduler={
        "scan": [str(root)], "scan_interval": 0.05}), CoreOptions())
    async with TestClient(TestServer(app)) as c:
        sched = c.app[SCHEDULER]
        await wait_for(lambda: "qwen-q4_k_m" in sched.names())
        write_gguf(disk / "more" / "Added-Q8_0.gguf")
        await wait_for(lambda: "added-q8_0" in sched.names())
        (disk / "blob.gguf").unlink()
        await wait_for(lambda: "qwen-q4_k_m" not in sched.names())
        for i in range(3):  # later scans see the same broken link: no new warning
            write_gguf(disk / "more" / f"x{i}.gguf")
            await wait_for(lambda n=i: f"x{n}" in sched.names())
    warned = [r.getMessage() for r in caplog.records
              if r.levelname == "WARNING" and "Qwen-Q4_K_M.gguf" in r.getMessage()]
    assert warned == [f"model scan: {root / 'Qwen-Q4_K_M.gguf'}: a broken link (to "
                      f"{disk / 'blob.gguf'}: No such file or directory); skipped"]


def test_ollama_manifest_digest_helper(tmp_path: Path) -> None:
    g = write_gguf(tmp_path / "g.gguf")
    ollama_store(tmp_path / "store", ("registry.ollama.ai", "library", "x", "1b"), g)
    man = json.loads((tmp_path / "store" / "manifests" / "registry.ollama.ai" / "library" / "x"
                      / "1b").read_text())
    digest = hashlib.sha256(g.read_bytes()).hexdigest()
    assert man["layers"][0]["digest"] == f"sha256:{digest}"
