"""Runtime models: models an admin creates over HTTP from a file Corral already serves,
with launch parameters that are not protected keys (docs/admin-api.md).

The rule is the admin-write rule (scheduler/config/writable.py): a runtime model is a
variant of a model Corral serves from its scan roots or its cache, differing only in
keys an HTTP write may change, and only in those listed in ``PARAMS`` (context, slots,
replicas, TTL, priority, aliases, request policy, unlisted). It can never name a
binary, arguments, environment, a runtime or a path: its file is its base model's, and
that file must lie inside a scan root or Corral's model cache, checked when it is
created and again when it is restored.

They are kept in a TOML file beside the config (``<config stem>.runtime.toml``), one
``[[models]]`` table each with the file it serves and its parameters, and offered again
at the next start (an entry the rule refuses then is withheld: proxy/ops/runtime_models.py).
Blocking: the file functions (callers use threads).
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import ValidationError

from scheduler.config import writable
from scheduler.config.root import CorralConfig, ModelConfig
from scheduler.errors import BadRequest

log = logging.getLogger("scheduler.models.runtime")

ORIGIN = "runtime"
# What a runtime model may set: each is a writable key (writable.WRITABLE) that changes
# what a launch is given, never what runs or what is read.
PARAMS = ("aliases", "ctx_size", "parallel", "replicas", "ttl", "priority", "request", "unlisted")
# The fields that say which file a model serves: copied from its base, never given.
_FILE_KEYS = ("path", "hf_repo", "hf_file", "hf_revision", "mmproj")


@dataclass(frozen=True)
class RuntimeModel:
    """One created model: its name, what it was made from (for the operator), the file
    fields of its base and its parameters."""

    name: str
    source: str
    files: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)

    def as_table(self) -> dict[str, Any]:
        return {"name": self.name, "from": self.source, **self.files, **self.params}


def check_params(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of a runtime model, or BadRequest naming the first key that is
    not one (a protected key says why it is protected)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None:
            continue
        if key not in PARAMS:
            why = writable.reason(("models", "*", key))
            if why is not None and why != writable.UNLISTED:
                raise BadRequest(f"'{key}' is a protected key ({why}): a runtime model "
                                 f"sets only {', '.join(PARAMS)}")
            raise BadRequest(f"'{key}' cannot be set on a runtime model; it sets only "
                             f"{', '.join(PARAMS)}")
        out[key] = value
    return out


def roots(cfg: CorralConfig) -> list[Path]:
    """Where a runtime model's file may lie: the scan roots and Corral's model cache."""
    from scheduler.models.sources import models_cache_dir

    return [*(d.path for d in cfg.scan_dirs()), models_cache_dir()]


def _inside(path: Path, where: Iterable[Path]) -> bool:
    # As the scanner names files: absolute, ".." folded, links kept (a scanned root of
    # links to models on other disks serves them; docs/models.md).
    spot = Path(os.path.abspath(path))
    return any(spot.is_relative_to(os.path.abspath(r)) for r in where)


def _files_of(base: ModelConfig, cfg: CorralConfig) -> dict[str, str]:
    if not (base.origin.startswith("scan:") or base.origin in ("pulled", ORIGIN)):
        raise BadRequest(
            f"model '{base.name}' comes from {base.origin}: a runtime model is made from a "
            "file Corral serves from its scan roots or its cache (a scanned or pulled "
            "model, or an hf.co/... name it can pull)")
    if base.path is not None:
        if not _inside(base.path, roots(cfg)):
            raise BadRequest(f"model '{base.name}': its file is outside the scan roots "
                             "and the cache")
        return {"path": str(base.path)}
    files = {k: str(getattr(base, k)) for k in _FILE_KEYS if getattr(base, k) is not None}
    if "hf_repo" not in files or "hf_file" not in files:
        raise BadRequest(f"model '{base.name}' names no file a runtime model can serve")
    return files


def _model(name: str, files: Mapping[str, str], params: Mapping[str, Any],
           defaults: Mapping[str, Any]) -> ModelConfig:
    try:
        return ModelConfig.model_validate({**defaults, **files, **params, "name": name,
                                           "origin": ORIGIN})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BadRequest(f"runtime model '{name}': {where}: {first['msg']}") from None


def _scan_defaults(cfg: CorralConfig, files: Mapping[str, str]) -> dict[str, Any]:
    """What a scan gives a model found under the same root (a [[scan]] table's keys)."""
    path = files.get("path")
    if path is None:
        return {}
    for d in cfg.scan_dirs():
        if _inside(Path(path), [d.path]):
            return d.defaults()
    return {}


def create(name: str, base: ModelConfig, raw: Mapping[str, Any], cfg: CorralConfig
           ) -> tuple[RuntimeModel, ModelConfig]:
    """A runtime model named ``name`` over ``base``'s file with the parameters ``raw``;
    BadRequest for a protected key, a base that is not a scanned or pulled file, a bad
    value."""
    params = check_params(raw)
    files = _files_of(base, cfg)
    # The base's own launch keys (a [[scan]] table's args, threads) stay: the model is a
    # variant of what Corral already runs, differing only in writable keys.
    keep = {k: v for k, v in base.model_dump(exclude={"name", "aliases", "origin",
                                                      *_FILE_KEYS}).items()}
    model = _model(name, files, params, keep)
    return RuntimeModel(name, base.name, files, params), model


def restore(entry: RuntimeModel, cfg: CorralConfig) -> ModelConfig:
    """The model a saved entry serves now; BadRequest when its file has left the roots
    or the entry names a key it may not."""
    params = check_params(entry.params)
    path = entry.files.get("path")
    if path is not None and not _inside(Path(path), roots(cfg)):
        raise BadRequest(f"runtime model '{entry.name}': {path} is outside the scan roots "
                         "and the cache")
    unknown = set(entry.files) - set(_FILE_KEYS)
    if unknown:
        raise BadRequest(f"runtime model '{entry.name}': '{sorted(unknown)[0]}' cannot be "
                         "set on a runtime model")
    if path is None and "hf_repo" not in entry.files:
        raise BadRequest(f"runtime model '{entry.name}' names no file")
    return _model(entry.name, entry.files, params, _scan_defaults(cfg, entry.files))


def file_beside(config_path: Path) -> Path:
    return config_path.with_name(config_path.stem + ".runtime.toml")


def read(path: Path) -> list[RuntimeModel]:
    """The entries of a runtime-models file (none when there is no file). Blocking."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, tomllib.TOMLDecodeError) as e:
        log.warning("runtime models: cannot read %s: %s", path, e)
        return []
    out = []
    for table in data.get("models") or ():
        if not isinstance(table, dict) or not isinstance(table.get("name"), str):
            continue
        table = dict(table)
        name, source = table.pop("name"), str(table.pop("from", ""))
        files = {k: str(table.pop(k)) for k in _FILE_KEYS if k in table}
        out.append(RuntimeModel(name, source, files, table))
    return out


def write(path: Path, entries: Sequence[RuntimeModel]) -> None:
    """Replace the file with ``entries`` (a temporary file renamed over it). Blocking."""
    text = ("# Runtime models, created over Corral's admin API (docs/admin-api.md).\n"
            "# Edited by Corral: change them through the API.\n\n"
            + tomli_w.dumps({"models": [e.as_table() for e in entries]}))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
