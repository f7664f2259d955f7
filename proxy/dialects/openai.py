"""OpenAI routes: the model list. Every model-routed OpenAI endpoint (chat,
completions, embeddings, Responses, Anthropic Messages, rerank, audio, llama-server's
native API) is a row of ``proxy.calls.routes``, relayed as it came."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from proxy.calls import routes
from proxy.dialects import xinference
from proxy.keys import SCHEDULER
from proxy.ops import openapi
from scheduler.config.root import ModelConfig
from scheduler.models.capabilities import capabilities


def _model_object(name: str, cfg: ModelConfig, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "corral",
            # Extra fields (allowed in the list): what the model serves, and where it
            # came from (config, scan:<layout>, pulled; docs/models.md).
            "capabilities": sorted(capabilities(cfg)), "origin": cfg.origin}


async def list_models(request: web.Request) -> web.Response:
    scheduler = request.app[SCHEDULER]
    created = int(time.time())
    # xinference-client reads its own fields (model_type, model_ability...) off the list.
    extra = xinference.describe if xinference.is_client(request) else None
    data = [_model_object(n, cfg, created) | (extra(request.app, n, cfg) if extra else {})
            for n in scheduler.names() for cfg in (scheduler.resolve(n),)]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    cfg = request.app[SCHEDULER].resolve(name)
    out = _model_object(name, cfg, int(time.time()))
    if xinference.is_client(request):
        out |= xinference.describe(request.app, name, cfg)
    return web.json_response(out)


def add_routes(
    app: web.Application, port: routes.Port, hints_for: routes.HintsFor = routes.default_hints,
    name_for: routes.NameFor = routes.same_name,
) -> None:
    """The OpenAI surface of a port; other dialects mount it with their lease hints and
    their reading of model names."""
    routes.mount(app, port, hints_for, name_for)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_get("/openapi.json", openapi.handler(port))
