"""Configuration: pydantic models, TOML loading, validation, environment overrides.

A config is one main TOML file (``corral.toml``) with ``[server]``, ``[scheduler]``,
``[llama_server]`` and ``[[models]]``, plus an optional directory of one-model files
(``models_dir``, default ``models.d`` beside the main file). Environment variables
``CORRAL_<SECTION>__<KEY>`` override the file (``CORRAL_SERVER__PORT=9000``).

Every key is validated; unknown keys are errors. Messages name the file, the model and
the key, because "invalid integer" alone sends a user hunting through a dozen files.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from scheduler.engines.settings import (
    ProviderConfig,
    RemoteConfig,
    RuntimeConfig,
    UpstreamApi,
    provider_may_offer,
    secrets_of,
)
from scheduler.engines.templates import BUILTINS, resolve_runtime
from scheduler.errors import ConfigError

# A name clients can type in a URL and a JSON string without surprises. ":" is
# allowed so that Ollama-style tags ("gemma3:270m") can be configured verbatim.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")


Capability = Literal[
    "chat", "completion", "embedding", "rerank", "vision", "audio", "tools", "infill"
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535, description="OpenAI-compatible port (0 = any free)")
    ollama_enabled: bool = True
    ollama_port: int = Field(11434, ge=0, le=65535, description="Ollama-compatible port")
    lmstudio_enabled: bool = True
    lmstudio_port: int = Field(1234, ge=0, le=65535, description="LM Studio-compatible port")
    api_keys: tuple[str, ...] = ()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    # Browsers and the edge (docs/security.md).
    allowed_hosts: tuple[str, ...] = Field(
        (), description="Host header values accepted besides loopback names and 'host'"
    )
    cors_origins: tuple[str, ...] = Field(
        (), description="Origins whose pages may call the API (the Ollama port keeps its rules)"
    )
    admin_config_write: bool = Field(
        False, description="allow PUT /admin/config (never for what Corral executes)"
    )
    default_model: str | None = Field(
        None, description="model for native calls (/completion, /tokenize ...) that name none"
    )
    dashboard_history: int = Field(
        3600, ge=60, le=86400, description="seconds of per-second samples the dashboard charts"
    )
    # Listener limits.
    header_timeout: float = Field(30.0, gt=0, description="seconds to read a request's headers")
    body_timeout: float = Field(300.0, gt=0, description="seconds to read a request body")
    keepalive_timeout: float = Field(75.0, ge=0, description="idle keep-alive seconds")
    max_connections: int = Field(4096, ge=1, description="client connections per port at once")
    max_connections_per_client: int | None = Field(
        None, ge=1, description="connections per port from one client address; none = no cap"
    )
    max_body_bytes_in_flight: int = Field(
        512 * 2**20, ge=2**20, description="request body bytes held in memory at once, all ports"
    )
    lmstudio_sdk_port: int | None = Field(
        None, ge=0, le=65535, description="extra LM Studio SDK discovery listener (41343)"
    )
    # Performance (docs/operations.md, tests/bench/README.md).
    backlog: int = Field(
        4096, ge=1, description="listen backlog per port (capped by net.core.somaxconn)"
    )
    gc_freeze: bool = Field(
        True, description="freeze long-lived objects out of the garbage collector"
    )
    workers: int | Literal["auto"] = Field(
        1, description='processes relaying calls ("auto": one per core); one owns the state'
    )

    @field_validator("workers")
    @classmethod
    def _workers_positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError('workers must be at least 1, or "auto"')
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys_not_blank(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        if any(not k.strip() for k in keys):
            raise ValueError("an API key must not be empty")
        return keys


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size(value: object) -> int:
    """Bytes from an int or a string such as "512MiB", "8 GB", "1.5GiB"."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string like '8GiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            unit = (m.group(2) or "").upper().removesuffix("B")
            return int(float(m.group(1)) * _UNITS[unit])
    raise ValueError(f"{value!r} is not a size (use bytes or a string like '8GiB')")


