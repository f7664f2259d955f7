"""llama-server argv and environment from a model config.

Corral owns the flags that wire an instance to it (model file, host, port, slots);
the model's ``args`` may add anything else and config validation rejects overrides
of the owned ones, because a second ``--port`` would silently win in llama-server.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path

from scheduler.config.models import AUTO_CTX_FLOOR, chat_template_file
from scheduler.config.root import CorralConfig, ModelConfig
from scheduler.process.instance import LaunchSpec

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A port the kernel just gave us. Another process could take it before the child
    binds; the child then exits at once and the launch fails fast with its log."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ctx_per_slot(model: ModelConfig) -> int:
    """The context per slot a model's config names; "auto" before the scheduler has
    planned it (scheduler/scheduling/contexts.py) is the floor it never goes below."""
    return model.ctx_size if isinstance(model.ctx_size, int) else AUTO_CTX_FLOOR


def build_argv(
    binary: Path, model: ModelConfig, model_file: Path, port: int,
    common_args: tuple[str, ...], ctx: int | None = None,
) -> list[str]:
    """``ctx``: tokens per slot this instance gets (default: the config's)."""
    ctx = ctx_per_slot(model) if ctx is None else ctx
    # -c is the total context across slots; ctx is per slot, as Ollama's num_ctx.
    argv = [
        str(binary),
        "-m", str(model_file),
        "--host", LOOPBACK,
        "--port", str(port),
        "--parallel", str(model.parallel),
        # Otherwise llama-server names the model by its file path in every answer.
        "--alias", model.name,
        "-c", str(ctx * model.parallel),
        "--no-webui",
        "--metrics",
    ]
    if model.embedding:
        argv.append("--embedding")
    if model.rerank:
        argv.append("--rerank")
    if model.chat_template:
        # Always the file flag: --chat-template NAME is template text under --jinja
        # (config validation refuses it in args: scheduler/config/models.py).
        argv += ["--chat-template-file", str(chat_template_file(model.chat_template))]
    if model.n_gpu_layers is not None:
        argv += ["-ngl", str(model.n_gpu_layers)]
    if model.threads is not None:
        argv += ["-t", str(model.threads)]
    argv += adapter_args(model)
    argv += common_args
    argv += model.args
    return argv


def adapter_args(model: ModelConfig) -> list[str]:
    """--mmproj and --lora/--lora-scaled. ``mmproj`` is a path by now: a projector in
    a Hugging Face repo was downloaded and substituted (sources.with_local_files)."""
    argv: list[str] = []
    if model.mmproj:
        argv += ["--mmproj", model.mmproj]
    for lora in model.lora:
        if lora.scale == 1.0:
            argv += ["--lora", str(lora.path)]
        else:
            argv += ["--lora-scaled", f"{lora.path}:{lora.scale:g}"]
    return argv


# Names that look like secrets: a child (and whatever it loads) must not inherit
# Corral's API keys or the operator's cloud tokens. HF_TOKEN goes too; a model that
# needs it sets it in its own env.
_SECRET_RE = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


def child_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """Corral's environment minus ``CORRAL_*`` and secret-looking names; what a
    config's ``env`` sets explicitly is added back by the caller."""
    return {k: v for k, v in environ.items()
            if not k.upper().startswith("CORRAL_") and not _SECRET_RE.search(k)}


def build_spec(
    cfg: CorralConfig,
    model: ModelConfig,
    binary: Path,
    model_file: Path,
    port: int | None = None,
    ctx: int | None = None,
) -> LaunchSpec:
    port = free_port() if port is None else port
    env = {**child_environ(os.environ), **cfg.llama_server.env, **model.env}
    return LaunchSpec(
        model=model.name,
        argv=build_argv(binary, model, model_file, port, cfg.llama_server.args, ctx),
        env=env,
        host=LOOPBACK,
        port=port,
        slots=model.parallel,
        load_timeout=model.load_timeout or cfg.scheduler.load_timeout,
        health_interval=cfg.scheduler.health_interval,
    )
