"""LM Studio routes (port 1234). See docs/compatibility.md.

``/v1`` is the OpenAI pass-through, plus LM Studio's ``ttl`` field (idle seconds
before the model is unloaded). ``/api/v0`` answers the same calls with LM Studio's
``stats``, ``model_info`` and ``runtime`` added (on the chunk that carries the
timings when streaming, which is llama-server's last). ``/api/v1/models`` and its
load/unload map to the scheduler. LM Studio's SDK protocol (websockets behind
``/lmstudio-greeting``) lives in ``proxy.dialects.lmstudio_sdk``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
from aiohttp import web

from proxy.calls import context, routes, upstream
from proxy.calls import vision as images
from proxy.calls.call import Call, Client
from proxy.calls.modelinfo import (
    MODEL_INFO,
    ModelFacts,
    ModelInfoCache,
    bits_per_weight,
    embedding,
    vision,
)
from proxy.calls.streaming import upstream_batches, write_stream
from proxy.dialects import lmstudio_chat, lmstudio_sdk, openai, stream_translate, translate
from proxy.dialects.translate import upstream_error_body
from proxy.edge import body as bodies
from proxy.edge import jsonc
from proxy.edge.reqlog import note_model
from proxy.keys import SCHEDULER
from scheduler.config.root import Capability, ModelConfig
from scheduler.errors import BadRequest, NotFound, UnknownModel
from scheduler.process.instance import State
from scheduler.scheduling.scheduler import LeaseHints, Scheduler, Upstream


def ttl_of(ttl: object) -> float | None:
    """LM Studio's ``ttl``: idle seconds before unload; negative keeps it loaded."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise BadRequest("'ttl' must be a number of seconds")
    if ttl != ttl:  # NaN
        raise BadRequest("'ttl' must be a number of seconds")
    # Beyond ~292 years (or inf) is forever, as a negative value.
    return -1.0 if ttl < 0 or ttl > translate.MAX_KEEP_ALIVE else float(ttl)


def hints_for(scheduler: Scheduler, model: str, head: jsonc.Head) -> LeaseHints | None:
    """The lease hints of an LM Studio call: its ``ttl`` and its chain of prefixes."""
    ttl = ttl_of(head.ttl)
    chain = head.chain() if scheduler.balanced(model) else ()
    if ttl is None and not chain:
        return None
    return LeaseHints(chain=chain, keep_alive=ttl)


# --- /api/v0 ------------------------------------------------------------------------------


def model_info(cfg: ModelConfig, facts: ModelFacts, ctx: int) -> dict[str, Any]:
    return {
        "arch": facts.architecture or "unknown",
        "quant": facts.quantization or "unknown",
        "format": "gguf",
        "context_length": ctx,
    }


def runtime(fingerprint: object) -> dict[str, Any]:
    # llama-server's system_fingerprint is its build ("b6000-abc123").
    return {
        "name": "llama.cpp-corral",
        "version": fingerprint if isinstance(fingerprint, str) else "unknown",
        "supported_formats": ["gguf"],
    }


def _finish_reason(event: dict[str, Any]) -> str | None:
    choices = event.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        reason = choices[0].get("finish_reason")
        return reason if isinstance(reason, str) else None
    return None


async def _v0_chunks(
    batches: AsyncGenerator[list[dict[str, Any]], None], info: dict[str, Any]
) -> AsyncGenerator[list[dict[str, Any]], None]:
    finish: str | None = None
    last: dict[str, Any] = {}
    extras_sent = False
    async with contextlib.aclosing(batches):
        async for batch in batches:
            for event in batch:
                if "error" in event:
                    raise translate.upstream_error(event)
                finish = _finish_reason(event) or finish
                last = event
                if isinstance(event.get("timings"), dict):
                    event["stats"] = stream_translate.lmstudio_stats(event["timings"], finish)
                    event["model_info"] = info
                    event["runtime"] = runtime(event.get("system_fingerprint"))
                    extras_sent = True
            yield batch
    if not extras_sent:
        # An upstream without timings: the extras still come, on a chunk of their own.
        yield [{
            "id": last.get("id"), "object": last.get("object"), "created": last.get("created"),
            "model": last.get("model"), "choices": [],
            "stats": stream_translate.lmstudio_stats(None, finish),
            "model_info": info, "runtime": runtime(last.get("system_fingerprint")),
        }]


