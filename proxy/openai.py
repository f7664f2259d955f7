"""OpenAI routes: the pass-through fast path.

Bodies are forwarded byte for byte: llama-server echoes the requested model name,
so an alias needs no rewrite. The only parse is the one that finds ``model``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from proxy.keys import SCHEDULER, SESSION
from proxy.streaming import relay
from scheduler.errors import BadRequest, UpstreamFailed
from scheduler.scheduler import LeaseHints

_JSON = {"Content-Type": "application/json"}


def parse_body(body: bytes) -> dict[str, Any]:
    if not body:
        raise BadRequest("missing request body")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    return payload


def model_of(payload: dict[str, Any]) -> str:
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a string")
    return model


def prefix_key(payload: dict[str, Any]) -> str | None:
    """A hash of a chat's leading messages (system + first user turn), or the first
    200 characters of a prompt: the part a follow-up call shares with this one."""
    messages = payload.get("messages")
    if isinstance(messages, list) and messages:
        head: object = messages[:2]
    elif isinstance(payload.get("prompt"), str):
        head = payload["prompt"][:200]
    else:
        return None
    raw = json.dumps(head, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


# A call whose connection to the upstream could not even be opened never reached
# it, so it is safe to send again, to another replica or a relaunched instance.
_CONNECT_ATTEMPTS = 3


def default_hints(request: web.Request, model: str, payload: dict[str, Any]) -> LeaseHints | None:
    scheduler = request.app[SCHEDULER]
    return LeaseHints(affinity=prefix_key(payload)) if scheduler.balanced(model) else None


HintsFor = Callable[[web.Request, str, dict[str, Any]], LeaseHints | None]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def forward(
    request: web.Request, path: str, hints_for: HintsFor = default_hints
) -> web.StreamResponse:
    """Lease an upstream for the body's model and relay its answer.

    ``hints_for`` lets another dialect add lease hints (LM Studio's ``ttl``) while the
    body still goes upstream untouched.
    """
    body = await request.read()
    payload = parse_body(body)
    model = model_of(payload)
    scheduler = request.app[SCHEDULER]
    session = request.app[SESSION]
    hints = hints_for(request, model, payload)
    for attempt in range(1, _CONNECT_ATTEMPTS + 1):
        async with scheduler.lease(model, hints) as up:
            try:
                async with session.post(up.base_url + path, data=body, headers=_JSON) as resp:
                    return await relay(request, resp, up.instance_id, up.model)
            except aiohttp.ClientConnectionError as e:
                # No answer at all: refused, or reset on a pooled connection to a child
                # that has just died. Such a call went down with the process or never
                # reached it, so it may go to another replica or a relaunch.
                retry = await scheduler.upstream_failed(
                    up.instance_id, str(e), connect=isinstance(e, aiohttp.ClientConnectorError)
                )
                if not retry or attempt == _CONNECT_ATTEMPTS:
                    raise UpstreamFailed(
                        f"model '{up.model}': upstream {up.instance_id} failed: {e}"
                    ) from None
    raise AssertionError("unreachable")


def _model_object(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "corral"}


async def list_models(request: web.Request) -> web.Response:
    scheduler = request.app[SCHEDULER]
    created = int(time.time())
    data = [_model_object(name, created) for name in scheduler.names()]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    request.app[SCHEDULER].resolve(name)
    return web.json_response(_model_object(name, int(time.time())))


PASS_THROUGH = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


def pass_through(path: str, hints_for: HintsFor = default_hints) -> Handler:
    """The handler that forwards a call to ``path`` upstream."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return await forward(request, path, hints_for)

    return handler


def add_routes(app: web.Application, hints_for: HintsFor = default_hints) -> None:
    """The OpenAI routes; other dialects reuse them with their own lease hints."""
    for path in PASS_THROUGH:
        app.router.add_post(path, pass_through(path, hints_for))
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
