"""Admin API on the main port: models, instances, load/unload, logs.

Behind the API key when one is set (the auth middleware covers every path but
/health). Answers JSON; errors in the OpenAI envelope like the rest of the port.
"""

from __future__ import annotations

from aiohttp import web

from proxy.errors import BadRequest
from proxy.keys import SCHEDULER


async def models(request: web.Request) -> web.Response:
    return web.json_response({"models": request.app[SCHEDULER].model_status()})


async def instances(request: web.Request) -> web.Response:
    insts = request.app[SCHEDULER].instances()
    return web.json_response({"instances": [i.describe() for i in insts]})


async def load(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    up = await request.app[SCHEDULER].load(name)
    return web.json_response({"model": up.model, "instance": up.instance_id,
                              "waited_seconds": round(up.waited, 3)})


async def unload(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    n = await request.app[SCHEDULER].unload(name)
    return web.json_response({"model": request.app[SCHEDULER].resolve(name).name,
                              "stopping": n})


async def logs(request: web.Request) -> web.Response:
    iid = request.match_info["instance"]
    try:
        tail = int(request.query.get("tail", "100"))
    except ValueError:
        raise BadRequest("tail must be an integer") from None
    for inst in request.app[SCHEDULER].instances():
        if inst.id == iid:
            lines = list(inst.log)[-tail:] if tail > 0 else []
            return web.json_response({"instance": iid, "lines": lines})
    raise web.HTTPNotFound(reason=f"no instance {iid!r}")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/models", models)
    app.router.add_get("/admin/instances", instances)
    app.router.add_post("/admin/models/{model}/load", load)
    app.router.add_post("/admin/models/{model}/unload", unload)
    app.router.add_get("/admin/instances/{instance}/logs", logs)
