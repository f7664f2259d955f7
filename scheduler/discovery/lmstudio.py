"""LM Studio's layout: ``{publisher}/{repo}/file.gguf`` under its models folder.

The files are named as in any folder; a repo folder holding one model also answers
to ``{publisher}/{repo}``, the key ``lms ls`` shows.
"""

from __future__ import annotations

from pathlib import Path

from scheduler.discovery.found import Found, model_name


def is_repo_folder(directory: Path, root: Path) -> bool:
    try:
        return len(directory.relative_to(root).parts) == 2
    except ValueError:
        return False


def with_repo_alias(found: list[Found], directory: Path, root: Path) -> list[Found]:
    if len(found) != 1:
        return found
    publisher, repo = directory.relative_to(root).parts
    key = model_name(f"{publisher}/{repo}")
    f = found[0]
    return [Found(f.name, f.path, "lmstudio", (key,), f.mmproj, qualifier=f.qualifier)]
