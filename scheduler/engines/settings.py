"""The config tables of engines: ``[runtimes.NAME]``, remote tables, ``[[providers]]``.

They live apart from ``scheduler/config/root.py`` (which imports them) so that the engine
keys and their checks read in one place. Secrets (``api_key``) are ``SecretStr``:
their ``repr`` and every JSON dump (``/admin/config``) show ``**********``, so a key
cannot reach a log or an answer by a stray format string. ``api_key_env`` names a
variable read when the config is loaded or reloaded (``env_key``); a variable that
is not set is a config error, not a silent call without a key.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Literal, Self
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from scheduler.config.secrets import SECRET_HEADER

# The API families an upstream speaks natively (a model's, a runtime's, a remote's
# `api`). A client's family that its upstream lacks is translated to chat completions
# and back (proxy/dialects/families/). None means "all that llama-server speaks". Re-exported by
# scheduler.config.root.
UpstreamApi = Literal[
    "chat", "completions", "embeddings", "responses", "messages", "rerank",
    "transcriptions", "translations", "speech", "images", "sdapi", "native",
]

_URL_RE = re.compile(r"^https?://[^/\s]+(/\S*)?$")
_HEADER_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PLACEHOLDER_RE = re.compile(r"\$\{([A-Za-z_]+)\}")
PLACEHOLDERS = frozenset(
    {"PORT", "HOST", "MODEL_PATH", "MODEL", "SLOTS", "CTX_SIZE", "GPU_LAYERS", "ARGS"}
)


def _check_placeholders(where: str, text: str, whole_args: bool) -> None:
    for name in PLACEHOLDER_RE.findall(text):
        if name not in PLACEHOLDERS:
            raise ValueError(f"{where}: unknown placeholder ${{{name}}} (known: "
                             f"{', '.join('${' + p + '}' for p in sorted(PLACEHOLDERS))})")
        if name == "ARGS" and not (whole_args and text == "${ARGS}"):
            raise ValueError(f"{where}: ${{ARGS}} must be an element of its own")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_url(url: str) -> str:
    if not _URL_RE.match(url):
        raise ValueError(f"{url!r} is not an http(s) base URL")
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        # Paths are appended to it; a key in a query string would also be shown.
        raise ValueError(f"{shown(url)!r}: a base URL takes no query string or fragment "
                         "(a key goes in api_key or headers)")
    return url.rstrip("/")


def shown(url: str) -> str:
    """The URL without user:password or query, for messages."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1], query=""))


def _check_headers(headers: dict[str, str]) -> dict[str, str]:
    for name, value in headers.items():
        if not _HEADER_RE.match(name) or "\n" in value or "\r" in value:
            raise ValueError(f"header {name!r}: not a valid header name or value")
    return headers


class HealthCheck(_Strict):
    """How a launched runtime shows it is ready: a GET of ``path`` answering
    ``status``, or (``path = "tcp"``) a port that accepts connections."""

    path: str = "/health"
    status: int = Field(200, ge=100, le=599)

    @field_validator("path")
    @classmethod
    def _path(cls, path: str) -> str:
        if path != "tcp" and not path.startswith("/"):
            raise ValueError(f"{path!r} must be a path starting with '/' or \"tcp\"")
        return path


class RuntimeConfig(_Strict):
    """``[runtimes.NAME]``: a server command Corral launches per instance.

    Without ``command``, it is llama-server (or a built-in ``template``) with another
    ``binary``. Set keys override the template's; see docs/engines.md.
    """

    template: str | None = Field(
        None, description="a built-in runtime to start from (vllm, sglang, ollama, ...)"
    )
    command: tuple[str, ...] | None = Field(
        None, description="argv with ${PORT} ${HOST} ${MODEL_PATH} ${MODEL} ${SLOTS} "
        "${CTX_SIZE} ${GPU_LAYERS} ${ARGS} substituted; never run through a shell"
    )
    binary: Path | None = Field(None, description="replaces the command's first element")
    health: HealthCheck | None = Field(None, description="readiness: a path (and status) or tcp")
    ready_timeout: float | None = Field(None, gt=0, description="seconds a launch may take")
    stop_signal: str | None = Field(None, description="signal that asks it to stop")
    env: dict[str, str] = Field(default_factory=dict)
    api: tuple[UpstreamApi, ...] | None = Field(
        None, description="API families it speaks natively; None: llama-server's"
    )

    @field_validator("health", mode="before")
    @classmethod
    def _health_shorthand(cls, value: object) -> object:
        return {"path": value} if isinstance(value, str) else value

    @field_validator("command")
    @classmethod
    def _argv(cls, argv: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if argv is not None and (not argv or not argv[0]):
            raise ValueError("command must be a non-empty list whose first element is a program")
        for item in argv or ():
            _check_placeholders("command", item, whole_args=True)
        return argv

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str]) -> dict[str, str]:
        for name, value in env.items():
            _check_placeholders(f"env.{name}", value, whole_args=False)
        return env

    @field_validator("stop_signal")
    @classmethod
    def _signal(cls, name: str | None) -> str | None:
        if name is None:
            return None
        full = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
        if not hasattr(signal.Signals, full) or full in ("SIGKILL", "SIGSTOP"):
            raise ValueError(f"{name!r} is not a signal a server can be asked to stop with")
        return full


