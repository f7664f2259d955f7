"""Built-in runtimes: the exact command line each starts (docs/engines.md shows them).

A template is a ``RuntimeConfig`` like a ``[runtimes.NAME]`` table; a table of the
same name, or one with ``template = NAME``, overrides the keys it sets. Each starts
one server per instance, bound to loopback on the port Corral picked, serving the
model under ``${MODEL}`` (the model's ``upstream_model``, else its name), so the name
a client sends is rewritten to it only where they differ.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from scheduler.engines.settings import HealthCheck, RuntimeConfig

LLAMA_SERVER = "llama-server"

BUILTINS: dict[str, RuntimeConfig] = {
    # llama.cpp's server: Corral's own argv (launcher.build_argv); a table with
    # `binary` runs another build of it (ik_llama.cpp, a CUDA build).
    LLAMA_SERVER: RuntimeConfig(),
    # vLLM's OpenAI server. It checks the body's model against --served-model-name.
    "vllm": RuntimeConfig(
        command=("vllm", "serve", "${MODEL}", "--host", "${HOST}", "--port", "${PORT}",
                 "--served-model-name", "${MODEL}", "--max-num-seqs", "${SLOTS}", "${ARGS}"),
        health=HealthCheck(path="/health"),
        ready_timeout=900.0,
        api=("chat", "completions", "embeddings", "responses"),
    ),
    "sglang": RuntimeConfig(
        command=("python3", "-m", "sglang.launch_server", "--model-path", "${MODEL}",
                 "--host", "${HOST}", "--port", "${PORT}", "--served-model-name", "${MODEL}",
                 "--max-running-requests", "${SLOTS}", "${ARGS}"),
        health=HealthCheck(path="/health"),
        ready_timeout=900.0,
        api=("chat", "completions", "embeddings"),
    ),
    # whisper.cpp's server: loads the model before it listens, so an open port
    # means ready; its inference route is moved to OpenAI's path.
    "whisper-server": RuntimeConfig(
        command=("whisper-server", "-m", "${MODEL_PATH}", "--host", "${HOST}",
                 "--port", "${PORT}", "--inference-path", "/v1/audio/transcriptions",
                 "${ARGS}"),
        health=HealthCheck(path="tcp"),
        api=("transcriptions",),
    ),
    # stable-diffusion.cpp's server: OpenAI's image routes and stable-diffusion WebUI's
    # /sdapi/v1/*. It loads the model before it listens and answers GET / once up.
    # One generation at a time (it holds a lock around the model), so one slot.
    "sd-server": RuntimeConfig(
        command=("sd-server", "-m", "${MODEL_PATH}", "--listen-ip", "${HOST}",
                 "--listen-port", "${PORT}", "${ARGS}"),
        health=HealthCheck(path="/"),
        api=("images", "sdapi"),
    ),
    # Kokoro-FastAPI (remsky/Kokoro-FastAPI), the OpenAI-compatible TTS server most
    # local setups run: /v1/audio/speech (streamed, stream_format sse) and
    # /v1/audio/voices. A uvicorn app; `args = ["--app-dir", "/path/to/Kokoro-FastAPI"]`
    # says where its source is. It knows its model as "kokoro" (upstream_model).
    "kokoro": RuntimeConfig(
        command=("uvicorn", "api.src.main:app", "--host", "${HOST}", "--port", "${PORT}",
                 "${ARGS}"),
        health=HealthCheck(path="/health"),
        ready_timeout=300.0,
        api=("speech",),
    ),
    # One `ollama serve` per instance, on its own port; models are addressed by their
    # Ollama name (upstream_model = "llama3.2:1b") and must have been pulled.
    "ollama": RuntimeConfig(
        command=("ollama", "serve"),
        env={"OLLAMA_HOST": "${HOST}:${PORT}", "OLLAMA_NUM_PARALLEL": "${SLOTS}",
             "OLLAMA_CONTEXT_LENGTH": "${CTX_SIZE}"},
        health=HealthCheck(path="/api/version"),
        api=("chat", "completions", "embeddings"),
    ),
}


@dataclass(frozen=True, slots=True)
class Runtime:
    """A runtime with its template applied: what a launch needs to know."""

    name: str
    # None: llama-server's argv, built by the launcher from the model's keys.
    command: tuple[str, ...] | None
    binary: Path | None
    health: HealthCheck
    ready_timeout: float | None
    stop_signal: signal.Signals
    env: Mapping[str, str]
    api: frozenset[str] | None

    @property
    def llama_server(self) -> bool:
        return self.command is None

    @property
    def program(self) -> str:
        """What log lines and errors call it."""
        if self.binary is not None:
            return self.binary.name
        return LLAMA_SERVER if self.command is None else Path(self.command[0]).name


def resolve_runtime(name: str | None, tables: Mapping[str, RuntimeConfig]) -> Runtime:
    """The runtime a model names (None: llama-server), its table's keys over its
    template's. Raises KeyError for a name that is neither (config validation
    refuses those first)."""
    name = name or LLAMA_SERVER
    table = tables.get(name)
    base_name = (table.template if table is not None else None) or (
        name if name in BUILTINS else LLAMA_SERVER
    )
    if table is None and name not in BUILTINS:
        raise KeyError(name)
    merged = BUILTINS[base_name]
    if table is not None:
        # A table that sets its own command is not llama-server any more.
        changes = {k: getattr(table, k) for k in table.model_fields_set if k != "template"}
        if "env" in changes:
            changes["env"] = {**merged.env, **table.env}
        merged = merged.model_copy(update=changes)
    return Runtime(
        name=name,
        command=merged.command,
        binary=merged.binary,
        health=merged.health or HealthCheck(),
        ready_timeout=merged.ready_timeout,
        stop_signal=signal.Signals[merged.stop_signal or "SIGTERM"],
        env=dict(merged.env),
        api=frozenset(merged.api) if merged.api is not None else None,
    )
