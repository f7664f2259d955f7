"""Walking a scanned directory with its links followed, wherever they lead.

Model folders are commonly gathered from several disks with symbolic links, and the
Hugging Face cache is made of them; a link is followed to its target like
llama-server's ``--models-dir`` does. Paths stay the paths as reached (through the
links), so names derive from where the operator put a link, not from its target.

What the walk still refuses, each reported once per scan as a problem naming the
path: a link that leads back to a folder it lies in (a cycle, detected by device and
inode along the path from the scanned directory), a broken link or a loop of links,
a folder deeper than ``MAX_DEPTH``; and it stops after ``MAX_ENTRIES`` directory
entries, so a link to ``/`` costs a bounded walk rather than the whole disk every
few seconds.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from scheduler.discovery.found import Walk

MAX_DEPTH = 32
MAX_ENTRIES = 200_000

# (st_dev, st_ino) and the path each folder from the scanned directory down was
# reached by: what a folder met again on the way down would be a cycle of.
Chain = tuple[tuple[tuple[int, int], Path], ...]


@dataclass(slots=True)
class Dir:
    """One folder as reached. ``dirs``, sorted, may be pruned by the caller before the
    walk goes on (os.walk's top-down contract)."""

    path: Path
    dirs: list[str]
    # Regular files and links to them, sorted.
    files: list[str]
    mtime_ns: int
    chain: Chain
    # Links to files, with their target's (size, mtime): the watcher's signature notices
    # a target rewritten or a link swapped without reading every file.
    links: list[tuple[str, int, int]] = field(default_factory=list)


def _why(path: Path, err: OSError) -> str:
    if err.errno == errno.ELOOP:
        return "a loop of links"
    try:
        to = os.readlink(path)
    except OSError:
        to = "?"
    if err.errno == errno.ENOENT:
        return f"a broken link (to {to}: {err.strerror})"
    return f"a link to {to} that cannot be followed ({err.strerror})"


def link_problem(path: Path, err: OSError) -> str:
    """Why the link ``path`` leads to nothing, naming it and where it points."""
    return f"{path}: {_why(path, err)}; skipped"


def target(path: Path) -> Path | str:
    """``path`` if it is a file (through any links), else why not: "missing", "not a
    file", or what is wrong with the link."""
    try:
        st = os.stat(path)
    except OSError as e:
        return _why(path, e) if os.path.islink(path) else "missing"
    return path if stat.S_ISREG(st.st_mode) else "not a file"


def walk(top: Path, w: Walk, above: Chain = ()) -> Iterator[Dir]:
    """Every folder under ``top``, top-down, links followed; ``above``: the chain
    ``top`` was reached by (a nested walk of a layout continues its caller's)."""
    stack: list[tuple[Path, Chain]] = [(top, above)]
    while stack:
        path, chain = stack.pop()
        if w.entries >= MAX_ENTRIES:
            if not w.stopped:
                w.stopped = True
                w.problems.append(f"{path}: the scan stopped after {MAX_ENTRIES} entries "
                                  "(a link to a large tree?); the rest is not scanned")
            return
        try:
            st = os.stat(path)
        except OSError as e:
            w.problems.append(f"{path}: cannot be read ({e.strerror}); skipped")
            continue
        ident = (st.st_dev, st.st_ino)
        again = next((p for i, p in chain if i == ident), None)
        if again is not None:
            w.problems.append(f"{path}: leads back to {again}, a folder it lies in "
                              "(a cycle of links); not followed")
            continue
        if len(chain) >= MAX_DEPTH:
            w.problems.append(f"{path}: more than {MAX_DEPTH} folders deep; not scanned")
            continue
        here = Dir(path, [], [], st.st_mtime_ns, (*chain, (ident, path)))
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError as e:
            w.problems.append(f"{path}: cannot be read ({e.strerror}); skipped")
            continue
        w.entries += len(entries)
        for entry in entries:
            if entry.is_symlink():
                try:
                    t = os.stat(entry.path)
                except OSError as err:
                    w.problems.append(link_problem(Path(entry.path), err))
                    continue
                if stat.S_ISDIR(t.st_mode):
                    here.dirs.append(entry.name)
                elif stat.S_ISREG(t.st_mode):
                    here.files.append(entry.name)
                    here.links.append((entry.name, t.st_size, t.st_mtime_ns))
            elif entry.is_dir(follow_symlinks=False):
                here.dirs.append(entry.name)
            elif entry.is_file(follow_symlinks=False):
                here.files.append(entry.name)
        here.dirs.sort()
        here.files.sort()
        yield here
        stack += [(path / d, here.chain) for d in reversed(here.dirs)]
