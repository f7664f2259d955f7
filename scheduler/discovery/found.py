"""What a layout module reports: model files found, and files it had to skip.

Layout modules only walk directories and read manifests; naming rules shared by
every layout (the model-name alphabet, split files, projectors) live here so that
a file is named the same whichever layout found it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

# Split GGUF files as llama.cpp's gguf-split writes them: llama-server is given the
# first shard and finds the others itself.
SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
# Quantization names as they appear in file names (Q4_K_M, IQ3_XXS, F16, BF16, Q8_0).
QUANT_RE = re.compile(
    r"(?:^|[-_.])(?P<quant>(?:I?Q\d(?:_[A-Z0-9]+)*)|BF16|F16|F32)(?:$|[-_.])", re.IGNORECASE
)
_BAD_CHARS = re.compile(r"[^A-Za-z0-9._:/@+-]+")


@dataclass(frozen=True, slots=True)
class Found:
    """One model: its (first) file, and what the layout knows about it."""

    name: str
    path: Path
    layout: str  # "plain", "hf", "lmstudio", "ollama"
    aliases: tuple[str, ...] = ()
    mmproj: Path | None = None
    lora: tuple[Path, ...] = ()
    # Where the name came from, to qualify it when two files would share one.
    qualifier: str = ""


@dataclass
class Walk:
    """What the walk of one scanned directory found, and what it cost (tree.walk
    bounds it)."""

    found: list[Found] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    entries: int = 0
    stopped: bool = False


def model_name(text: str, *, lower: bool = True) -> str:
    """``text`` within the model-name rules: lower case (unless told), other
    characters as '-'."""
    return _BAD_CHARS.sub("-", text.strip().lower() if lower else text.strip()).strip("-._:/@+")


def quant_of(filename: str) -> str | None:
    stem = filename[:-5] if filename.lower().endswith(".gguf") else filename
    matches = list(QUANT_RE.finditer(stem))
    return matches[-1].group("quant").upper() if matches else None


def is_projector(filename: str) -> bool:
    return "mmproj" in filename.lower()


def group_dir(directory: Path, files: list[str], root: Path, layout: str, w: Walk) -> list[Found]:
    """The models among one directory's GGUF files (``files``: files, or links to
    files, as tree.walk lists them): split files as one model (by their first shard),
    projectors paired with every model of the folder, not listed."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    projector = next((directory / f for f in ggufs if is_projector(f)), None)
    out: list[Found] = []
    shards: dict[str, list[tuple[int, int, str]]] = {}
    for f in ggufs:
        if is_projector(f):
            continue
        m = SPLIT_RE.match(f)
        if m:
            shards.setdefault(m.group("stem"), []).append(
                (int(m.group("part")), int(m.group("count")), f))
            continue
        out.append(_one(directory, f, f[:-5], root, layout, projector, w))
    for stem, parts in sorted(shards.items()):
        parts.sort()
        first, count, fname = parts[0]
        if first != 1 or len(parts) != count:
            w.problems.append(
                f"{directory / fname}: split model {stem!r} has {len(parts)} of {count} "
                "parts (or lacks the first); skipped")
            continue
        out.append(_one(directory, fname, stem, root, layout, projector, w))
    return [f for f in out if f.name]


def _one(directory: Path, fname: str, stem: str, root: Path, layout: str,
         projector: Path | None, w: Walk) -> Found:
    path = directory / fname
    rel = directory.relative_to(root).as_posix() if directory != root else ""
    name = model_name(stem)
    if not name:
        w.problems.append(f"{path}: no model name can be made of its file name; skipped")
    return Found(name, path, layout, mmproj=projector, qualifier=rel)
