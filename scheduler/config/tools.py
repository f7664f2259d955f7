"""``[[mcp_servers]]`` and ``[mcp]``: the MCP servers Corral may call for a client, and
the bounds of the tool loop (docs/tools.md).

A server is either a ``command`` (an argv list started without a shell, speaking MCP
over stdio) or a ``url`` (MCP's streamable HTTP). Clients name a server by ``name``
only: no call can make Corral run or connect to anything the file does not name.
Nothing here is writable over HTTP (scheduler/config/writable.py refuses both tables).
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from scheduler.config.base import _Strict

# A server's name is also the prefix of its tools' names as the model sees them
# ("NAME__TOOL"): chat tool names allow letters, digits, "_" and "-".
_SERVER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,47}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class McpServerConfig(_Strict):
    """One ``[[mcp_servers]]`` entry."""

    name: str = Field(description="what clients name it by (letters, digits, _ and -)")
    command: tuple[str, ...] | None = Field(
        None, description="stdio server: program and arguments, run without a shell")
    env: dict[str, str] = Field(
        default_factory=dict, description="stdio server: environment added to Corral's")
    url: str | None = Field(None, description="streamable HTTP server: its endpoint URL")
    headers: dict[str, str] = Field(
        default_factory=dict, description="HTTP server: headers sent with every message")
    api_key_env: str | None = Field(
        None, description="HTTP server: environment variable whose value is sent as "
        "'Authorization: Bearer ...'")
    allowed_tools: tuple[str, ...] | None = Field(
        None, description="the tools offered to models (none: every tool it lists)")
    models: tuple[str, ...] = Field(
        ("*",), description="model names or globs whose calls may use it")
    require_approval: Literal["never", "always"] = Field(
        "never", description="Responses and LM Studio calls: ask the client before a call")
    call_timeout: float = Field(60.0, gt=0, description="seconds one tool call may take")
    start_timeout: float = Field(
        30.0, gt=0, description="seconds to start and initialize the server")
    idle_stop: float = Field(300.0, gt=0, description="seconds unused before it is stopped")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not _SERVER_NAME_RE.match(name):
            raise ValueError(f"{name!r} is not a valid MCP server name (letters, digits, "
                             "_ and -, at most 48)")
        return name

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{url!r} is not an http(s) URL")
        return url

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, name: str | None) -> str | None:
        if name is not None and not _ENV_NAME_RE.match(name):
            raise ValueError(f"{name!r} is not an environment variable name")
        return name

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerConfig:
        if (self.command is None) == (self.url is None):
            raise ValueError(f"mcp server {self.name!r}: set exactly one of 'command' "
                             "(stdio) or 'url' (streamable HTTP)")
        if self.command is not None and (not self.command or not self.command[0]):
            raise ValueError(f"mcp server {self.name!r}: 'command' must name a program")
        if self.command is not None and (self.headers or self.api_key_env):
            raise ValueError(f"mcp server {self.name!r}: 'headers' and 'api_key_env' are "
                             "for a 'url' server")
        if self.url is not None and self.env:
            raise ValueError(f"mcp server {self.name!r}: 'env' is for a 'command' server")
        return self


class McpConfig(_Strict):
    """``[mcp]``: the bounds of one call's tool loop, whatever its family."""

    max_steps: int = Field(
        8, ge=1, le=100, description="model turns per call (each may call tools)")
    max_seconds: float = Field(300.0, gt=0, description="seconds one call's loop may take")
    max_tokens: int | None = Field(
        None, ge=1, description="completion tokens over all of a call's turns")
    max_result_chars: int = Field(
        32_000, ge=256, description="a tool result longer than this is cut for the model")


def check_unique(servers: tuple[McpServerConfig, ...]) -> None:
    names = [s.name for s in servers]
    if len(set(names)) != len(names):
        raise ValueError(f"mcp_servers: names must be unique (got {names})")
