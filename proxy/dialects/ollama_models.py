"""Ollama's model endpoints on port 11434: /api/tags, /api/ps, /api/show, /api/pull,
and /api/push, create, copy, delete and blobs, which Corral refuses (its models come
from corral.toml) but for deleting a pulled model. Also the request helpers every
Ollama handler uses: resolving a name (``x`` and ``x:latest`` both work),
``keep_alive``, ``stream``. The route table is ``proxy.dialects.ollama.setup``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.calls import context
from proxy.calls.modelinfo import MODEL_INFO, ModelInfoCache, capabilities
from proxy.calls.streaming import write_stream
from proxy.dialects import translate
from proxy.dialects.translate import tagged
from proxy.edge import body as bodies
from proxy.edge.reqlog import note_model
from proxy.keys import SCHEDULER
from proxy.ops import pulls
from scheduler.config.root import ModelConfig
from scheduler.errors import BadRequest, NotSupported, UnknownModel
from scheduler.process.instance import State
from scheduler.scheduling.scheduler import LeaseHints, Scheduler

# --- helpers ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    cfg: ModelConfig
    name: str  # the configured name or alias to lease
    display: str  # the tagged name echoed to the client


def resolve(scheduler: Scheduler, raw: str) -> Target:
    for name in translate.name_candidates(raw):
        try:
            cfg = scheduler.resolve(name)
        except UnknownModel:
            continue
        return Target(cfg, name, tagged(name))
    raise UnknownModel(raw, scheduler.names())


def configured_name(scheduler: Scheduler, raw: str) -> str:
    """The configured name an Ollama name stands for on the port's OpenAI-compatible
    routes: ``/api/tags`` lists ``x:latest``, and clients send back what it listed
    (Codex ``--oss`` checks its ``-m`` against that list, then calls ``/v1/responses``
    with it). An unknown name stays as sent, for the 404 to name it."""
    for name in translate.name_candidates(raw):
        try:
            scheduler.resolve(name)
        except UnknownModel:
            continue
        return name
    return raw


async def read_body(request: web.Request) -> dict[str, Any]:
    return await bodies.read_json(request)


def model_field(body: dict[str, Any]) -> str:
    # Older clients send "name" (show, pull, push, delete).
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest("model is required")
    return name


@dataclass(frozen=True, slots=True)
class KeepAlive:
    hints: LeaseHints
    unload: bool  # keep_alive 0 was asked for explicitly


def keep_alive(scheduler: Scheduler, target: Target, value: object,
               options: object = None) -> KeepAlive:
    """The lease hints of a call: its keep_alive, and the context its ``options.num_ctx``
    asks for (served by an instance with that much, as far as the model can have)."""
    keep = translate.keep_alive_seconds(value)
    ttl = scheduler.config.ttl(target.cfg) if keep is None else keep
    return KeepAlive(LeaseHints(keep_alive=ttl, want_ctx=translate.num_ctx(options)),
                     keep == 0)


def stream_flag(body: dict[str, Any]) -> bool:
    # Absent means true (a nil *bool in Ollama); only an explicit false turns it off.
    return body.get("stream") is not False


# --- models ----------------------------------------------------------------------------


async def tags(request: web.Request) -> web.Response:
    scheduler = request.app[SCHEDULER]
    names = scheduler.names()
    cfgs = {n: scheduler.resolve(n) for n in names}
    facts = await request.app[MODEL_INFO].many(list(cfgs.values()))
    models = []
    for name in names:
        f = facts[cfgs[name].name]
        models.append({
            "name": tagged(name),
            "model": tagged(name),
            "modified_at": translate.rfc3339(f.modified or None),
            "size": f.size,
            "digest": f.digest or translate.name_digest(cfgs[name].name),
            "details": f.details(),
        })
    return web.json_response({"models": models})


# Go's time.Duration tops out near 292 years; Ollama shows "forever" that far out.
_FOREVER_S = 292 * 365 * 86400


async def ps(request: web.Request) -> web.Response:
    scheduler = request.app[SCHEDULER]
    cache: ModelInfoCache = request.app[MODEL_INFO]
    now = time.time()
    entries: list[tuple[float, dict[str, Any]]] = []
    for inst in scheduler.instances():
        if inst.state not in (State.READY, State.DRAINING):
            continue
        cfg = scheduler.resolve(inst.model)
        if cfg.unlisted:
            continue  # callable, listed nowhere (docs/scheduling.md)
        f = await cache.get(cfg)
        ttl = scheduler.config.ttl(cfg) if inst.ttl_override is None else inst.ttl_override
        idle_s = inst.describe()["idle_seconds"]
        idle = 0.0 if inst.in_flight or not isinstance(idle_s, float) else idle_s
        expires = now + _FOREVER_S if ttl < 0 else now + max(0.0, ttl - idle)
        entries.append((expires, {
            "name": tagged(inst.model),
            "model": tagged(inst.model),
            "size": f.size,
            "digest": f.digest or translate.name_digest(cfg.name),
            "details": f.details(),
            "expires_at": translate.rfc3339(expires),
            # Unknown without parsing llama-server's log; 0 is true for CPU builds, and a
            # GPU offload is only claimed when the config asks for one.
            "size_vram": f.size if cfg.n_gpu_layers else 0,
            "context_length": inst.ctx or context.shown(scheduler, cfg, f.context_length),
        }))
    entries.sort(key=lambda e: e[0], reverse=True)
    return web.json_response({"models": [e[1] for e in entries]})


async def show(request: web.Request) -> web.Response:
    body = await read_body(request)
    target = resolve(request.app[SCHEDULER], model_field(body))
    cfg = target.cfg
    f = await request.app[MODEL_INFO].get(cfg)
    source = f.path or cfg.path or cfg.package
    ctx = context.shown(request.app[SCHEDULER], cfg, f.context_length)
    params = [f"num_ctx {ctx}"] if ctx else []
    return web.json_response({
        "license": f.license,
        "modelfile": f"# Modelfile generated by Corral\nFROM {source}\n",
        "parameters": "\n".join(params),
        "template": f.chat_template,
        "system": "",
        "details": f.details(),
        # Always present: ollama-python declares it without a default.
        "model_info": f.model_info,
        "capabilities": capabilities(cfg, f),
        "modified_at": translate.rfc3339(f.modified or None),
    })


async def pull(request: web.Request) -> web.StreamResponse:
    """``hf.co/...`` and configured hf_repo models are downloaded (proxy/ops/pulls.py);
    another configured model is "pulled" by making sure it loads."""
    body = await read_body(request)
    scheduler = request.app[SCHEDULER]
    download = pulls.downloadable(scheduler, model_field(body))
    if download is not None:
        return await pulls.respond(request, model_field(body), download, stream_flag(body))
    target = resolve(scheduler, model_field(body))
    hints = keep_alive(scheduler, target, body.get("keep_alive")).hints

    async def steps() -> AsyncGenerator[list[dict[str, Any]], None]:
        yield [{"status": "pulling manifest"}]
        async with scheduler.lease(target.name, hints) as up:
            note_model(up.model)
        yield [{"status": "verifying sha256 digest"}, {"status": "success"}]

    if stream_flag(body):
        return await write_stream(request, steps(), ndjson=True)
    async with contextlib.aclosing(steps()) as it:
        async for _ in it:
            pass
    return web.json_response({"status": "success"})


def _unsupported(what: str, instead: str) -> NotSupported:
    return NotSupported(f"{what} is not supported by Corral: {instead}")


async def push(request: web.Request) -> web.Response:
    raise _unsupported("pushing models", "models come from corral.toml")


async def create(request: web.Request) -> web.Response:
    raise _unsupported("creating models", "add a [[models]] entry to corral.toml")


async def copy(request: web.Request) -> web.Response:
    body = await read_body(request)
    source = body.get("source")
    if not isinstance(source, str) or not source:
        raise BadRequest("source is required")
    resolve(request.app[SCHEDULER], source)
    raise _unsupported("copying models", "add an alias to the model in corral.toml")


async def delete(request: web.Request) -> web.Response:
    body = await read_body(request)
    target = resolve(request.app[SCHEDULER], model_field(body))
    if target.cfg.origin == "pulled":
        await pulls.delete(request.app[SCHEDULER], target.cfg)
        return web.Response()
    if target.cfg.origin.startswith("scan:"):
        raise _unsupported("deleting scanned models", "remove its file from the scanned "
                           "directory; it stops being offered within scan_interval")
    raise _unsupported("deleting models", "remove the model from corral.toml")


async def blob_head(request: web.Request) -> web.Response:
    return web.Response(status=404)


async def blob_post(request: web.Request) -> web.Response:
    raise _unsupported("uploading blobs", "point a model's path at a GGUF file")
