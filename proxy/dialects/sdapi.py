"""stable-diffusion WebUI's API (``/sdapi/v1/*``) and the models a media call may leave
out.

txt2img and img2img are rows of the route table (``proxy.calls.routes``); what is the
WebUI's own is here: its model list (``GET /sdapi/v1/sd-models``, answered by Corral
from its image models, so a client picks among all of them, not the one loaded), and
where its bodies name a model (``override_settings.sd_model_checkpoint``, as a WebUI
client switches checkpoints per call). OpenAI's speech and image calls may leave
``model`` out too (the API has a default); then the one model that has the capability
serves them.
"""

from __future__ import annotations

from aiohttp import web

from proxy.edge import jsonc
from proxy.keys import SCHEDULER
from scheduler.config.root import Capability
from scheduler.errors import BadRequest
from scheduler.models.capabilities import capabilities
from scheduler.scheduling.scheduler import Scheduler

# Capabilities whose calls may leave ``model`` out.
OPTIONAL_MODEL: frozenset[Capability | None] = frozenset({"speech", "image"})


def able(scheduler: Scheduler, capability: Capability) -> list[str]:
    """The configured models that can serve ``capability``."""
    return [n for n in scheduler.names() if capability in capabilities(scheduler.resolve(n))]


def implied_model(scheduler: Scheduler, capability: Capability | None,
                  body: bytes | bytearray | None) -> str | None:
    """The model a call that names none is for: the WebUI's checkpoint override, else
    the only model with the capability (None: none, or several to choose from)."""
    if capability not in OPTIONAL_MODEL or capability is None:
        return None
    if body:
        named = _checkpoint(body)
        if named is not None:
            return named
    models = able(scheduler, capability)
    return models[0] if len(models) == 1 else None


def _checkpoint(body: bytes | bytearray) -> str | None:
    try:
        payload = jsonc.loads(body)
    except BadRequest:  # head() has refused it already; here it only names nothing
        return None
    settings = payload.get("override_settings") if isinstance(payload, dict) else None
    name = settings.get("sd_model_checkpoint") if isinstance(settings, dict) else None
    return name if isinstance(name, str) and name else None


async def sd_models(request: web.Request) -> web.Response:
    """``GET /sdapi/v1/sd-models``: every image model, as the WebUI lists checkpoints."""
    scheduler = request.app[SCHEDULER]
    return web.json_response([
        {"title": name, "model_name": name, "hash": None, "sha256": None,
         "filename": name, "config": None}
        for name in able(scheduler, "image")
    ])
