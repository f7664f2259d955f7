"""Scanned folders made of symbolic links, as people gather models from several
disks: followed wherever they lead, in every layout, named by the link's path; cycles,
broken links and huge trees reported once, naming the path, and bounded."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from scheduler.config.root import ModelConfig, ScanDir, load_config
from scheduler.discovery import tree
from scheduler.discovery.scanner import HeaderCache, scan, signature
from tests.unit.test_discovery import write_gguf


def result(root: Path) -> tuple[dict[str, ModelConfig], list[str]]:
    res = scan([ScanDir(path=root)], HeaderCache())
    return {m.name: m for m in res.models}, list(res.problems)


def naming(problems: list[str], path: Path) -> list[str]:
    return [p for p in problems if p.startswith(f"{path}: ")]


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """Another disk: files named nothing like the links to them."""
    write_gguf(tmp_path / "disk2" / "blob-1234.gguf", "Qwen")
    write_gguf(tmp_path / "disk2" / "sub" / "Gemma-3-270M-Q4_K_M.gguf", "Gemma")
    return tmp_path / "disk2"


def test_plain_folder_of_links_to_files_and_folders_elsewhere(tmp_path: Path,
                                                             disk: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    (root / "Qwen2.5-7B-Q4_K_M.gguf").symlink_to(disk / "blob-1234.gguf")
    # A link to a link to the file: followed to the end.
    (root / "hop.gguf").symlink_to(root / "Qwen2.5-7B-Q4_K_M.gguf")
    (root / "linked-folder").symlink_to(disk / "sub", target_is_directory=True)
    models, problems = result(root)
    assert problems == []
    assert sorted(models) == ["gemma-3-270m-q4_k_m", "hop", "qwen2.5-7b-q4_k_m"]
    qwen = models["qwen2.5-7b-q4_k_m"]
    # Named, and launched, by the link's path: llama-server opens it through the link.
    assert qwen.path == root / "Qwen2.5-7B-Q4_K_M.gguf"
    gemma = models["gemma-3-270m-q4_k_m"]
    assert gemma.path == root / "linked-folder" / "Gemma-3-270M-Q4_K_M.gguf"
    assert gemma.origin == "scan:plain"


def test_a_cycle_of_folder_links_is_reported_once_and_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_gguf(root / "sub" / "m.gguf")
    (root / "back-to-root").symlink_to(root, target_is_directory=True)
    (root / "sub" / "up").symlink_to("..", target_is_directory=True)
    (root / "sub" / "self").symlink_to(".", target_is_directory=True)
    models, problems = result(root)
    assert list(models) == ["m"]
    assert len(problems) == 3, problems
    for link, ancestor in ((root / "back-to-root", root), (root / "sub" / "up", root),
                           (root / "sub" / "self", root / "sub")):
        (line,) = naming(problems, link)
        assert f"leads back to {ancestor}, a folder it lies in" in line


def test_a_broken_link_is_one_problem_naming_it(tmp_path: Path, disk: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    (root / "gone.gguf").symlink_to(tmp_path / "unmounted" / "x.gguf")
    (root / "disk3").symlink_to(tmp_path / "unmounted", target_is_directory=True)
    (root / "a.gguf").symlink_to(root / "b.gguf")  # a loop of file links
    (root / "b.gguf").symlink_to(root / "a.gguf")
    (root / "ok.gguf").symlink_to(disk / "blob-1234.gguf")
    models, problems = result(root)
    assert list(models) == ["ok"]
    assert naming(problems, root / "gone.gguf") == [
        f"{root / 'gone.gguf'}: a broken link (to {tmp_path / 'unmounted' / 'x.gguf'}: "
        "No such file or directory); skipped"]
    assert len(naming(problems, root / "disk3")) == 1
    assert naming(problems, root / "a.gguf") == [f"{root / 'a.gguf'}: a loop of links; skipped"]
    assert len(problems) == 4, problems


def test_hugging_face_cache_on_another_disk(tmp_path: Path, disk: Path) -> None:
    """The cache's own links (snapshot to blob), a blob that is itself a link, and the
    repo folder linked in from elsewhere."""
    repo = tmp_path / "elsewhere" / "models--bartowski--Qwen2-0.5B-GGUF"
    blob = repo / "blobs" / ("b" * 64)
    blob.parent.mkdir(parents=True)
    blob.symlink_to(disk / "blob-1234.gguf")
    commit = "a" * 40
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "Qwen2-0.5B-Q4_K_M.gguf").symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / repo.name).symlink_to(repo, target_is_directory=True)
    models, problems = result(hub)
    assert problems == []
    m = models["qwen2-0.5b-q4_k_m"]
    assert "hf.co/bartowski/Qwen2-0.5B-GGUF:Q4_K_M" in m.aliases
    assert m.origin == "scan:hf"
    assert m.path == hub / repo.name / "snapshots" / commit / "Qwen2-0.5B-Q4_K_M.gguf"


def test_lm_studio_tree_of_links(tmp_path: Path, disk: Path) -> None:
    """LM Studio's folder is a link to another disk, a repo folder inside it a link to
    a third place, a file a link: the tree is known by the links' names."""
    real = tmp_path / "big-disk" / "lms"
    (real / "lmstudio-community").mkdir(parents=True)
    (real / "lmstudio-community" / "gemma-3-270m-it-GGUF").symlink_to(
        disk / "sub", target_is_directory=True)
    (real / "bartowski" / "qwen-GGUF").mkdir(parents=True)
    (real / "bartowski" / "qwen-GGUF" / "qwen-Q4_K_M.gguf").symlink_to(
        disk / "blob-1234.gguf")
    (tmp_path / ".lmstudio").mkdir()
    (tmp_path / ".lmstudio" / "models").symlink_to(real, target_is_directory=True)
    models, problems = result(tmp_path / ".lmstudio" / "models")
    assert problems == []
    gemma = models["gemma-3-270m-q4_k_m"]
    assert gemma.origin == "scan:lmstudio"
    assert "lmstudio-community/gemma-3-270m-it-gguf" in gemma.aliases
    assert "bartowski/qwen-gguf" in models["qwen-q4_k_m"].aliases


