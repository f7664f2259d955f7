"""The scanner over temporary trees of each layout: names, aliases, split files,
projectors, invalid files (links: test_discovery_links.py)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from scheduler.config.root import ScanDir
from scheduler.discovery.found import model_name, quant_of
from scheduler.discovery.ollama_store import ollama_name
from scheduler.discovery.scanner import HeaderCache, scan


def write_gguf(path: Path, name: str = "Tiny", arch: str = "llama") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(1)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_tensor("w", np.zeros((2, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def found(root: Path, **defaults: object) -> dict[str, object]:
    res = scan([ScanDir(path=root, **defaults)], HeaderCache())  # type: ignore[arg-type]
    return {"models": {m.name: m for m in res.models}, "problems": res.problems}


def test_plain_folder_with_split_files_and_projector(tmp_path: Path) -> None:
    write_gguf(tmp_path / "Qwen2.5-7B-Instruct-Q4_K_M.gguf", "Qwen2.5 7B Instruct")
    vis = tmp_path / "vision"
    write_gguf(vis / "Gemma-3-4B-IT-Q4_K_M.gguf", "Gemma 3 4B IT")
    write_gguf(vis / "mmproj-gemma-3-4b-f16.gguf", "proj", "clip")
    for part in (1, 2, 3):
        write_gguf(tmp_path / "big" / f"Big-Q8_0-{part:05d}-of-00003.gguf", "Big")
    out = found(tmp_path, ctx_size=2048, parallel=2)
    models = out["models"]
    assert isinstance(models, dict)
    assert sorted(models) == ["big-q8_0", "gemma-3-4b-it-q4_k_m", "qwen2.5-7b-instruct-q4_k_m"]
    big = models["big-q8_0"]
    assert big.path == tmp_path / "big" / "Big-Q8_0-00001-of-00003.gguf"
    gemma = models["gemma-3-4b-it-q4_k_m"]
    assert gemma.mmproj == str(vis / "mmproj-gemma-3-4b-f16.gguf")
    assert models["qwen2.5-7b-instruct-q4_k_m"].mmproj is None
    # general.name + quantization, as an alias where it differs from the file's name.
    # ... and none where it is the same ("Qwen2.5 7B Instruct" + Q4_K_M).
    assert models["qwen2.5-7b-instruct-q4_k_m"].aliases == ()
    assert models["big-q8_0"].aliases == ("big-q4_k_m",)
    assert all(m.ctx_size == 2048 and m.parallel == 2 for m in models.values())
    assert all(m.origin == "scan:plain" for m in models.values())
    assert out["problems"] == ()


def test_incomplete_split_and_invalid_files_are_reported_and_skipped(tmp_path: Path) -> None:
    write_gguf(tmp_path / "Half-00001-of-00002.gguf")
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf at all")
    (tmp_path / "empty.gguf").write_bytes(b"")
    write_gguf(tmp_path / "ok.gguf")
    write_gguf(tmp_path / "vision-encoder.gguf", "enc", "clip")
    write_gguf(tmp_path / "(!).gguf")
    out = found(tmp_path)
    assert list(out["models"]) == ["ok"]  # type: ignore[call-overload]
    problems = "\n".join(out["problems"])  # type: ignore[arg-type]
    assert "1 of 2 parts" in problems
    assert "broken.gguf: not a valid GGUF" in problems
    assert "empty.gguf: not a valid GGUF" in problems
    assert "vision-encoder.gguf: a projector, not a model" in problems
    assert "(!).gguf: no model name can be made" in problems


def test_same_file_name_in_two_folders_is_named_by_folder(tmp_path: Path) -> None:
    write_gguf(tmp_path / "a" / "model.gguf", "A")
    write_gguf(tmp_path / "b" / "model.gguf", "B")
    assert sorted(found(tmp_path)["models"]) == ["a/model", "b/model"]  # type: ignore[call-overload]


def test_hugging_face_cache(tmp_path: Path) -> None:
    repo = tmp_path / "models--bartowski--Qwen2-0.5B-GGUF"
    commit = "a" * 40
    blob = write_gguf(repo / "blobs" / ("b" * 64), "Qwen2 0.5B")
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "Qwen2-0.5B-Q4_K_M.gguf").symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    models = found(tmp_path)["models"]
    assert isinstance(models, dict)
    m = models["qwen2-0.5b-q4_k_m"]
    assert m.aliases[0] == "hf.co/bartowski/Qwen2-0.5B-GGUF:Q4_K_M"
    assert m.origin == "scan:hf"


def test_lm_studio_tree(tmp_path: Path) -> None:
    repo = tmp_path / ".lmstudio" / "models" / "lmstudio-community" / "gemma-3-270m-it-GGUF"
    write_gguf(repo / "gemma-3-270m-it-Q4_K_M.gguf")
    write_gguf(repo / "mmproj-model-f16.gguf", "p", "clip")
    write_gguf(tmp_path / "plain" / "folder" / "not-lmstudio.gguf")
    models = found(tmp_path)["models"]
    assert isinstance(models, dict)
    assert models["not-lmstudio"].origin == "scan:plain"
    assert models["not-lmstudio"].aliases == ()
    m = models["gemma-3-270m-it-q4_k_m"]
    assert "lmstudio-community/gemma-3-270m-it-gguf" in m.aliases
    assert m.origin == "scan:lmstudio"
    assert m.mmproj is not None and m.mmproj.endswith("mmproj-model-f16.gguf")


def ollama_store(root: Path, name: tuple[str, str, str, str], model: Path,
                 projector: Path | None = None) -> None:
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    layers = []
    for path, kind in ((model, "model"), (projector, "projector")):
        if path is None:
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        os.link(path, blobs / f"sha256-{digest}")
        layers.append({"mediaType": f"application/vnd.ollama.image.{kind}",
                       "digest": f"sha256:{digest}", "size": path.stat().st_size})
    man = root / "manifests" / Path(*name)
    man.parent.mkdir(parents=True, exist_ok=True)
    man.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))


def test_ollama_store(tmp_path: Path) -> None:
    src = tmp_path / "src"
    store = tmp_path / "ollama"
    ollama_store(store, ("registry.ollama.ai", "library", "gemma3", "270m"),
                 write_gguf(src / "g.gguf", "Gemma"))
    ollama_store(store, ("hf.co", "bartowski", "Qwen2-GGUF", "Q4_K_M"),
                 write_gguf(src / "q.gguf", "Qwen"), write_gguf(src / "p.gguf", "p", "clip"))
    bad = store / "manifests" / "registry.ollama.ai" / "library" / "gone" / "latest"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model",
                                           "digest": "sha256:" + "0" * 64}]}))
    out = found(store)
    models = out["models"]
    assert isinstance(models, dict)
    assert sorted(models) == ["gemma3:270m", "hf.co/bartowski/Qwen2-GGUF:Q4_K_M"]
    assert models["hf.co/bartowski/Qwen2-GGUF:Q4_K_M"].mmproj is not None
    assert models["gemma3:270m"].origin == "scan:ollama"
    assert any("'gone': its model blob is missing" in p for p in out["problems"])  # type: ignore[attr-defined]


def test_names() -> None:
    assert model_name("Qwen 2.5 (7B) Instruct!") == "qwen-2.5-7b-instruct"
    assert quant_of("Llama-3-8B-Instruct-IQ3_XXS.gguf") == "IQ3_XXS"
    assert quant_of("model-f16.gguf") == "F16"
    assert quant_of("model.gguf") is None
    assert ollama_name(("registry.ollama.ai", "library", "llama3", "8b")) == "llama3:8b"
    assert ollama_name(("registry.ollama.ai", "me", "x", "latest")) == "me/x"


def test_thousands_of_files_scan_fast_the_second_time(tmp_path: Path) -> None:
    one = write_gguf(tmp_path / "seed.gguf")
    for i in range(2000):
        d = tmp_path / f"d{i % 50}"
        d.mkdir(exist_ok=True)
        os.link(one, d / f"m{i}.gguf")
        (d / f"readme{i}.txt").write_text("x")
    cache = HeaderCache()
    t0 = time.monotonic()
    first = scan([ScanDir(path=tmp_path)], cache)
    t1 = time.monotonic()
    second = scan([ScanDir(path=tmp_path)], cache)
    t2 = time.monotonic()
    assert len(first.models) == 2001 and second.models == first.models
    assert t2 - t1 < 5.0, f"rescan took {t2 - t1:.2f} s (first {t1 - t0:.2f} s)"


@pytest.mark.parametrize("path", ["x", "~/models"])
def test_scan_dirs_merge_both_forms(tmp_path: Path, path: str) -> None:
    from scheduler.config.root import load_config

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[scheduler]\nscan = ["{path}"]\n[[scan]]\npath = "y"\nctx_size = 512\n')
    loaded = load_config(cfg)
    dirs = loaded.scan_dirs()
    assert dirs[0].path == (tmp_path / "y").resolve() and dirs[0].ctx_size == 512
    assert dirs[1].path == (tmp_path / Path(path).expanduser()).resolve()


def test_every_layout_under_one_directory(tmp_path: Path) -> None:
    """scan = [DIR] where DIR holds an Ollama store, an HF cache and an LM Studio tree."""
    src = write_gguf(tmp_path / "src" / "g.gguf", "Gemma")
    root = tmp_path / "dir"
    ollama_store(root / "ollama", ("registry.ollama.ai", "library", "gemma3", "270m"), src)
    repo = root / "hub" / "models--unsloth--gemma-GGUF"
    blob = repo / "blobs" / ("e" * 64)
    blob.parent.mkdir(parents=True)
    os.link(src, blob)
    snap = repo / "snapshots" / ("f" * 40)
    snap.mkdir(parents=True)
    (snap / "gemma-Q4_K_M.gguf").symlink_to(os.path.relpath(blob, snap))
    lms = root / "lmstudio" / "bartowski" / "gemma-GGUF"
    lms.mkdir(parents=True)
    os.link(src, lms / "google_gemma-Q4_K_M.gguf")
    out = found(root)
    models = out["models"]
    assert isinstance(models, dict)
    assert sorted(models) == ["gemma-q4_k_m", "gemma3:270m", "google_gemma-q4_k_m"]
    assert models["google_gemma-q4_k_m"].aliases == ("bartowski/gemma-gguf",)
    assert models["google_gemma-q4_k_m"].origin == "scan:lmstudio"
    assert models["gemma-q4_k_m"].aliases == ("hf.co/unsloth/gemma-GGUF:Q4_K_M",)
    assert models["gemma3:270m"].origin == "scan:ollama"
    assert out["problems"] == ()


def test_brief_header_read_stops_at_the_vocabulary(tmp_path: Path) -> None:
    from scheduler.config.root import ModelConfig
    from scheduler.models.gguf_file import read_gguf_info
    from scheduler.models.sources import model_footprint

    def write(path: Path, arch_first: bool) -> Path:
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_name("Vocab")

        def arch() -> None:
            w.add_block_count(4)
            w.add_head_count(8)
            w.add_embedding_length(256)

        if arch_first:
            arch()
        w.add_token_list([f"t{i}" for i in range(20000)])
        if not arch_first:
            arch()
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
        w.add_tensor("w", np.zeros((2, 4), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    usual = write(tmp_path / "usual-Q8_0.gguf", True)
    brief = read_gguf_info(usual, brief=True)
    full = read_gguf_info(usual)
    assert (brief.name, brief.block_count, brief.head_count) == ("Vocab", 4, 8)
    assert brief.quantization is None and full.quantization == "Q8_0"
    # Sizing reads briefly, and fully when the architecture keys come after the vocabulary.
    odd = write(tmp_path / "odd.gguf", False)
    assert read_gguf_info(odd, brief=True).block_count is None
    sized = {p.name: model_footprint(ModelConfig(name="m", path=p, ctx_size=1024))
             for p in (usual, odd)}
    # Same architecture, same KV cache: the footprints differ only by the file sizes.
    assert sized["usual-Q8_0.gguf"] - usual.stat().st_size == sized["odd.gguf"] - odd.stat().st_size
    # The alias takes the quantization from the file name then.
    models = found(tmp_path)["models"]
    assert isinstance(models, dict)
    assert models["usual-q8_0"].aliases == ("vocab-q8_0",)


def test_embedding_and_reranking_models_are_launched_as_such(tmp_path: Path) -> None:
    def model(name: str, arch: str, pooling: gguf.PoolingType | None) -> None:
        w = gguf.GGUFWriter(str(tmp_path / name), arch)
        w.add_name(name)
        if pooling is not None:
            w.add_pooling_type(pooling)
        w.add_tensor("w", np.zeros((2, 4), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    model("nomic-embed.gguf", "nomic-bert", gguf.PoolingType.MEAN)
    model("qwen3-embed.gguf", "qwen3", gguf.PoolingType.LAST)
    model("bge-reranker.gguf", "bert", gguf.PoolingType.RANK)
    model("chat.gguf", "qwen3", None)
    models = found(tmp_path)["models"]
    assert isinstance(models, dict)
    assert models["nomic-embed"].embedding and models["qwen3-embed"].embedding
    assert models["bge-reranker"].rerank and not models["bge-reranker"].embedding
    assert not models["chat"].embedding and not models["chat"].rerank


def test_the_same_file_in_every_layout_keeps_distinct_names(tmp_path: Path) -> None:
    """Copies of one model as a plain file, in an HF cache and in an LM Studio tree:
    the plain file keeps its bare name, the others are named by their folder and keep
    their layout's alias."""
    src = write_gguf(tmp_path / "src" / "gemma-3-270m-q4_k_m.gguf", "Gemma")
    root = tmp_path / "DIR"
    root.mkdir()
    os.link(src, root / "gemma-3-270m-q4_k_m.gguf")
    repo = root / "models--google--gemma-GGUF"
    blob = repo / "blobs" / ("a" * 64)
    blob.parent.mkdir(parents=True)
    os.link(src, blob)
    snap = repo / "snapshots" / ("b" * 40)
    snap.mkdir(parents=True)
    (snap / "gemma-3-270m-q4_k_m.gguf").symlink_to(os.path.relpath(blob, snap))
    lms = root / "lmstudio" / "google" / "gemma-GGUF"
    lms.mkdir(parents=True)
    os.link(src, lms / "gemma-3-270m-q4_k_m.gguf")
    ollama_store(root / "ollama", ("registry.ollama.ai", "library", "gemma3", "latest"), src)
    models = found(root)["models"]
    assert isinstance(models, dict)
    assert sorted(models) == ["gemma-3-270m-q4_k_m", "gemma3",
                              "google/gemma-gguf/gemma-3-270m-q4_k_m",
                              "lmstudio/google/gemma-gguf/gemma-3-270m-q4_k_m"]
    assert models["google/gemma-gguf/gemma-3-270m-q4_k_m"].aliases == (
        "hf.co/google/gemma-GGUF:Q4_K_M",)
    assert models["lmstudio/google/gemma-gguf/gemma-3-270m-q4_k_m"].aliases == (
        "google/gemma-gguf",)
