"""The scanner: every configured directory, in whichever layout it holds, to the
models Corral offers (``Scheduler.set_dynamic_models("scan", ...)``).

Blocking (directory walks, GGUF header reads): run it in a worker thread. Headers
are read briefly (the keys before the vocabulary, ~0.3 ms a file) once per file
version (path, size, mtime) and kept in a ``HeaderCache``, so a rescan of an
unchanged tree costs the walk and one stat per file.

Rules, in order: a file whose header is not a valid GGUF is reported and skipped;
two files that would share a name are both named by their folder
(``{folder}/{name}``); an alias from ``general.name`` + quantization is added only
when no other model has that name or alias.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from scheduler.config.root import ModelConfig, ScanDir
from scheduler.discovery import hf_cache, lmstudio, ollama_store, tree
from scheduler.discovery.found import Found, Walk, group_dir, model_name, quant_of
from scheduler.errors import CorralError
from scheduler.models.gguf_file import GgufInfo, read_gguf_info

log = logging.getLogger(__name__)

Key = tuple[str, int, int]


class HeaderCache:
    """GGUF headers (or why one could not be read) per file version."""

    def __init__(self) -> None:
        self._seen: dict[Key, GgufInfo | str] = {}
        # The last scan's inputs and result: an unchanged tree is not validated again.
        self.last: tuple[object, ScanResult] | None = None

    def read(self, path: Path) -> GgufInfo | str:
        try:
            st = path.stat()
        except OSError as e:
            return f"cannot read: {e.strerror}"
        key = (str(path), st.st_size, st.st_mtime_ns)
        hit = self._seen.get(key)
        if hit is None:
            try:
                hit = read_gguf_info(path, brief=True)
            except CorralError as e:
                hit = e.message
            self._seen[key] = hit
        return hit

    def keep(self, paths: Iterable[Path]) -> None:
        """Forget every file not in ``paths`` (vanished or rewritten)."""
        wanted = {str(p) for p in paths}
        self._seen = {k: v for k, v in self._seen.items() if k[0] in wanted}


@dataclass(frozen=True, slots=True)
class ScanResult:
    models: tuple[ModelConfig, ...]
    problems: tuple[str, ...]


def walk_dir(root: Path, w: Walk) -> None:
    """Every model under one scanned directory, whatever its layout, links followed
    (tree.walk)."""
    if ollama_store.is_store(root):
        ollama_store.walk_store(root, w)
        return
    for here in tree.walk(root, w):
        for d in [d for d in here.dirs if hf_cache.is_repo_dir(d)]:
            here.dirs.remove(d)
            hf_cache.walk_repo(here.path / d, root, w, here.chain)
        for d in [d for d in here.dirs if ollama_store.is_store(here.path / d)]:
            here.dirs.remove(d)
            ollama_store.walk_store(here.path / d, w, here.chain)
        found = group_dir(here.path, here.files, root, "plain", w)
        key = lmstudio.repo_key(here.path, root) if found else None
        if key is not None:
            found = lmstudio.with_repo_alias(found, *key)
        w.found += found


def signature(dirs: Sequence[ScanDir]) -> tuple[tuple[str, int, int], ...]:
    """Blocking: every directory under ``dirs`` with its mtime, and every linked file
    with its target's size and mtime, reached as the scan reaches them. Adding,
    removing or renaming a file changes its directory's mtime, swapping a link
    changes its folder's, and a linked file rewritten elsewhere changes its own: an
    equal signature means no rescan is needed (a plain file rewritten in place is
    caught by the periodic full scan)."""
    out: list[tuple[str, int, int]] = []
    for d in dirs:
        for here in tree.walk(Path(os.path.abspath(d.path.expanduser())), Walk()):
            base = str(here.path)
            out.append((base, here.mtime_ns, -1))
            # Strings, not Paths: pathlib's joins cost more than the stats here.
            out += [(os.path.join(base, name), size, mtime) for name, size, mtime in here.links]
    return tuple(out)


def scan(dirs: Sequence[ScanDir], cache: HeaderCache) -> ScanResult:
    """Blocking: the models in ``dirs``."""
    problems: list[str] = []
    entries: list[tuple[Found, ScanDir]] = []
    for d in dirs:
        # Not resolved: a scanned directory reached through a link keeps its path (an
        # LM Studio tree is known by its folder's name).
        root = Path(os.path.abspath(d.path.expanduser()))
        if not root.is_dir():
            problems.append(f"scan: {d.path} is not a directory")
            continue
        w = Walk()
        walk_dir(root, w)
        problems += w.problems
        entries += [(f, d) for f in w.found]
    good: list[tuple[Found, ScanDir, GgufInfo]] = []
    for f, d in entries:
        info = cache.read(f.path)
        if isinstance(info, str):
            problems.append(f"{f.path}: not a valid GGUF, skipped: {info}")
            continue
        if info.architecture == "clip":
            problems.append(f"{f.path}: a projector, not a model; named mmproj-*.gguf it is "
                            "paired with the models of its folder")
            continue
        good.append((f, d, info))
    cache.keep(f.path for f, _, _ in good)
    inputs = (tuple(good), tuple(problems))
    if cache.last is not None and cache.last[0] == inputs:
        return cache.last[1]
    result = ScanResult(tuple(_configs(good, problems)), tuple(problems))
    cache.last = (inputs, result)
    return result


def _configs(good: list[tuple[Found, ScanDir, GgufInfo]], problems: list[str]
             ) -> list[ModelConfig]:
    names = [f.name for f, _, _ in good]
    final = [
        model_name(f"{f.qualifier}/{f.name}") if names.count(f.name) > 1 and f.qualifier
        else f.name
        for f, _, _ in good
    ]
    meta_alias = [_meta_alias(info, f.path.name) for f, _, info in good]
    counts: dict[str, int] = {}
    for f, _, _ in good:
        for a in f.aliases:
            counts[a] = counts.get(a, 0) + 1
    for a in meta_alias:
        if a:
            counts[a] = counts.get(a, 0) + 1
    taken: set[str] = set()
    out: list[ModelConfig] = []
    for (f, d, info), name, extra in zip(good, final, meta_alias, strict=True):
        if name in taken:
            problems.append(f"{f.path}: another file is already named {name!r}; skipped")
            continue
        aliases = [a for a in (*f.aliases, extra) if a and a != name and counts[a] == 1
                   and a not in final]
        try:
            mc = ModelConfig.model_validate({
                "name": name, "aliases": tuple(dict.fromkeys(aliases)), "path": f.path,
                "mmproj": str(f.mmproj) if f.mmproj else None,
                "lora": [{"path": p} for p in f.lora], "origin": f"scan:{f.layout}",
                **_kind(info), **d.defaults(),
            })
        except ValueError as e:
            problems.append(f"{f.path}: cannot be offered as {name!r}: {e}")
            continue
        taken.add(name)
        out.append(mc)
    return out


# Encoder-only architectures: embedding models whatever their pooling key says.
_ENCODERS = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3",
                       "modern-bert", "neo-bert", "t5encoder"})
_POOLING_RANK = 4  # llama.cpp's LLAMA_POOLING_TYPE_RANK


def _kind(info: GgufInfo) -> dict[str, bool]:
    """A reranker or an embedding model is launched as one (--rerank, --embedding):
    served as a chat model it would fail every call."""
    if info.pooling_type == _POOLING_RANK:
        return {"rerank": True}
    if info.architecture in _ENCODERS or info.pooling_type:
        return {"embedding": True}
    return {}


def _meta_alias(info: GgufInfo, filename: str) -> str:
    # Quantizers write general.file_type after the vocabulary, which the brief read
    # stops at: the file's name says the quantization then.
    quant = info.quantization or quant_of(filename)
    if not info.name or not quant:
        return ""
    return model_name(f"{info.name}-{quant}")