class Replicas(_Strict):
    min: int = Field(0, ge=0, description="instances kept loaded even when idle")
    max: int = Field(1, ge=1, description="instances launched at most under load")

    @model_validator(mode="after")
    def _ordered(self) -> Replicas:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class SchedulerConfig(_Strict):
    max_instances: int = Field(4, ge=1, description="llama-server processes alive at once")
    max_load: float = Field(
        1.0, gt=0, description="in-flight ÷ slots above which a replica is preferred/added"
    )
    queue_size: int = Field(64, ge=0, description="calls waiting per model before 503")
    queue_timeout: float = Field(120.0, gt=0, description="seconds a call may wait for a slot")
    load_timeout: float = Field(120.0, gt=0, description="seconds a launch may take")
    default_ttl: float = Field(300.0, description="idle seconds before unload; <0 never")
    drain_timeout: float = Field(30.0, ge=0, description="grace for running calls on eviction")
    stop_timeout: float = Field(5.0, ge=0, description="SIGTERM → SIGKILL grace")
    health_interval: float = Field(0.02, gt=0, description="readiness poll interval, seconds")
    log_lines: int = Field(500, ge=10, description="lines kept per instance log")
    memory_budget: int | Literal["auto"] | None = Field(
        "auto",
        description="bytes model footprints may use: 'auto' = RAM (or cgroup limit) minus "
        "memory_headroom; a size like '16GiB'; 'none' to not enforce",
    )
    memory_headroom: int = Field(2 * 2**30, ge=0, description="RAM kept free for everything else")
    vram_budget: int | Literal["auto"] | None = Field(
        "auto",
        description="bytes of GPU memory for instances: 'auto' = total VRAM (NVML) minus "
        "vram_headroom per GPU, or not enforced where no GPU is found; a size; 'none'",
    )
    vram_headroom: int = Field(512 * 2**20, ge=0, description="VRAM kept free per GPU")
    remote_check_interval: float = Field(5.0, gt=0, description="seconds between remote checks")
    ready_check_interval: float = Field(
        5.0, gt=0, description="seconds between health checks of ready instances"
    )
    # Prompt caches that survive swaps (docs/scheduling.md, "Slot cache").
    slot_cache_size: int = Field(
        4 * 2**30, ge=0, description="bytes of saved llama-server slots kept on disk, least "
        "recently used dropped first; 0 turns saving and restoring off"
    )
    slot_cache_dir: Path | None = Field(
        None, description="where saved slots go; default: the cache directory's 'slots'"
    )
    # Models without writing config (docs/models.md).
    scan: tuple[Path, ...] = Field(
        (), description="directories whose GGUF files (plain, Hugging Face cache, LM Studio "
        "or Ollama store) are served as models"
    )
    scan_interval: float = Field(
        2.0, gt=0, description="seconds between looks for added or removed model files"
    )
    auto_pull: bool = Field(
        False, description="a call naming an unknown hf.co/{user}/{repo}[:quant] model "
        "downloads it first"
    )

    @field_validator(
        "memory_budget", "memory_headroom", "vram_budget", "vram_headroom", "slot_cache_size",
        mode="before",
    )
    @classmethod
    def _sizes(cls, value: object) -> object:
        if value in ("auto", None):
            return value
        if isinstance(value, str) and value.lower() in ("none", "off"):
            return None  # TOML has no null
        return parse_size(value)


# llama-server flags Corral sets itself, and the key to use instead. A second --port
# would silently win; --host 0.0.0.0 would expose a keyless child on every interface.
RESERVED_FLAGS = {
    "--host": "[server] host (children always bind to loopback)",
    "--port": "nothing (Corral picks a free port)",
    "-m": "path, package or hf_repo", "--model": "path, package or hf_repo",
    "-c": "ctx_size", "--ctx-size": "ctx_size",
    "-np": "parallel", "--parallel": "parallel",
    "-a": "the model's name and aliases", "--alias": "the model's name and aliases",
    "--api-key": "nothing (children are reached on loopback only)",
    "--api-key-file": "nothing (children are reached on loopback only)",
    "--slot-save-path": "nothing (Corral owns the slot cache)",
}


def _check_reserved(args: tuple[str, ...]) -> None:
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in RESERVED_FLAGS:
            raise ValueError(f"args: {arg!r} is set by Corral; use {RESERVED_FLAGS[flag]}")