def test_ollama_store_whose_blobs_and_manifests_are_links(tmp_path: Path, disk: Path) -> None:
    store = tmp_path / "dir" / "ollama"
    (store / "blobs").mkdir(parents=True)
    model = disk / "blob-1234.gguf"
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    (store / "blobs" / f"sha256-{digest}").symlink_to(model)
    gone = "f" * 64
    (store / "blobs" / f"sha256-{gone}").symlink_to(tmp_path / "unmounted" / "blob")
    manifests = tmp_path / "other" / "manifests"
    for tag, dig in (("270m", digest), ("gone", gone)):
        man = manifests / "registry.ollama.ai" / "library" / "gemma3" / tag
        man.parent.mkdir(parents=True, exist_ok=True)
        man.write_text(json.dumps({"layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{dig}"}]}))
    (store / "manifests").symlink_to(manifests, target_is_directory=True)
    for root in (store, store.parent):  # the store scanned, or found below the scanned one
        models, problems = result(root)
        assert list(models) == ["gemma3:270m"]
        m = models["gemma3:270m"]
        assert m.origin == "scan:ollama"
        assert m.path == store / "blobs" / f"sha256-{digest}"
        # The broken blob: one problem, naming the manifest, the blob and its target.
        blob = store / "blobs" / f"sha256-{gone}"
        (line,) = [p for p in problems if str(blob) in p]
        assert "model 'gemma3:gone': its model blob" in line
        assert f"is a broken link (to {tmp_path / 'unmounted' / 'blob'}" in line
        assert len(problems) == 1, problems


def test_the_walk_is_bounded_in_depth_and_entries(tmp_path: Path, disk: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "models"
    deep = root / "a" / "b" / "c" / "d"
    write_gguf(deep / "too-deep.gguf")
    write_gguf(root / "a" / "shallow.gguf")
    monkeypatch.setattr(tree, "MAX_DEPTH", 3)
    models, problems = result(root)
    assert list(models) == ["shallow"]
    assert problems == [f"{root / 'a' / 'b' / 'c'}: more than 3 folders deep; not scanned"]

    monkeypatch.setattr(tree, "MAX_DEPTH", 32)
    monkeypatch.setattr(tree, "MAX_ENTRIES", 3)
    for i in range(4):
        (root / f"link{i}").symlink_to(disk, target_is_directory=True)
    _, problems = result(root)
    assert len([p for p in problems if "the scan stopped after 3 entries" in p]) == 1, problems


def test_the_watch_signature_sees_through_links(tmp_path: Path, disk: Path) -> None:
    """A file added in a linked folder, a linked file rewritten on its disk, a link
    swapped: each changes what the watcher compares."""
    root = tmp_path / "models"
    root.mkdir()
    (root / "folder").symlink_to(disk / "sub", target_is_directory=True)
    (root / "m.gguf").symlink_to(disk / "blob-1234.gguf")
    dirs = (ScanDir(path=root),)
    before = signature(dirs)
    write_gguf(disk / "sub" / "new.gguf")
    assert signature(dirs) != before
    before = signature(dirs)
    write_gguf(disk / "blob-1234.gguf", "A longer name than before")
    assert signature(dirs) != before
    before = signature(dirs)
    (root / "m.gguf").unlink()
    (root / "m.gguf").symlink_to(disk / "sub" / "new.gguf")
    assert signature(dirs) != before
    assert signature(dirs) == signature(dirs)


def test_a_scanned_directory_given_as_a_link_keeps_the_links_path(tmp_path: Path,
                                                                  disk: Path) -> None:
    (tmp_path / "models").symlink_to(disk, target_is_directory=True)
    cfg = tmp_path / "corral.toml"
    cfg.write_text('[scheduler]\nscan = ["models"]\n')
    (d,) = load_config(cfg).scan_dirs()
    assert d.path == tmp_path / "models"
    res = scan([d], HeaderCache())
    assert {m.path for m in res.models} == {
        tmp_path / "models" / "blob-1234.gguf",
        tmp_path / "models" / "sub" / "Gemma-3-270M-Q4_K_M.gguf"}