class _Endpoint(_Strict):
    """What a remote and a provider share: where the server is, how to authenticate
    to it and how far to trust its TLS."""

    url: str = Field(description="base URL: http://host:port, or an API base such as "
                     "https://api.openai.com/v1 whose path replaces /v1")
    api_key: SecretStr | None = Field(None, description="sent as 'Authorization: Bearer'")
    api_key_env: str | None = Field(None, description="environment variable holding the key")
    # repr=False: a key given as a header must not reach a log line through repr().
    headers: dict[str, str] = Field(default_factory=dict, repr=False,
                                    description="extra request headers")
    tls_verify: bool = True
    ca_file: Path | None = Field(None, description="CA bundle that signs the server's cert")
    timeout: float | None = Field(
        None, gt=0, description="seconds to the first byte (default: the model's)"
    )

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        return _check_url(url)

    @field_validator("headers")
    @classmethod
    def _headers(cls, headers: dict[str, str]) -> dict[str, str]:
        return _check_headers(headers)

    @model_validator(mode="after")
    def _one_key(self) -> Self:
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("set 'api_key' or 'api_key_env', not both")
        if self.api_key_env is not None:
            if not _ENV_RE.match(self.api_key_env):
                raise ValueError(f"api_key_env: {self.api_key_env!r} is not a variable name")
            if not os.environ.get(self.api_key_env):
                raise ValueError(
                    f"api_key_env: environment variable {self.api_key_env} is not set")
        if any(k.lower() == "authorization" for k in self.headers) and (
            self.api_key is not None or self.api_key_env is not None
        ):
            raise ValueError("an 'Authorization' header and an API key: set only one")
        return self


class RemoteConfig(_Endpoint):
    """One remote server of a model (a table in ``remotes``; a bare URL string is the
    same with every other key at its default)."""

    model: str | None = Field(None, description="the name the remote expects in 'model'")
    weight: float = Field(1.0, gt=0, description="share of calls against other upstreams")
    slots: int | None = Field(None, ge=1, description="concurrent calls (default remote_slots)")
    health: Literal["auto", "/health", "/v1/models", "none"] = Field(
        "auto", description="auto: /health, then /v1/models; none: learn from real calls"
    )
    cooldown: float = Field(30.0, ge=0, description="seconds out of rotation after a failure "
                            "(health = none)")
    api: tuple[UpstreamApi, ...] | None = Field(
        None, description="API families it speaks natively; None: llama-server's"
    )
    passthrough: bool = Field(
        False, description="allow raw /upstream/{model}/ calls to this remote (its key goes "
        "with them)"
    )


def env_key(cfg: _Endpoint) -> str | None:
    """The key to send: ``api_key``, or ``api_key_env`` read now (load or reload)."""
    if cfg.api_key is not None:
        return cfg.api_key.get_secret_value()
    if cfg.api_key_env is not None:
        return os.environ.get(cfg.api_key_env) or None
    return None


class ProviderConfig(_Endpoint):
    """``[[providers]]``: a server hosting many models, declared once. Its
    ``/v1/models`` is read at start and every ``refresh`` seconds."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    models: Literal["*"] | tuple[str, ...] = Field(
        "*", description='"*" for every model it lists, or the ids to offer'
    )
    prefix: str = Field("", description="put before each id to make Corral's name ('cloud/')")
    refresh: float = Field(60.0, gt=0, description="seconds between listings")
    slots: int = Field(8, ge=1, description="concurrent calls per model")
    cooldown: float = Field(30.0, ge=0, description="seconds a model sits out after a "
                            "failed call")
    api: tuple[UpstreamApi, ...] | None = None


def provider_may_offer(providers: tuple[ProviderConfig, ...], name: str) -> bool:
    """Whether a provider can list a model of this name (a fallback may name one):
    one of its listed ``models``, or any name under its non-empty ``prefix``."""
    for p in providers:
        if p.models != "*":
            if name in {p.prefix + i for i in p.models}:
                return True
        elif p.prefix and name.startswith(p.prefix):
            return True
    return False


def secrets_of(remotes: list[RemoteConfig], providers: tuple[ProviderConfig, ...]) -> set[str]:
    """Every key these tables send, resolved: what redaction must hide."""
    out: set[str] = set()
    tables: list[RemoteConfig | ProviderConfig] = [*remotes, *providers]
    for rc in tables:
        key = env_key(rc)
        if key:
            out.add(key)
        for name, value in rc.headers.items():
            if SECRET_HEADER.search(name) and value:
                out.add(value)
    return out
