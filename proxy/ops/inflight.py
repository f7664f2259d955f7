"""The operator's hands on single calls: the request list, captures, cancel and replay
(docs/admin-api.md, "Requests"). Admin keys only, like every /admin path.

``cancel(app, request_id)`` is the one way to end a call in flight by its id; the
admin route and other APIs (Xinference's abort) call it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import aiohttp
from aiohttp import web

from proxy.calls.capture import Captures
from proxy.edge import jsonc
from proxy.edge.body import read_json
from proxy.edge.reqlog import HEADER
from proxy.keys import CALLS, SCHEDULER, SESSION
from proxy.metrics.registry import METRICS
from proxy.ops import capture_view
from scheduler.config import secrets
from scheduler.errors import BadRequest, CorralError, NotFound

log = logging.getLogger(__name__)

# The longest replayed answer shown in the page.
_REPLAY_SHOWN = 1 << 20
# Paths of other ports that the main port serves under its own prefix (proxy/ops/mount.py).
_MOUNTED_ELSEWHERE = {"/api/chat": "/admin/ollama/api/chat"}


def cancel(app: web.Application, request_id: str) -> bool:
    """End the call ``request_id`` if it is in flight on any port; False if it is not.

    Its client gets a clean error in its dialect (499 ``cancelled``, or an error event
    ending a stream already begun), the upstream connection is closed so the slot is
    freed at once, and the lease is released (proxy/calls/tracking.py)."""
    calls = app.get(CALLS)
    if calls is None or not calls.cancel(request_id):
        return False
    log.info("request %s cancelled by an operator", request_id)
    return True


def _captures(request: web.Request) -> Captures | None:
    calls = request.app.get(CALLS)
    return calls.captures if calls is not None else None


def _scrubbed(request: web.Request, data: dict[str, Any]) -> dict[str, Any]:
    # A remote's key quoted in a body or an answer (an upstream's error echoing it).
    out: dict[str, Any] = secrets.scrub_data(data, request.app[SCHEDULER].config.credentials())
    return out


async def _view(request: web.Request) -> dict[str, Any]:
    rid = request.match_info["id"]
    store = _captures(request)
    if store is None:
        raise NotFound("captures are off: set [server.capture] memory (docs/admin-api.md)")
    rec = store.get(rid)
    view = capture_view.render(rec) if rec is not None else await store.load(rid)
    if view is None:
        raise NotFound(f"no capture of request {rid!r} (not captured, or dropped)")
    return _scrubbed(request, view)


async def requests(request: web.Request) -> web.Response:
    """The recent calls (newest first), which of them were captured, those in flight."""
    try:
        limit = int(request.query.get("limit", 50))
    except ValueError:
        raise BadRequest("limit must be an integer") from None
    recent = request.app[METRICS].recent_requests(limit)
    calls = request.app.get(CALLS)
    store = calls.captures if calls is not None else None
    for r in recent:
        r["captured"] = store is not None and store.get(str(r["request_id"])) is not None
    out: dict[str, Any] = {
        "requests": recent,
        "in_flight": [{**e, **_brief(store, str(e["request_id"]))}
                      for e in (calls.describe() if calls is not None else ())],
        "captures": None if store is None else {
            "records": len(store.records), "bytes": store.bytes,
            "memory": store.config.memory, "dir": str(store.config.dir or "") or None},
    }
    return web.json_response(out)


def _brief(store: Captures | None, rid: str) -> dict[str, Any]:
    rec = store.get(rid) if store is not None else None
    if rec is None:
        return {"captured": False}
    return {"captured": True, "path": rec.meta.get("path"), "key": rec.meta.get("key"),
            "seconds": rec.timings()["total_seconds"]}


async def captured(request: web.Request) -> web.Response:
    view = await _view(request)
    return web.json_response({**view, "curl": capture_view.curl(view)})


async def as_curl(request: web.Request) -> web.Response:
    return web.Response(text=capture_view.curl(await _view(request)),
                        content_type="text/plain")


async def cancel_call(request: web.Request) -> web.Response:
    rid = request.match_info["id"]
    if not cancel(request.app, rid):
        raise NotFound(f"request {rid!r} is not in flight")
    return web.json_response({"request_id": rid, "cancelled": True})


def _target(request: web.Request, path: str) -> str:
    """Where the main port serves ``path`` (another port's call included), if it does."""
    path = _MOUNTED_ELSEWHERE.get(path, path)
    for resource in request.app.router.resources():
        if resource.canonical == path:
            return path
    raise BadRequest(f"a call to {path} cannot be replayed from the main port")


def _base(request: web.Request) -> str:
    """This listener's own address (the Host header when it sits behind a socket file)."""
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sock, tuple):
        host = sock[0]
        return f"http://[{host}]:{sock[1]}" if ":" in host else f"http://{host}:{sock[1]}"
    return f"http://{request.host}"


async def replay(request: web.Request) -> web.Response:
    """Send a captured call again, to ``{"model": X}`` (default: the same model), and
    answer with what came back (not streamed, so the page can show it whole)."""
    asked = await read_json(request, 1 << 16) if request.can_read_body else {}
    view = await _view(request)
    req = view.get("request") or {}
    if req.get("body_cut_bytes"):
        raise BadRequest("the captured body was cut at [server.capture] body_limit: it "
                         "cannot be sent again whole")
    try:
        body = jsonc.loads_object(str(req.get("body") or "").encode())
    except CorralError as e:
        raise BadRequest(f"the captured body cannot be sent again: {e.message}") from None
    model = asked.get("model") or body.get("model") or view.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must name a model")
    request.app[SCHEDULER].resolve(model)  # an unknown name is a 404 here, not later
    body["model"] = model
    path = str(req.get("url_path") or view.get("path"))
    if "stream" in body or path in _MOUNTED_ELSEWHERE:
        body["stream"] = False
    url = _base(request) + _target(request, path)
    if req.get("query"):
        url += "?" + str(req["query"])
    headers = {**capture_view.kept_headers(view), "Content-Type": "application/json"}
    for name in ("Authorization", "X-API-Key"):
        if name in request.headers:
            headers[name] = request.headers[name]  # the admin's own key
    try:
        async with request.app[SESSION].request(
                str(req.get("method") or "POST"), url, data=jsonc.dumps(body), headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)) as resp:
            raw = await resp.content.read(_REPLAY_SHOWN)
            answer: Any = raw.decode("utf-8", "replace")
            if resp.content_type == "application/json":
                with contextlib.suppress(CorralError):  # else shown as the text it is
                    answer = jsonc.loads_object(raw)
            return web.json_response({"replayed": view.get("id"), "model": model,
                                      "request_id": resp.headers.get(HEADER),
                                      "status": resp.status, "answer": answer})
    except aiohttp.ClientError as e:
        raise BadRequest(f"the replay did not reach Corral's own port: {e}") from None


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/admin/requests", requests)
    r.add_get("/admin/requests/{id}", captured)
    r.add_get("/admin/requests/{id}/curl", as_curl)
    r.add_post("/admin/requests/{id}/cancel", cancel_call)
    r.add_post("/admin/requests/{id}/replay", replay)
