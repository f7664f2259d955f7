"""LM Studio's layout: ``{publisher}/{repo}/file.gguf`` under its models folder.

The files are named as in any folder; a repo folder holding one model also answers
to ``{publisher}/{repo}``, the key ``lms ls`` shows. A repo folder is one two levels
below the scanned directory, or two levels below a folder whose name has "lmstudio"
in it (``.../lmstudio/{publisher}/{repo}``) when that lies deeper.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from scheduler.discovery.found import Found, model_name


def repo_key(directory: Path, root: Path) -> tuple[str, str] | None:
    """(publisher, repo) when ``directory`` is an LM Studio repo folder."""
    try:
        parts = directory.relative_to(root).parts
    except ValueError:
        return None
    if len(parts) == 2 or (len(parts) > 2 and "lmstudio" in parts[-3].lower()):
        return parts[-2], parts[-1]
    return None


def with_repo_alias(found: list[Found], publisher: str, repo: str) -> list[Found]:
    aliases = (model_name(f"{publisher}/{repo}"),) if len(found) == 1 else ()
    return [replace(f, layout="lmstudio", aliases=aliases) for f in found]
