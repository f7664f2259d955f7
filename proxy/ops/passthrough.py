"""Raw passthrough: ``/upstream/{model}/{path}`` on the main port reaches the model's
own server as it is (llama-server's web UI, ``/slots``, ``/props``; another runtime's
pages), any method, websockets included. Admin keys only (``/upstream/`` is an admin
prefix in proxy/edge/guard.py). Reference: docs/admin-api.md, "Raw passthrough".

A passthrough call takes no slot: it goes to a ready instance of the model even while
its slots are busy (watching ``/slots`` during a long generation is the point), and
counts as use for the idle TTL. With no ready instance, the model is loaded as an
admin load would, unless ``passthrough_launch = "root"``: then only the root page
(``/upstream/{model}/``) may start it, so the assets and polls of a browser tab left
open cannot keep loading a model that was stopped. A remote is reached only when its
table says ``passthrough = true``: its own key goes with every call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp
from aiohttp import web

from proxy.edge.errors import ROUTE_DIALECT
from proxy.edge.guard import Forbidden
from proxy.edge.reqlog import note_model
from proxy.keys import SCHEDULER, SESSION
from scheduler.aio import cancel_and_wait
from scheduler.config.root import ModelConfig
from scheduler.engines.egress import Egress
from scheduler.errors import CorralError, UnknownModel, UpstreamFailed
from scheduler.process.instance import Instance, State
from scheduler.scheduling.scheduler import Scheduler

# Not forwarded either way: hop-by-hop headers, the caller's credentials, and what
# aiohttp sets itself.
_DROPPED = frozenset({"host", "connection", "keep-alive", "proxy-authenticate",
                      "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
                      "authorization", "x-api-key", "cookie", "content-length",
                      "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                      "sec-websocket-accept"})


# How often a passthrough call that waits for a starting instance looks again.
_LOAD_POLL = 0.05


class NotLoaded(CorralError):
    status = 409
    code = "model_not_loaded"
    type = "invalid_request_error"


def _split(scheduler: Scheduler, rest: str) -> tuple[ModelConfig, str] | None:
    """The model and the path after it; model names may hold slashes (hf.co/u/r), so
    the longest leading part that names a model wins. None: no slash after the name."""
    error: UnknownModel | None = None
    cut = len(rest)
    while cut > 0:
        try:
            cfg = scheduler.resolve(rest[:cut])
        except UnknownModel as e:
            error = error or e
        else:
            return (cfg, rest[cut + 1:]) if cut < len(rest) else None
        cut = rest.rfind("/", 0, cut)
    raise error or UnknownModel(rest, scheduler.names())


def _ready(scheduler: Scheduler, name: str) -> Instance | None:
    ready = [i for i in scheduler.instances() if i.model == name and i.state is State.READY]
    return min(ready, key=lambda i: i.in_flight) if ready else None


async def _loading(scheduler: Scheduler, name: str, within: float) -> Instance | None:
    """The model's instance that is starting, once it is ready. Not a lease: a call
    that arrived first takes the only slot the moment it is ready, and a lease would
    then wait behind it (the /slots probe of a long generation did)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if (inst := _ready(scheduler, name)) is not None:
            return inst
        if not any(i.model == name and i.state is State.STARTING
                   for i in scheduler.instances()):
            return None
        await asyncio.sleep(_LOAD_POLL)
    return None


async def _target(scheduler: Scheduler, cfg: ModelConfig, root: bool) -> tuple[str, Egress]:
    inst = _ready(scheduler, cfg.name)
    if inst is None and (root or cfg.passthrough_launch == "any"):
        inst = await _loading(scheduler, cfg.name,
                              cfg.load_timeout or scheduler.config.scheduler.load_timeout)
    if inst is not None:
        inst.touch()
        return inst.base_url, inst.egress
    if cfg.passthrough_launch == "root" and not root:
        raise NotLoaded(f"model '{cfg.name}' is not loaded, and only /upstream/{cfg.name}/ "
                        "may start it (passthrough_launch = \"root\")")
    up = await scheduler.load(cfg.name)
    for remote in cfg.remote_configs():
        if remote.url == up.base_url and not remote.passthrough:
            raise Forbidden(f"model '{cfg.name}' is served by a remote that does not allow "
                            "raw passthrough (set passthrough = true in its remotes table)")
    return up.base_url, up.egress


