"""Configuration: pydantic models, TOML loading, validation, environment overrides.

A config is one main TOML file (``corral.toml``) with ``[server]``, ``[scheduler]``,
``[llama_server]`` and ``[[models]]``, plus an optional directory of one-model files
(``models_dir``, default ``models.d`` beside the main file). Environment variables
``CORRAL_<SECTION>__<KEY>`` override the file (``CORRAL_SERVER__PORT=9000``).

Every key is validated; unknown keys are errors. Messages name the file, the model and
the key, because "invalid integer" alone sends a user hunting through a dozen files.

The tables' models live in ``scheduler/config/models.py`` (``[[models]]``,
``[llama_server]``) and ``scheduler/config/sections.py`` (the other tables), on the
shared pieces of ``scheduler/config/base.py``; this module assembles them
(``CorralConfig``), reads the files and words the errors. Import them from here.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from scheduler.config.base import parse_size
from scheduler.config.models import (
    RESERVED_FLAGS,
    Capability,
    LlamaServerConfig,
    LoraAdapter,
    ModelConfig,
    Replicas,
    jinja_problem,
)
from scheduler.config.sections import (
    CaptureConfig,
    ClusterConfig,
    KeyConfig,
    ScanDir,
    SchedulerConfig,
    ServerConfig,
)
from scheduler.config.tools import McpConfig, McpServerConfig, check_unique
from scheduler.engines.settings import (
    ProviderConfig,
    RuntimeConfig,
    UpstreamApi,
    provider_may_offer,
    secrets_of,
)
from scheduler.engines.templates import BUILTINS, resolve_runtime
from scheduler.errors import ConfigError

__all__ = [
    "RESERVED_FLAGS",
    "Capability",
    "CaptureConfig",
    "ClusterConfig",
    "CorralConfig",
    "KeyConfig",
    "LlamaServerConfig",
    "LoraAdapter",
    "ModelConfig",
    "Replicas",
    "ScanDir",
    "SchedulerConfig",
    "ServerConfig",
    "UpstreamApi",
    "load_config",
    "parse_size",
    "parse_toml",
]


class _Env(EnvSettingsSource):
    """The ``CORRAL_*`` environment, without ``CORRAL_LLAMA_SERVER``: that one is a
    path to a binary (scheduler/installing/install.py), not the ``[llama_server]`` table, whose
    keys are set one by one (``CORRAL_LLAMA_SERVER__BINARY``)."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        env = super()._load_env_vars()
        return {k: v for k, v in env.items() if k.lower() != "corral_llama_server"}


class CorralConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CORRAL_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    server: ServerConfig = ServerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    llama_server: LlamaServerConfig = LlamaServerConfig()
    models_dir: Path | None = None
    models: tuple[ModelConfig, ...] = ()
    keys: tuple[KeyConfig, ...] = ()
    scan: tuple[ScanDir, ...] = ()
    cluster: ClusterConfig = ClusterConfig()
    runtimes: dict[str, RuntimeConfig] = Field(default_factory=dict)
    providers: tuple[ProviderConfig, ...] = ()
    mcp_servers: tuple[McpServerConfig, ...] = ()
    mcp: McpConfig = McpConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file arrives as init kwargs; the environment must win over it.
        env = _Env(settings_cls, env_prefix="CORRAL_", env_nested_delimiter="__")
        return env, init_settings

    @model_validator(mode="after")
    def _unique_names(self) -> CorralConfig:
        seen: dict[str, str] = {}
        for m in self.models:
            for name in (m.name, *m.aliases):
                if name in seen:
                    raise ValueError(
                        f"model name {name!r} of model {m.name!r} is already used by "
                        f"model {seen[name]!r}"
                    )
                seen[name] = m.name
        variants: dict[str, str] = {}
        for m in self.models:
            for v in m.variants:
                for name in (v.name, *v.aliases):
                    owner = seen.get(name) or variants.get(name)
                    if owner is not None:
                        raise ValueError(
                            f"model {m.name!r}: variant name {name!r} is already used by "
                            f"model {owner!r}")
                    variants[name] = m.name
        for m in self.models:
            for fb in m.fallbacks:
                if fb in variants:
                    raise ValueError(f"model {m.name!r}: fallbacks: {fb!r} is a variant of "
                                     f"{variants[fb]!r}; name the model")
                if fb not in seen and provider_may_offer(self.providers, fb):
                    continue  # known once its provider lists it; skipped until then
                if fb not in seen:
                    raise ValueError(f"model {m.name!r}: fallbacks: no model named {fb!r}")
                if seen[fb] == m.name:
                    raise ValueError(f"model {m.name!r}: fallbacks: {fb!r} is the model itself")
        for name, rt in self.runtimes.items():
            if rt.template is not None and rt.template not in BUILTINS:
                raise ValueError(f"runtimes.{name}.template: no built-in {rt.template!r} "
                                 f"(built-in: {', '.join(BUILTINS)})")
        for m in self.models:
            try:
                resolved = resolve_runtime(m.runtime, self.runtimes)
            except KeyError:
                known = ", ".join(sorted({*BUILTINS, *self.runtimes}))
                raise ValueError(f"model {m.name!r}: runtime: no runtime named {m.runtime!r} "
                                 f"(known: {known})") from None
            if resolved.llama_server and m.runtime is not None and not m.has_file:
                raise ValueError(f"model {m.name!r}: runtime {m.runtime!r} runs llama-server, "
                                 "which needs 'path', 'package' or 'hf_repo'")
            program = resolved.binary or Path((resolved.command or ("",))[0])
            if m.runtime is not None and (resolved.llama_server
                                          or program.name.startswith("llama-server")):
                problem = jinja_problem((*(resolved.command or ()), *m.args),
                                        {**resolved.env, **m.env})
                if problem is not None:
                    raise ValueError(f"model {m.name!r}: runtime {m.runtime!r}: {problem}")
        names = [p.name for p in self.providers]
        if len(set(names)) != len(names):
            raise ValueError(f"providers: names must be unique (got {names})")
        check_unique(self.mcp_servers)
        self._check_keys()
        self._check_pinned()
        return self

    def credentials(self) -> set[str]:
        """Every credential the config holds or names, resolved: the server's
        api_keys, remote and provider keys (``SecretStr``, which dumps as
        ``**********``), the values of their ``api_key_env``, credential headers.
        What the log scrubber, /admin and `corral check` keep out (scheduler/config/secrets.py)."""
        remotes = [rc for m in self.models for rc in m.remote_configs()]
        mcp_keys = {os.environ.get(s.api_key_env, "") for s in self.mcp_servers
                    if s.api_key_env} - {""}
        return {*self.server.api_keys, *(k.key for k in self.keys if k.key),
                *secrets_of(remotes, self.providers), *mcp_keys}

    def _check_keys(self) -> None:
        names: set[str] = set()
        for k in self.keys:
            if k.name in names:
                raise ValueError(f"keys: name {k.name!r} is used twice")
            names.add(k.name)
        secrets = [k.key for k in self.keys if k.key is not None] + list(self.server.api_keys)
        if len(set(secrets)) != len(secrets):
            raise ValueError("keys: the same key is configured twice")

    def _check_pinned(self) -> None:
        # Memory is checked by `corral check`, which can read the GGUF files; the count
        # is plain arithmetic over the config.
        pinned = [m for m in self.models if not m.evictable and m.local]
        need = sum(max(1, m.replicas.min) for m in pinned)
        if need > self.scheduler.max_instances:
            raise ValueError(
                f"pinned models ({', '.join(m.name for m in pinned)}, evictable = false) "
                f"need {need} instances but scheduler.max_instances is "
                f"{self.scheduler.max_instances}"
            )

    def model(self, name: str) -> ModelConfig | None:
        for m in self.models:
            if m.name == name:
                return m
        return None

    def scan_dirs(self) -> tuple[ScanDir, ...]:
        """``[scheduler] scan`` paths and ``[[scan]]`` tables, each directory once."""
        out = list(self.scan)
        seen = {d.path for d in out}
        out += [ScanDir(path=p) for p in self.scheduler.scan if p not in seen]
        return tuple(out)

    def ttl(self, model: ModelConfig) -> float:
        return self.scheduler.default_ttl if model.ttl is None else model.ttl


def _format_errors(err: ValidationError, where: str, data: Mapping[str, Any]) -> str:
    lines = []
    for e in err.errors():
        loc = list(e["loc"])
        label = ""
        if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
            models = data.get("models") or []
            name = models[loc[1]].get("name") if loc[1] < len(models) else None
            label = f"model {name!r}: " if name else f"models[{loc[1]}]: "
            loc = loc[2:]
        key = ".".join(str(p) for p in loc) or "(top level)"
        msg = e["msg"]
        env_name = "CORRAL_" + "__".join(str(p) for p in loc).upper()
        if not label and env_name in os.environ:
            where_key = f"{key} (from environment variable {env_name})"
            key = where_key
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{where}: {label}{key}: {msg}")
    return "\n".join(lines)