class LlamaServerConfig(_Strict):
    binary: Path | None = Field(None, description="llama-server to run; else PATH, else cache")
    args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("args")
    @classmethod
    def _no_reserved(cls, args: tuple[str, ...]) -> tuple[str, ...]:
        _check_reserved(args)
        return args


class LoraAdapter(_Strict):
    path: Path = Field(description="a LoRA adapter GGUF")
    scale: float = Field(1.0, description="how strongly it applies (llama-server --lora-scaled)")


class ModelConfig(_Strict):
    name: str
    aliases: tuple[str, ...] = ()
    path: Path | None = Field(None, description="a local GGUF file")
    package: str | None = Field(
        None, description="a Python package that ships a GGUF and an assemble(path) function"
    )
    hf_repo: str | None = Field(
        None, description="a Hugging Face repo to download hf_file from on first use"
    )
    hf_file: str | None = Field(None, description="the GGUF file in hf_repo")
    hf_revision: str | None = Field(None, description="branch, tag or commit of hf_repo")
    ctx_size: int = Field(4096, ge=0, description="context per slot; 0 = the model's own")
    parallel: int = Field(1, ge=1, le=256, description="slots (llama-server --parallel)")
    n_gpu_layers: int | None = None
    threads: int | None = Field(None, ge=1)
    args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    ttl: float | None = Field(None, description="idle seconds before unload; <0 never")
    embedding: bool = False
    load_timeout: float | None = Field(None, gt=0)
    replicas: Replicas = Replicas()
    footprint: int | None = Field(
        None, ge=0, description="bytes one instance needs; default: GGUF size + KV cache estimate"
    )
    remotes: tuple[str | RemoteConfig, ...] = Field(
        (), description="OpenAI-compatible servers that also serve this model: base URLs "
        "or tables (url, api_key, model, headers ...; docs/engines.md)"
    )
    remote_slots: int = Field(8, ge=1, description="concurrent calls sent to each remote")
    fallbacks: tuple[str, ...] = Field(
        (), description="models to use, in order, when this one cannot be served"
    )
    # Upstream time limits (a call that trips one may be resent while its client has
    # received nothing; the instance is health-checked at once).
    connect_timeout: float = Field(10.0, gt=0, description="seconds to connect upstream")
    first_byte_timeout: float = Field(
        600.0, gt=0, description="seconds from sending a call to its first answer byte"
    )
    stall_timeout: float = Field(
        120.0, gt=0, description="seconds an answer may pause between two chunks"
    )
    rerank: bool = Field(False, description="a reranking model (llama-server --rerank)")
    capabilities: tuple[Capability, ...] | None = Field(
        None, description="what the model serves; default: derived from its GGUF and flags"
    )
    api: tuple[UpstreamApi, ...] | None = Field(
        None, description="API families its upstreams speak natively (others are translated "
        "to chat); default: everything llama-server speaks"
    )
    loading_feedback: Literal["comments", "visible", "off"] = Field(
        "comments", description="what a stream shows while its model loads or queues"
    )
    chat_template: str | None = Field(
        None, description="a Jinja chat template file, or the name of one Corral ships "
        "(gemma3) for a GGUF that has none"
    )
    evictable: bool = Field(
        True, description="false: pinned, one instance kept loaded from start, never "
        "evicted, preempted or expired"
    )
    priority: int = Field(
        0, description="higher runs first when models wait for room; preemption takes the "
        "lowest first"
    )
    slot_cache: bool = Field(
        True, description="save conversations' slots before an idle stop, restore them on "
        "the next launch (needs scheduler.slot_cache_size > 0)"
    )
    mmproj: str | None = Field(
        None, description="a vision/audio projector GGUF: a path, or a file in hf_repo"
    )
    lora: tuple[LoraAdapter, ...] = Field((), description="LoRA adapters: [{path, scale}]")
    origin: str = Field(
        "config", description="set by Corral, shown in listings: config, scan:<layout>, "
        "pulled, provider:<name>"
    )
    # Engines (docs/engines.md).
    runtime: str | None = Field(
        None, description="what launches it: llama-server (default), a built-in template "
        "(vllm, sglang, whisper-server, ollama) or a [runtimes.NAME] table"
    )
    upstream_model: str | None = Field(
        None, description="the name its runtime knows it by (${MODEL}, and the 'model' "
        "sent upstream); default: the model's name"
    )

    @field_validator("footprint", mode="before")
    @classmethod
    def _footprint_size(cls, value: object) -> object:
        return None if value is None else parse_size(value)

    @field_validator("remotes")
    @classmethod
    def _urls(cls, urls: tuple[str | RemoteConfig, ...]) -> tuple[str | RemoteConfig, ...]:
        for url in urls:
            if isinstance(url, str) and not re.match(r"^https?://[^/\s]+(/\S*)?$", url):
                raise ValueError(f"{url!r} is not an http(s) base URL")
        return tuple(u.rstrip("/") if isinstance(u, str) else u for u in urls)

    @property
    def local(self) -> bool:
        """Whether Corral launches this model itself (it has a file or a runtime)."""
        return (self.path is not None or self.package is not None or self.hf_repo is not None
                or self.runtime is not None)

    @property
    def has_file(self) -> bool:
        return self.path is not None or self.package is not None or self.hf_repo is not None

    def remote_configs(self) -> tuple[RemoteConfig, ...]:
        """``remotes`` with bare URLs as tables of defaults."""
        return tuple(RemoteConfig(url=u) if isinstance(u, str) else u for u in self.remotes)

    @field_validator("name", "aliases")
    @classmethod
    def _valid_names(cls, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
        for name in (value,) if isinstance(value, str) else value:
            if not _NAME_RE.match(name):
                raise ValueError(
                    f"{name!r} is not a valid model name (letters, digits and ._:/@+- only)"
                )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.hf_repo is None) != (self.hf_file is None):
            raise ValueError("'hf_repo' and 'hf_file' go together")
        sources = [k for k in ("path", "package", "hf_repo") if getattr(self, k) is not None]
        if len(sources) > 1:
            raise ValueError(f"set only one of 'path', 'package' or 'hf_repo' (got {sources})")
        if not sources and not self.remotes and self.runtime is None:
            raise ValueError(
                "set 'path', 'package' or 'hf_repo' (a local model), 'runtime' or 'remotes'"
            )
        _check_reserved(self.args)
        return self


