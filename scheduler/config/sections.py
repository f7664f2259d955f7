"""The other tables of the main file: ``[server]``, ``[scheduler]``, ``[[keys]]``,
``[cluster]`` and ``[[scan]]``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from scheduler.config.base import _NAME_RE, _Strict, parse_size
from scheduler.config.models import check_args, check_ctx


class CaptureConfig(_Strict):
    """``[server.capture]``: what each model-routed call sent and got, kept for the
    operator (docs/admin-api.md, "Captures"). Off while ``memory`` is 0."""

    memory: int = Field(0, description="bytes of captured calls kept in memory, oldest "
                        "dropped first; 0 = off")
    body_limit: int = Field(256 * 2**10, description="bytes kept of each body and answer; "
                            "the rest is cut with a marker")
    dir: Path | None = Field(None, description="also write each finished capture here")
    dir_max: int = Field(1 * 2**30, description="bytes kept in dir, oldest deleted first")
    exclude_keys: tuple[str, ...] = Field(
        (), description="[[keys]] names whose calls are never captured")
    redact_headers: tuple[str, ...] = Field(
        (), description="request headers hidden besides Authorization, X-Api-Key, Cookie "
        "and the remotes' own")

    @field_validator("memory", "body_limit", "dir_max", mode="before")
    @classmethod
    def _sizes(cls, value: object) -> int:
        return parse_size(value)

    @property
    def enabled(self) -> bool:
        return self.memory > 0


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
    gc_threshold: int = Field(
        50_000, ge=0, description="young-generation collection threshold after start-up "
        "(Python's own: 700; 0 keeps it)"
    )
    workers: int | Literal["auto"] = Field(
        1, description='processes relaying calls ("auto": one per core); one owns the state'
    )
    capture: CaptureConfig = Field(
        default_factory=CaptureConfig, description="keep calls' bodies, answers and timings "
        "for /admin/requests (off by default)")

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
    max_ctx: int = Field(
        32768, ge=256, description="the most context per slot that ctx_size = 'auto' gives "
        "a model (its training context and the memory budget cap it further)"
    )
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
    mcp_servers: tuple[str, ...] = Field(
        ("*",), description="[[mcp_servers]] names or globs this key's calls may use")

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
    ctx_size: int | Literal["auto"] | None = None
    parallel: int | None = Field(None, ge=1, le=256)
    ttl: float | None = None
    n_gpu_layers: int | None = None
    threads: int | None = Field(None, ge=1)
    args: tuple[str, ...] = ()

    @field_validator("args")
    @classmethod
    def _no_reserved(cls, args: tuple[str, ...]) -> tuple[str, ...]:
        check_args(args)
        return args

    @field_validator("ctx_size", mode="before")
    @classmethod
    def _ctx(cls, value: object) -> object:
        return None if value is None else check_ctx(value)

    def defaults(self) -> dict[str, object]:
        """The ModelConfig keys this table sets for each model found under it."""
        keys = ("ctx_size", "parallel", "ttl", "n_gpu_layers", "threads")
        out: dict[str, object] = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        if self.args:
            out["args"] = self.args
        return out