async def v0_generate(request: web.Request, path: str, capability: Capability) -> (
    web.StreamResponse
):
    raw = await bodies.read(request, 64 << 20)
    payload = jsonc.loads_object(raw)
    model = jsonc.model_of(payload)
    scheduler = request.app[SCHEDULER]
    cfg = routes.check(scheduler, model, capability)
    if capability == "chat" and images.body_has_images(raw):
        images.require_vision(scheduler, model, cfg)
    facts = await request.app[MODEL_INFO].get(cfg)
    info = model_info(cfg, facts, context.shown(scheduler, cfg, facts.context_length))
    stream = payload.get("stream") is True

    async def consume(
        up: Upstream, resp: aiohttp.ClientResponse, client: Client
    ) -> web.StreamResponse:
        if resp.status != 200:
            raise upstream_error_body(resp.status, await resp.read())
        if stream:
            batches = upstream_batches(resp, up.instance_id)
            return await write_stream(request, _v0_chunks(batches, info), ndjson=False,
                                      client=client)
        body = jsonc.loads(await resp.read())
        body["stats"] = stream_translate.lmstudio_stats(body.get("timings"), _finish_reason(body))
        body["model_info"] = info
        body["runtime"] = runtime(body.get("system_fingerprint"))
        client.answered = True
        return web.json_response(body)

    spec = Call(model=model, path=path, body=raw,
                hints=hints_for(scheduler, model, jsonc.head(raw)),
                fit=context.of(path, raw, family="lmstudio"))
    return await upstream.answer(request, "openai", spec, consume)


async def v0_chat(request: web.Request) -> web.StreamResponse:
    return await v0_generate(request, "/v1/chat/completions", "chat")


async def v0_completions(request: web.Request) -> web.StreamResponse:
    return await v0_generate(request, "/v1/completions", "completion")


def _ready(scheduler: Scheduler, name: str) -> int:
    return sum(1 for i in scheduler.loaded(name) if i.state is State.READY)


def _publisher(facts: ModelFacts) -> str:
    org = facts.model_info.get("general.organization")
    return org if isinstance(org, str) and org else "corral"


def v0_model(name: str, cfg: ModelConfig, facts: ModelFacts, loaded: bool,
             ctx: tuple[int, int]) -> dict[str, Any]:
    """``ctx``: (the context an instance has, the most it can have)."""
    kind = "embeddings" if embedding(cfg) else "vlm" if vision(cfg) else "llm"
    out: dict[str, Any] = {
        "id": name,
        "object": "model",
        "type": kind,
        "publisher": _publisher(facts),
        "arch": facts.architecture or "unknown",
        "compatibility_type": "gguf",
        "quantization": facts.quantization or "unknown",
        "state": "loaded" if loaded else "not-loaded",
        "max_context_length": ctx[1],
    }
    if loaded:
        out["loaded_context_length"] = ctx[0]
    if facts.native_tools:
        out["capabilities"] = ["tool_use"]
    return out


async def _catalogue(request: web.Request) -> list[tuple[str, ModelConfig, ModelFacts]]:
    scheduler = request.app[SCHEDULER]
    cache: ModelInfoCache = request.app[MODEL_INFO]
    names = scheduler.names()
    cfgs = [scheduler.resolve(n) for n in names]
    facts = await cache.many(cfgs)
    return [(n, c, facts[c.name]) for n, c in zip(names, cfgs, strict=True)]


async def v0_models(request: web.Request) -> web.Response:
    scheduler = request.app[SCHEDULER]
    data = [v0_model(n, c, f, _ready(scheduler, n) > 0, _contexts(scheduler, c, f))
            for n, c, f in await _catalogue(request)]
    return web.json_response({"object": "list", "data": data})