_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


class KeyConfig(_Strict):
    """One ``[[keys]]`` entry: who may call, which models, how much (docs/keys.md)."""

    name: str = Field(description="shown in /admin/keys and metrics; never the key itself")
    key: str | None = Field(None, description="the key itself (or set key_sha256)")
    key_sha256: str | None = Field(
        None, description="hex SHA-256 of the key, so the config holds no secret"
    )
    models: tuple[str, ...] = Field(
        ("*",), description="model names, aliases or globs this key may see and call"
    )
    admin: bool = Field(False, description="may use /admin, /metrics and the dashboard")
    max_concurrent: int | None = Field(None, ge=1, description="calls in flight at once")
    requests_per_minute: int | None = Field(None, ge=1, description="calls per sliding minute")
    tokens_per_minute: int | None = Field(
        None, ge=1, description="prompt + completion tokens per sliding minute"
    )
    priority: int = Field(0, description="higher is served first from a model's queue")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not _NAME_RE.match(name):
            raise ValueError(f"{name!r} is not a valid key name (letters, digits and ._:/@+-)")
        return name

    @field_validator("key")
    @classmethod
    def _not_blank(cls, key: str | None) -> str | None:
        if key is not None and not key.strip():
            raise ValueError("a key must not be empty")
        return key

    @field_validator("key_sha256")
    @classmethod
    def _hex(cls, digest: str | None) -> str | None:
        if digest is not None and not _SHA256_RE.match(digest):
            raise ValueError("must be 64 hex digits (sha256sum of the key)")
        if digest is not None and digest.lower() == _EMPTY_SHA256:
            raise ValueError("is the SHA-256 of an empty key")
        return None if digest is None else digest.lower()

    @model_validator(mode="after")
    def _one_secret(self) -> KeyConfig:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("set exactly one of 'key' or 'key_sha256'")
        return self