def _as_models_entry(err: ValidationError) -> ValidationError:
    errors = [{**e, "loc": ("models", 0, *e["loc"])} for e in err.errors()]
    return ValidationError.from_exception_data(err.title, errors)  # type: ignore[arg-type]


# Deeper than any config needs (models.*.remotes.*.headers is 5 levels): tomllib
# recurses once per level and, past Python's recursion limit, raised RecursionError
# out of every caller (a 500 from the dashboard's dry run).
MAX_TOML_DEPTH = 32


def parse_toml(text: str) -> dict[str, Any]:
    """``tomllib.loads``, bounded in depth. Raises ValueError (``TOMLDecodeError`` is
    one) saying what is wrong."""
    try:
        data = tomllib.loads(text)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_TOML_DEPTH} levels") from None
    stack: list[tuple[object, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else (
            value if isinstance(value, list) else ())
        if children and depth > MAX_TOML_DEPTH:
            raise ValueError(f"nested deeper than {MAX_TOML_DEPTH} levels")
        stack += [(c, depth + 1) for c in children]
    return data


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from None
    try:
        return parse_toml(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except ValueError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def _parse_toml(path: Path, text: str) -> dict[str, Any]:
    try:
        return parse_toml(text)
    except ValueError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def _resolve_paths(model: dict[str, Any], base: Path) -> None:
    p = model.get("path")
    if isinstance(p, str):
        model["path"] = str((base / Path(p).expanduser()).resolve())
    # mmproj is a file of hf_repo when the model comes from a repo, else a path.
    mm = model.get("mmproj")
    if isinstance(mm, str) and model.get("hf_repo") is None:
        model["mmproj"] = str((base / Path(mm).expanduser()).resolve())
    for lora in model.get("lora") or ():
        if isinstance(lora, dict) and isinstance(lora.get("path"), str):
            lora["path"] = str((base / Path(lora["path"]).expanduser()).resolve())


def _resolve_scan(data: dict[str, Any], base: Path) -> None:
    # Absolute, links kept: a scanned directory reached through a link is named by the
    # link (discovery/tree.py), an LM Studio tree by its folder's name.
    def where(p: object) -> object:
        return os.path.abspath(base / Path(p).expanduser()) if isinstance(p, str) else p

    sched = data.get("scheduler")
    if isinstance(sched, dict) and isinstance(sched.get("scan"), list):
        sched["scan"] = [where(p) for p in sched["scan"]]
    for table in data.get("scan") or ():
        if isinstance(table, dict):
            table["path"] = where(table.get("path"))


def load_config(path: Path | str, *, text: str | None = None) -> CorralConfig:
    """Load, merge and validate a main file and its models directory.

    Relative model paths are taken relative to the file that names them.
    Raises ConfigError with every problem found, one per line. ``text``: the main
    file's contents as they would be at ``path`` (a dry run of an edit; nothing is
    read from ``path`` itself, its models directory still is).
    """
    path = Path(path)
    data = _read_toml(path) if text is None else _parse_toml(path, text)
    models = data.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise ConfigError(f"{path}: models: must be an array of tables ([[models]])")
    for m in models:
        if isinstance(m, dict):
            _resolve_paths(m, path.parent)
    _resolve_scan(data, path.parent)

    models_dir = data.get("models_dir")
    mdir = path.parent / (models_dir if isinstance(models_dir, str) else "models.d")
    problems: list[str] = []
    if mdir.is_dir():
        for f in sorted(mdir.glob("*.toml")):
            try:
                one = _read_toml(f)
            except ConfigError as e:
                problems.append(str(e))
                continue
            _resolve_paths(one, f.parent)
            try:
                ModelConfig.model_validate(one)
            except ValidationError as e:
                # Report as the one entry of a models list, so the message names it.
                problems.append(_format_errors(_as_models_entry(e), str(f), {"models": [one]}))
                continue
            models.append(one)
    elif isinstance(models_dir, str):
        problems.append(f"{path}: models_dir: {mdir} is not a directory")
    data["models"] = models
    if isinstance(models_dir, str):
        data["models_dir"] = str(mdir)

    cfg: CorralConfig | None = None
    try:
        cfg = CorralConfig(**data)
    except ValidationError as e:
        problems.append(_format_errors(e, str(path), data))
    except SettingsError as e:
        # An environment value that had to be JSON (a list, a table) and was not.
        names = sorted(k for k in os.environ if k.startswith("CORRAL_"))
        problems.append(
            f"environment ({', '.join(names)}): {e}; lists and tables must be JSON, "
            'e.g. CORRAL_SERVER__API_KEYS=\'["key"]\''
        )
    if problems or cfg is None:
        raise ConfigError("\n".join(problems))
    return cfg
