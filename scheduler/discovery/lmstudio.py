"""LM Studio's layout: ``{publisher}/{repo}/file.gguf`` under its models folder.

The files are named as in any folder; a repo folder holding one model also answers
to ``{publisher}/{repo}``, the key ``lms ls`` shows. The tree is recognised by a
folder above ``{publisher}/{repo}`` whose name has "lmstudio" in it
(``~/.lmstudio/models``); a plain ``a/b/file.gguf`` elsewhere stays a plain folder.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from scheduler.discovery.found import Found, model_name


def repo_key(directory: Path, root: Path) -> tuple[str, str] | None:
    """(publisher, repo) when ``directory`` is an LM Studio repo folder: two levels
    below the scanned directory, under a folder named like LM Studio's."""
    try:
        depth = len(directory.relative_to(root).parts)
    except ValueError:
        return None
    if depth < 2 or not any("lmstudio" in p.lower() for p in directory.parts[:-2]):
        return None
    return directory.parts[-2], directory.parts[-1]


def with_repo_alias(found: list[Found], publisher: str, repo: str) -> list[Found]:
    aliases = (model_name(f"{publisher}/{repo}"),) if len(found) == 1 else ()
    return [replace(f, layout="lmstudio", aliases=aliases) for f in found]
