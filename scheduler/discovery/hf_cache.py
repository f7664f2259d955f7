"""Hugging Face's cache layout: ``models--{org}--{repo}/snapshots/{commit}/file.gguf``
(the files are links into the repo's ``blobs/``), ``refs/main`` naming the commit.

Each model keeps its file's name and gets the alias ``hf.co/{org}/{repo}:{QUANT}``,
the name Ollama gives the same download, so a ``corral pull`` and a scan agree.
"""

from __future__ import annotations

import os
from pathlib import Path

from scheduler.discovery.found import Found, Walk, group_dir, quant_of

PREFIX = "models--"


def is_repo_dir(name: str) -> bool:
    return name.startswith(PREFIX) and name.count("--") >= 2


def repo_id(dirname: str) -> str:
    return dirname[len(PREFIX):].replace("--", "/", 1)


def snapshot(repo_dir: Path) -> Path | None:
    """The snapshot ``refs/main`` points at, else the newest one."""
    snaps = repo_dir / "snapshots"
    try:
        commit = (repo_dir / "refs" / "main").read_text().strip()
    except OSError:
        commit = ""
    if commit and (snaps / commit).is_dir():
        return snaps / commit
    try:
        dirs = [d for d in snaps.iterdir() if d.is_dir() and not d.is_symlink()]
    except OSError:
        return None
    return max(dirs, key=lambda d: d.stat().st_mtime_ns, default=None)


def walk_repo(repo_dir: Path, root: Path, w: Walk, *, pulled: bool = False) -> None:
    """The models of one cached repo; ``pulled``: Corral's own cache, where a model is
    named ``hf.co/{org}/{repo}:{QUANT}`` as it was pulled."""
    snap = snapshot(repo_dir)
    if snap is None:
        return
    repo = repo_id(repo_dir.name)
    found: list[Found] = []
    for dirpath, dirnames, files in os.walk(snap, followlinks=False):
        dirnames.sort()
        found += group_dir(Path(dirpath), files, root, "hf", w)
    quants = [quant_of(f.path.name) for f in found]
    for f, q in zip(found, quants, strict=True):
        if q is None or quants.count(q) > 1:
            if not pulled:
                w.found.append(f)
            continue
        ref = f"hf.co/{repo}:{q}"
        if pulled:
            w.found.append(Found(ref, f.path, "hf", (), f.mmproj, qualifier=repo))
        else:
            w.found.append(Found(f.name, f.path, "hf", (ref,), f.mmproj, qualifier=repo))
