"""Ollama's store: ``manifests/{host}/{namespace}/{model}/{tag}`` (JSON, an OCI
manifest) whose layers name ``blobs/sha256-{hex}`` files.

Models are named as ``ollama list`` shows them (a ``latest`` tag left off, which the
Ollama port adds back): ``gemma3:270m`` for the library,
``{namespace}/{model}:{tag}`` for another namespace, ``{host}/{namespace}/{model}:{tag}``
for another registry (``hf.co/{user}/{repo}:{quant}`` among them). The model layer is
a GGUF; a projector layer becomes ``mmproj``, adapter layers ``lora``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from scheduler.discovery import tree
from scheduler.discovery.found import Found, Walk, model_name
from scheduler.discovery.tree import Chain

DEFAULT_HOST = "registry.ollama.ai"
_MEDIA = "application/vnd.ollama.image."
_DIGEST_RE = re.compile(r"^sha256[:-]([0-9a-f]{64})$")


def is_store(root: Path) -> bool:
    return (root / "manifests").is_dir() and (root / "blobs").is_dir()


def ollama_name(parts: tuple[str, ...]) -> str:
    host, namespace, model, tag = parts[-4:]
    if host == DEFAULT_HOST:
        base = model if namespace == "library" else f"{namespace}/{model}"
    else:
        base = f"{host}/{namespace}/{model}"
    # "x:latest" is named "x": listed as "x:latest" on the Ollama port (every listed
    # name carries a tag there) and reached by both, as in Ollama.
    return base if tag == "latest" else f"{base}:{tag}"


def walk_store(store: Path, w: Walk, above: Chain = ()) -> None:
    """The models of a store; ``above``: the folders the walk came through. Its
    manifests and blobs may be links, to anywhere."""
    manifests = store / "manifests"
    for d in tree.walk(manifests, w, above):
        for fname in d.files:
            path = d.path / fname
            parts = path.relative_to(manifests).parts
            if len(parts) != 4:
                continue
            found = _from_manifest(path, parts, store, w)
            if found is not None:
                w.found.append(found)


def _from_manifest(path: Path, parts: tuple[str, ...], store: Path, w: Walk) -> Found | None:
    try:
        layers = json.loads(path.read_text())["layers"]
        by_type: dict[str, list[str]] = {}
        for layer in layers:
            by_type.setdefault(layer["mediaType"], []).append(layer["digest"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        w.problems.append(f"{path}: not an Ollama manifest ({e}); skipped")
        return None
    name = model_name(ollama_name(parts), lower=False)

    def blob(digest: str, kind: str) -> Path | None:
        m = _DIGEST_RE.match(digest)
        path_ = store / "blobs" / f"sha256-{m.group(1)}" if m else None
        got = tree.target(path_) if path_ is not None else "missing"
        if isinstance(got, Path):
            return got
        # Named with what is wrong: a linked blob that leads nowhere says where it points.
        what = f"its {kind} blob is missing" if got == "missing" else (
            f"its {kind} blob {path_} is {got}")
        w.problems.append(f"{path}: model {name!r}: {what}; skipped" if kind == "model"
                          else f"{path}: model {name!r}: {what}; served without it")
        return None

    models = by_type.get(_MEDIA + "model", [])
    model = blob(models[0], "model") if models else None
    if model is None:
        if not models:
            w.problems.append(f"{path}: model {name!r}: it has no model layer; skipped")
        return None
    projectors = [p for d in by_type.get(_MEDIA + "projector", []) if (p := blob(d, "projector"))]
    adapters = [p for d in by_type.get(_MEDIA + "adapter", []) if (p := blob(d, "adapter"))]
    return Found(name, model, "ollama", mmproj=projectors[0] if projectors else None,
                 lora=tuple(adapters), qualifier="/".join(parts[:-1]))
