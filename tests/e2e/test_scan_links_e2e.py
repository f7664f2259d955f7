"""A scanned folder of symbolic links, as people gather models from several disks,
through the real llama-server and Gemma 3 270M: a GGUF that is a link to the default
model's file answers a chat under the link's name, as does an Ollama store whose blob
is a link; a broken link is one warning naming it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import CorralProc, wait_until

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Say hello."}]


def test_a_folder_of_links_serves_chat(
        corral: Callable[..., CorralProc], gemma: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "disk1").mkdir(parents=True)
    # The model file lives elsewhere (the package's cache); the scan sees only links.
    (root / "disk1" / "My-Gemma-Q4_K_M.gguf").symlink_to(gemma)
    (root / "disk2").symlink_to(tmp_path / "unmounted", target_is_directory=True)
    store = root / "ollama"
    digest = hashlib.sha256(gemma.read_bytes()).hexdigest()
    (store / "blobs").mkdir(parents=True)
    (store / "blobs" / f"sha256-{digest}").symlink_to(gemma)
    man = store / "manifests" / "registry.ollama.ai" / "library" / "gemma3" / "linked"
    man.parent.mkdir(parents=True)
    man.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}",
         "size": gemma.stat().st_size}]}))
    c = corral(f'[[scan]]\npath = "{root}"\nctx_size = 1024\nthreads = 1\n',
               scheduler="scan_interval = 0.5")

    def listed() -> set[str]:
        return {m["id"] for m in httpx.get(c.url + "/v1/models").json()["data"]}

    wait_until(lambda: {"my-gemma-q4_k_m", "gemma3:linked"} <= listed(), timeout=20)
    r = httpx.post(c.url + "/v1/chat/completions", timeout=120, json={
        "model": "my-gemma-q4_k_m", "messages": HELLO, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    assert r.json()["model"] == "my-gemma-q4_k_m"
    r = httpx.post(f"http://127.0.0.1:{c.ollama_port}/api/chat", timeout=120, json={
        "model": "gemma3:linked", "messages": HELLO, "stream": False,
        "options": {"num_predict": 4, "temperature": 0}})
    assert r.status_code == 200, r.text
    assert r.json()["message"]["content"]
    admin = httpx.get(c.url + "/admin/models").json()
    origins = {m["name"]: m["origin"] for m in admin["models"]}
    assert origins == {"my-gemma-q4_k_m": "scan:plain", "gemma3:linked": "scan:ollama"}
    broken = str(root / "disk2")
    assert [p for p in admin["scan_problems"] if broken in p] == [
        f"{broken}: a broken link (to {tmp_path / 'unmounted'}: No such file or directory); "
        "skipped"]
    # A link added makes the scan run again: it sees the broken link again, and the
    # log still holds one warning for it.
    (root / "disk1" / "Again.gguf").symlink_to(gemma)
    wait_until(lambda: "again" in listed(), timeout=20)
    assert c.log().count(f"{broken}: a broken link") == 1
