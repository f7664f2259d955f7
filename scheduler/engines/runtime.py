"""A runtime's launch: its argv and environment from a model config.

Placeholders are replaced inside each argv element, never by a shell: a model name or
a path with spaces, quotes or ``;`` stays one argument and runs nothing. ``${ARGS}``
must be an element of its own; it becomes the model's ``args``, one element each.

    ${PORT} ${HOST}   where the child must listen (a free loopback port)
    ${MODEL_PATH}     the model's file (path, package or hf_repo), materialised
    ${MODEL}          upstream_model, else the model's name
    ${SLOTS}          parallel          ${CTX_SIZE}  ctx_size (per slot)
    ${GPU_LAYERS}     n_gpu_layers, else 999 (every layer)
    ${ARGS}           the model's args

The result is the same ``LaunchSpec`` llama-server gets, so every runtime has the
same process discipline (instance.py): process group, PR_SET_PDEATHSIG, log ring,
readiness raced against exit and deadline, stop signal → grace → SIGKILL.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from scheduler.config.models import AUTO_CTX_FLOOR
from scheduler.config.root import CorralConfig, ModelConfig
from scheduler.engines.remote import shown_url
from scheduler.engines.settings import PLACEHOLDER_RE
from scheduler.engines.templates import Runtime, resolve_runtime
from scheduler.errors import LoadFailed
from scheduler.process.instance import LaunchSpec
from scheduler.process.launcher import LOOPBACK, child_environ, free_port

ALL_LAYERS = "999"


def variables(model: ModelConfig, port: int, model_file: Path | None) -> dict[str, str]:
    return {
        "PORT": str(port),
        "HOST": LOOPBACK,
        "MODEL_PATH": str(model_file) if model_file is not None else "",
        "MODEL": model.upstream_model or model.name,
        "SLOTS": str(model.parallel),
        # A number by now: the scheduler launches with the context it planned.
        "CTX_SIZE": str(model.ctx_size if isinstance(model.ctx_size, int) else AUTO_CTX_FLOOR),
        "GPU_LAYERS": str(model.n_gpu_layers) if model.n_gpu_layers is not None else ALL_LAYERS,
    }


def fill(text: str, values: Mapping[str, str]) -> str:
    # Unknown names were refused when the config was validated.
    return PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], text)


def substitute(
    command: Sequence[str], values: Mapping[str, str], args: Sequence[str]
) -> list[str]:
    argv: list[str] = []
    for item in command:
        if item == "${ARGS}":
            argv.extend(args)
        else:
            argv.append(fill(item, values))
    return argv


def uses(runtime: Runtime, name: str) -> bool:
    """Whether the runtime's command or env mentions ``${name}``."""
    token = "${" + name + "}"
    return any(token in s for s in (*(runtime.command or ()), *runtime.env.values()))


def build_runtime_spec(
    cfg: CorralConfig,
    model: ModelConfig,
    runtime: Runtime,
    model_file: Path | None,
    port: int | None = None,
) -> LaunchSpec:
    """The launch of a command runtime (``runtime.command`` is set)."""
    assert runtime.command is not None
    if model_file is None and uses(runtime, "MODEL_PATH"):
        raise LoadFailed(model.name, f"runtime {runtime.name!r} needs ${{MODEL_PATH}}: set "
                         "'path', 'package' or 'hf_repo'")
    port = free_port() if port is None else port
    values = variables(model, port, model_file)
    command = list(runtime.command)
    if runtime.binary is not None:
        command[0] = str(runtime.binary)
    env = {**child_environ(os.environ),
           **{k: fill(v, values) for k, v in runtime.env.items()},
           **model.env}
    rename = values["MODEL"] if values["MODEL"] != model.name else None
    return LaunchSpec(
        model=model.name,
        argv=substitute(command, values, model.args),
        env=env,
        host=LOOPBACK,
        port=port,
        slots=model.parallel,
        load_timeout=model.load_timeout or runtime.ready_timeout or cfg.scheduler.load_timeout,
        health_interval=cfg.scheduler.health_interval,
        engine=runtime.program,
        health_path=runtime.health.path,
        health_status=runtime.health.status,
        stop_signal=runtime.stop_signal,
        upstream_model=rename,
        apis=runtime.api,
    )


def with_runtime(spec: LaunchSpec, cfg: CorralConfig, model: ModelConfig,
                 runtime: Runtime) -> LaunchSpec:
    """llama-server's own spec under a ``[runtimes.NAME]`` table (another binary):
    the table's env, deadline, health and signal apply; the model's env still wins."""
    if runtime.name == "llama-server" and not runtime.env and runtime.binary is None:
        return spec
    values = variables(model, spec.port, None)
    env = {**child_environ(os.environ), **cfg.llama_server.env,
           **{k: fill(v, values) for k, v in runtime.env.items()}, **model.env}
    return dataclasses.replace(
        spec,
        env=env,
        load_timeout=model.load_timeout or runtime.ready_timeout or spec.load_timeout,
        engine=runtime.program,
        health_path=runtime.health.path,
        health_status=runtime.health.status,
        stop_signal=runtime.stop_signal,
        apis=runtime.api,
    )



def engine_problems(cfg: CorralConfig) -> list[str]:
    """What `corral check` reports about engines: a runtime's program that cannot be
    found, a CA file that does not exist. Never a key."""
    problems = []
    for m in cfg.models:
        if m.runtime is not None:
            rt = resolve_runtime(m.runtime, cfg.runtimes)
            program = str(rt.binary) if rt.binary is not None else (
                rt.command[0] if rt.command is not None else None)
            if program is not None and shutil.which(program) is None:
                problems.append(f"model {m.name!r}: runtime {rt.name!r}: {program} is not "
                                "an executable file or on PATH")
        for rc in m.remote_configs():
            if rc.ca_file is not None and not rc.ca_file.is_file():
                problems.append(f"model {m.name!r}: remotes: ca_file {rc.ca_file} "
                                "does not exist")
    for p in cfg.providers:
        if p.ca_file is not None and not p.ca_file.is_file():
            problems.append(f"providers.{p.name}: ca_file {p.ca_file} does not exist")
    return problems


def describe_source(model: ModelConfig) -> str:
    """One line on where a model is served from, for `corral models` (no keys)."""
    parts = []
    if model.runtime is not None:
        parts.append(f"runtime {model.runtime}")
    if model.path is not None:
        parts.append(str(model.path))
    elif model.package is not None:
        parts.append(f"package {model.package}")
    elif model.hf_repo is not None:
        parts.append(f"hf {model.hf_repo}/{model.hf_file}")
    parts += [f"remote {shown_url(rc.url)}" for rc in model.remote_configs()]
    return ", ".join(parts)