def _headers(given: Mapping[str, str], out: Egress) -> dict[str, str]:
    headers = {k: v for k, v in given.items() if k.lower() not in _DROPPED}
    headers.update(out.headers)
    return headers


def _upgrade(request: web.Request) -> bool:
    return (request.headers.get("Upgrade", "").lower() == "websocket"
            and "upgrade" in request.headers.get("Connection", "").lower())


async def passthrough(request: web.Request) -> web.StreamResponse:
    scheduler = request.app[SCHEDULER]
    rest = request.match_info["rest"]
    found = _split(scheduler, rest)
    if found is None:
        # Its pages link relative to the root: the root ends with a slash.
        raise web.HTTPPermanentRedirect(f"/upstream/{rest}/")
    cfg, tail = found
    note_model(cfg.name)
    base, out = await _target(scheduler, cfg, root=tail == "")
    url = base + out.path("/" + tail)
    if _upgrade(request):
        return await _websocket(request, url, out)
    session = request.app[SESSION]
    try:
        resp = await session.request(
            request.method, url, params=request.query, headers=_headers(request.headers, out),
            data=request.content if request.body_exists else None, ssl=out.ssl,
            allow_redirects=False, auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout,
                                          sock_read=cfg.stall_timeout))
    except (aiohttp.ClientError, TimeoutError) as e:
        raise UpstreamFailed(f"model '{cfg.name}': its server did not answer: "
                             f"{type(e).__name__}") from None
    async with resp:
        answer = web.StreamResponse(status=resp.status, reason=resp.reason)
        for k, v in resp.headers.items():
            if k.lower() not in _DROPPED:
                answer.headers.add(k, v)
        await answer.prepare(request)
        try:
            async for chunk in resp.content.iter_any():
                await answer.write(chunk)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError):
            resp.close()
            return answer  # the status line is gone: the body ends short
        await answer.write_eof()
        return answer


async def _websocket(request: web.Request, url: str, out: Egress) -> web.StreamResponse:
    """Both directions pumped until either side closes."""
    session = request.app[SESSION]
    try:
        upstream = await session.ws_connect(
            "ws" + url.removeprefix("http"), headers=_headers(request.headers, out),
            ssl=out.ssl, protocols=tuple(p.strip() for p in request.headers.get(
                "Sec-WebSocket-Protocol", "").split(",") if p.strip()))
    except (aiohttp.ClientError, TimeoutError) as e:
        raise UpstreamFailed(f"the model's server refused the websocket: "
                             f"{type(e).__name__}") from None
    client = web.WebSocketResponse(protocols=(upstream.protocol,) if upstream.protocol else ())
    await client.prepare(request)

    async def pump(src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                   dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for msg in src:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    await dst.send_str(msg.data)
                elif msg.type is aiohttp.WSMsgType.BINARY:
                    await dst.send_bytes(msg.data)
                else:
                    break
        except (ConnectionResetError, aiohttp.ClientError):
            pass  # one side went away: both are closed below

    tasks = [asyncio.create_task(pump(client, upstream)),
             asyncio.create_task(pump(upstream, client))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            await cancel_and_wait(t)
        await upstream.close()
        await client.close()
    return client


def add_routes(app: web.Application) -> None:
    async def handle(request: web.Request) -> web.StreamResponse:
        request[ROUTE_DIALECT] = "openai"
        return await passthrough(request)

    app.router.add_route("*", "/upstream/{rest:.*}", handle)