class ClusterConfig(_Strict):
    """``[cluster]``: this Corral as a node of a cluster, or as a front that routes to
    nodes (docs/cluster.md). ``role = "none"`` (the default) is a single Corral."""

    role: Literal["none", "node", "front"] = "none"
    token: str = Field(
        "", description="shared secret: fronts send it, nodes require it (node API and calls)"
    )
    nodes: tuple[str, ...] = Field((), description="front: node base URLs (their OpenAI port)")
    discover: str | None = Field(
        None, description="front: 'dns:NAME:PORT', a headless Service's A/AAAA records"
    )
    resolv_conf: Path = Field(
        Path("/etc/resolv.conf"), description="front: resolver config for discover"
    )
    discover_interval: float = Field(5.0, gt=0, description="front: seconds between lookups")
    poll_interval: float = Field(1.0, gt=0, description="front: seconds between node polls")
    connect_timeout: float = Field(2.0, gt=0, description="front: seconds to connect to a node")
    first_byte_timeout: float = Field(
        600.0, gt=0, description="front: seconds from sending a call to its first byte"
    )
    stall_timeout: float = Field(
        120.0, gt=0, description="front: seconds an answer may pause between two chunks"
    )
    drain_settle: float = Field(
        3.0, ge=0, description="node: seconds a draining node keeps answering so that "
        "every front sees it draining"
    )

    @field_validator("nodes")
    @classmethod
    def _node_urls(cls, urls: tuple[str, ...]) -> tuple[str, ...]:
        for url in urls:
            if not re.match(r"^https?://[^/\s]+(/\S*)?$", url):
                raise ValueError(f"{url!r} is not an http(s) base URL")
        return tuple(u.rstrip("/") for u in urls)

    @field_validator("discover")
    @classmethod
    def _discover(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^dns:[A-Za-z0-9.-]+:\d{1,5}$", value):
            raise ValueError(f"{value!r}: use 'dns:NAME:PORT'")
        return value

    @model_validator(mode="after")
    def _roles(self) -> ClusterConfig:
        if self.role != "none" and len(self.token) < 16:
            raise ValueError(f"role {self.role!r} needs a token of at least 16 characters")
        if self.role == "front" and not self.nodes and self.discover is None:
            raise ValueError("role 'front' needs 'nodes' or 'discover'")
        if self.role != "front" and (self.nodes or self.discover):
            raise ValueError("'nodes' and 'discover' are for role 'front'")
        return self


class ScanDir(_Strict):
    """A ``[[scan]]`` table: a directory to discover models in, and what its models get."""

    path: Path
    ctx_size: int | None = Field(None, ge=0)
    parallel: int | None = Field(None, ge=1, le=256)
    ttl: float | None = None
    n_gpu_layers: int | None = None
    threads: int | None = Field(None, ge=1)
    args: tuple[str, ...] = ()

    @field_validator("args")
    @classmethod
    def _no_reserved(cls, args: tuple[str, ...]) -> tuple[str, ...]:
        _check_reserved(args)
        return args

    def defaults(self) -> dict[str, object]:
        """The ModelConfig keys this table sets for each model found under it."""
        keys = ("ctx_size", "parallel", "ttl", "n_gpu_layers", "threads")
        out: dict[str, object] = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        if self.args:
            out["args"] = self.args
        return out


class _Env(EnvSettingsSource):
    """The ``CORRAL_*`` environment, without ``CORRAL_LLAMA_SERVER``: that one is a
    path to a binary (scheduler/install.py), not the ``[llama_server]`` table, whose
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
        for m in self.models:
            for fb in m.fallbacks:
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
        names = [p.name for p in self.providers]
        if len(set(names)) != len(names):
            raise ValueError(f"providers: names must be unique (got {names})")
        self._check_keys()
        self._check_pinned()
        return self

    def credentials(self) -> set[str]:
        """Every credential the config holds or names, resolved: the server's
        api_keys, remote and provider keys (``SecretStr``, which dumps as
        ``**********``), the values of their ``api_key_env``, credential headers.
        What the log scrubber, /admin and `corral check` keep out (scheduler/secrets.py)."""
        remotes = [rc for m in self.models for rc in m.remote_configs()]
        return {*self.server.api_keys, *(k.key for k in self.keys if k.key),
                *secrets_of(remotes, self.providers)}

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


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def _parse_toml(path: Path, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
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
    def where(p: object) -> object:
        return str((base / Path(p).expanduser()).resolve()) if isinstance(p, str) else p

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