async def v0_model_one(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    scheduler = request.app[SCHEDULER]
    cfg = scheduler.resolve(name)
    facts = await request.app[MODEL_INFO].get(cfg)
    return web.json_response(v0_model(name, cfg, facts, _ready(scheduler, name) > 0,
                                      _contexts(scheduler, cfg, facts)))


def _contexts(scheduler: Scheduler, cfg: ModelConfig, facts: ModelFacts) -> tuple[int, int]:
    return (context.shown(scheduler, cfg, facts.context_length),
            context.most(scheduler, cfg, facts.context_length))


# --- /api/v1 ------------------------------------------------------------------------------


def v1_model(name: str, cfg: ModelConfig, facts: ModelFacts, ready: int,
             contexts: tuple[int, int]) -> dict[str, Any]:
    emb = embedding(cfg)
    ctx = contexts[0]
    # LM Studio names an instance by its model key; a second one gets ":2".
    instances = [
        {"id": name if k == 0 else f"{name}:{k + 1}",
         "config": {"context_length": ctx, "parallel": cfg.parallel}}
        for k in range(ready)
    ]
    out: dict[str, Any] = {
        "type": "embedding" if emb else "llm",
        "publisher": _publisher(facts),
        "key": name,
        "display_name": (facts.info.name if facts.info and facts.info.name else name),
        "architecture": facts.architecture or None,
        "quantization": {
            "name": facts.quantization or None,
            "bits_per_weight": bits_per_weight(facts.quantization),
        },
        "size_bytes": facts.size,
        "params_string": (facts.info.size_label if facts.info else None) or facts.parameter_size
        or None,
        "loaded_instances": instances,
        "max_context_length": contexts[1],
        "format": "gguf",
    }
    if not emb:
        out["capabilities"] = {"vision": vision(cfg), "trained_for_tool_use": facts.native_tools}
    return out


async def v1_models(request: web.Request) -> web.Response:
    scheduler = request.app[SCHEDULER]
    models = [v1_model(n, c, f, _ready(scheduler, n), _contexts(scheduler, c, f))
              for n, c, f in await _catalogue(request)]
    return web.json_response({"models": models})


async def v1_load(request: web.Request) -> web.Response:
    """Load a model now: with at least ``context_length`` tokens of context, as far as
    the model can have (a replica of that size if the running one has less). Other
    load-time options (flash_attention, ...) are the model config's business."""
    payload = await bodies.read_json(request)
    model = jsonc.model_of(payload)
    scheduler = request.app[SCHEDULER]
    cfg = scheduler.resolve(model)
    asked = payload.get("context_length")
    want = asked if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0 else 0
    hints = LeaseHints(keep_alive=ttl_of(payload.get("ttl")), want_ctx=want)
    async with scheduler.lease(model, hints) as up:
        note_model(up.model)
        waited = up.waited
    return web.json_response({
        "type": "embedding" if embedding(cfg) else "llm",
        "instance_id": model,
        "load_time_seconds": round(waited, 3),
        "status": "loaded",
    })


async def v1_unload(request: web.Request) -> web.Response:
    payload = await bodies.read_json(request)
    instance_id = payload.get("instance_id") or payload.get("model")
    if not isinstance(instance_id, str) or not instance_id:
        raise BadRequest("'instance_id' is required")
    scheduler = request.app[SCHEDULER]
    # Accept what /api/v1/models lists ("name", "name:2") and Corral's ids ("name#3").
    name = instance_id.split("#", 1)[0]
    try:
        scheduler.resolve(name)
    except UnknownModel:
        name = name.rsplit(":", 1)[0]
        scheduler.resolve(name)
    if await scheduler.unload(name) == 0:
        raise NotFound(f"no loaded instance '{instance_id}'")
    return web.json_response({"instance_id": instance_id})


async def greeting(request: web.Request) -> web.Response:
    return await lmstudio_sdk.greeting(request)


def setup(app: web.Application) -> None:
    """Mount the LM Studio routes on the port's app (``proxy.app.port_app``)."""
    app[MODEL_INFO] = ModelInfoCache()
    r = app.router
    # /v1 as on the OpenAI port, with LM Studio's `ttl` honoured; the body goes
    # upstream untouched.
    openai.add_routes(app, "lmstudio", hints_for)
    r.add_get("/api/v0/models", v0_models)
    r.add_get("/api/v0/models/{model:.+}", v0_model_one)
    r.add_post("/api/v0/chat/completions", v0_chat)
    r.add_post("/api/v0/completions", v0_completions)
    r.add_get("/api/v1/models", v1_models)
    r.add_post("/api/v1/models/load", v1_load)
    r.add_post("/api/v1/models/unload", v1_unload)
    lmstudio_sdk.add_routes(app)  # /lmstudio-greeting and the SDK websockets
    lmstudio_chat.add_routes(app)  # POST /api/v1/chat


def setup_sdk(app: web.Application) -> None:
    """The optional SDK-only listener (``server.lmstudio_sdk_port``)."""
    app[MODEL_INFO] = ModelInfoCache()
    lmstudio_sdk.add_routes(app)
