"""Hugging Face's cache layout: ``models--{org}--{repo}/snapshots/{commit}/file.gguf``
(the files are links into the repo's ``blobs/``), ``refs/main`` naming the commit.

Each model keeps its file's name and gets the alias ``hf.co/{org}/{repo}:{QUANT}``,
the name Ollama gives the same download, so a ``corral pull`` and a scan agree: scan
Corral's own cache (``~/.cache/corral/models/huggingface``) and pulled models are
offered again after a restart, under the names they were pulled as.
"""

from __future__ import annotations

from pathlib import Path

from scheduler.discovery import tree
from scheduler.discovery.found import Found, Walk, group_dir, quant_of
from scheduler.discovery.tree import Chain

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
        dirs = [(d.stat().st_mtime_ns, d) for d in snaps.iterdir() if d.is_dir()]
    except OSError:
        return None
    return max(dirs, default=(0, None))[1]


def walk_repo(repo_dir: Path, root: Path, w: Walk, above: Chain = ()) -> None:
    """The models of one cached repo; ``above``: the folders the walk came through."""
    snap = snapshot(repo_dir)
    if snap is None:
        return
    repo = repo_id(repo_dir.name)
    found: list[Found] = []
    for d in tree.walk(snap, w, above):
        found += group_dir(d.path, d.files, root, "hf", w)
    quants = [quant_of(f.path.name) for f in found]
    for f, q in zip(found, quants, strict=True):
        aliases = (f"hf.co/{repo}:{q}",) if q is not None and quants.count(q) == 1 else ()
        w.found.append(Found(f.name, f.path, "hf", aliases, f.mmproj, qualifier=repo))
