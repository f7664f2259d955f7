"""A model's lifecycle on the admin API, without blocking: loads answered at once with
an operation to follow, cancel of a launch or download in progress, one replica added
or removed, a per-model event stream, runtime models (docs/admin-api.md).

Handlers stay thin: the scheduler (scheduler/scheduling/scaling.py) stops launches and
scales, proxy/ops/operations.py follows loads, proxy/ops/runtime_models.py keeps the
created models. Xinference's REST subset (proxy/dialects/xinference.py) is a second
face of the same functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.edge import jsonc
from proxy.edge.reqlog import note_model
from proxy.keys import OPERATIONS, RUNTIME_MODELS, SCHEDULER
from proxy.metrics.registry import METRICS
from proxy.ops import pulls
from proxy.ops.operations import Operation, Operations, Work, load_work
from proxy.ops.reload import RELOADER
from proxy.ops.runtime_models import RuntimeModels
from scheduler.config import secrets
from scheduler.config.root import ModelConfig
from scheduler.errors import BadRequest, NotFound, UnknownModel
from scheduler.models.pull import parse_ref
from scheduler.models.runtime import check_params
from scheduler.models.sources import materialised_file
from scheduler.scheduling.scheduler import Scheduler

_EVENT_INTERVAL = 0.25
_HEARTBEAT = 15.0
_CLOSING = web.AppKey("lifecycle_closing", asyncio.Event)


def lifecycle_ctx(config_path: Path | None
                  ) -> Callable[[web.Application], AbstractAsyncContextManager[None]]:
    """Operations and runtime models (restored from the file beside ``config_path``)
    for the main port's app; operations are cancelled when it stops."""
    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        app[OPERATIONS] = Operations()
        app[RUNTIME_MODELS] = RuntimeModels(app[SCHEDULER], config_path)
        app[_CLOSING] = asyncio.Event()
        await app[RUNTIME_MODELS].restore()
        if RELOADER in app:
            app[RELOADER].after_reload.append(app[RUNTIME_MODELS].recheck)
        try:
            yield
        finally:
            app[_CLOSING].set()
            await app[OPERATIONS].close()
    return ctx


def known_secrets(app: web.Application) -> tuple[str, ...]:
    cfg = app[SCHEDULER].config
    return tuple(secrets.values(cfg.model_dump(mode="json")) | cfg.credentials())


def view(app: web.Application, op: Operation) -> dict[str, Any]:
    return op.view(app[SCHEDULER], known_secrets(app))


def model_name(request: web.Request, key: str = "model") -> str:
    name = request.app[SCHEDULER].resolve(request.match_info[key]).name
    note_model(name)
    return name


# -- operations the other faces share ---------------------------------------------------


def start_load(app: web.Application, name: str) -> Operation:
    """A load of ``name`` to follow; the one already running for it if any."""
    ops = app[OPERATIONS]
    for op in ops.of_model(name):
        if not op.done:
            return op
    return ops.start(name, "load", _with_files(app, name, load_work(app[SCHEDULER], name)))


def _with_files(app: web.Application, name: str, then: Work) -> Work:
    """``then``, after the download of a configured ``hf_repo`` model's file that is not
    here yet: in the operation (``downloading`` with bytes, cancelled with it), not
    inside the launch, where a thread would go on downloading after a cancel."""
    scheduler = app[SCHEDULER]

    async def work(op: Operation) -> None:
        how = pulls.downloadable(scheduler, name)
        if how is not None and how[1] is not None and await asyncio.to_thread(
                materialised_file, how[1]) is None:
            await _download(app, op, name, how)
        await then(op)
    return work


async def _download(app: web.Application, op: Operation, name: str, how: pulls.How) -> None:
    """A pull in an operation: ``downloading`` with its bytes, then ``queued``."""
    async with contextlib.aclosing(pulls.run_pull(app, name, *how)) as lines:
        async for batch in lines:
            for line in batch:
                if isinstance(line.get("total"), int):
                    op.state = "downloading"
                    op.total = int(line["total"])
                    op.completed = int(str(line.get("completed") or 0))
    op.state = "queued"


async def cancel_model(app: web.Application, name: str) -> dict[str, Any]:
    """Stop what is under way for ``name``: its operations (a download included) and
    its launches (children killed, memory given back, waiting calls answered)."""
    ops = app[OPERATIONS]
    running = [op for op in ops.of_model(name) if not op.done]
    for op in running:
        await ops.cancel(op)
    # A runtime model cancelled while its file downloads does not exist yet.
    scheduler = app[SCHEDULER]
    stopped = scheduler.cancel_launch(name) if name in scheduler.names() else []
    return {"model": name, "cancelled_launches": stopped,
            "operations": [view(app, op) for op in running]}


async def create_runtime(app: web.Application, name: str, source: str,
                         params: dict[str, Any], load: bool, scale: int | None = None
                         ) -> tuple[int, dict[str, Any]]:
    """A runtime model ``name`` from ``source`` (a served model, or an ``hf.co/...``
    name pulled first, in an operation), loaded if ``load`` with ``scale`` replicas
    kept (Xinference's ``replica``). Returns the status and the answer."""
    scheduler, models = app[SCHEDULER], app[RUNTIME_MODELS]
    base = _served(scheduler, source)
    if base is None:
        how = pulls.downloadable(scheduler, source) if parse_ref(source) else None
        if how is None:
            raise UnknownModel(source, scheduler.names())
        # Checked before the download: a bad key is refused at once.
        check_params(params)

        async def work(op: Operation) -> None:
            await _download(app, op, source, how)
            await models.create(name, scheduler.resolve(source), params)
            if scale is not None:
                scheduler.scale_to(name, scale)
            if load:
                await load_work(scheduler, name)(op)

        op = app[OPERATIONS].start(name, "create", work)
        return 202, {"model": name, "operation": view(app, op)}
    entry = await models.create(name, base, params)
    out: dict[str, Any] = {"model": name, "runtime": entry.as_table(),
                           "persisted": models.file is not None}
    if scale is not None:
        scheduler.scale_to(name, scale)
    if load:
        out["operation"] = view(app, start_load(app, name))
    return 201, out


def _served(scheduler: Scheduler, name: str) -> ModelConfig | None:
    try:
        return scheduler.resolve(name)
    except UnknownModel:
        return None


# -- admin handlers -------------------------------------------------------------------


def waits(request: web.Request) -> bool:
    """``?wait=1``: answer when the instance is ready, not with an operation."""
    return request.query.get("wait", "").lower() in ("1", "true", "yes")


async def load(request: web.Request) -> web.Response:
    """At once, an operation to follow (202); ``?wait=1``: when an instance is ready."""
    name = model_name(request)
    if waits(request):
        up = await request.app[SCHEDULER].load(name)
        return web.json_response({"model": up.model, "instance": up.instance_id,
                                  "waited_seconds": round(up.waited, 3)})
    op = start_load(request.app, name)
    return web.json_response({"model": name, "operation": view(request.app, op)}, status=202)


async def operations(request: web.Request) -> web.Response:
    return web.json_response({"operations": [view(request.app, o)
                                             for o in request.app[OPERATIONS].all()]})


def _operation(request: web.Request) -> Operation:
    op = request.app[OPERATIONS].get(request.match_info["op"])
    if op is None:
        raise NotFound(f"no operation {request.match_info['op']!r}")
    return op


async def operation(request: web.Request) -> web.Response:
    return web.json_response(view(request.app, _operation(request)))


async def cancel_operation(request: web.Request) -> web.Response:
    op = _operation(request)
    if op.done:
        return web.json_response(view(request.app, op))
    await cancel_model(request.app, op.model)
    return web.json_response(view(request.app, op))


async def cancel(request: web.Request) -> web.Response:
    return web.json_response(await cancel_model(request.app, model_name(request)))


async def add_replica(request: web.Request) -> web.Response:
    name = model_name(request)
    scheduler = request.app[SCHEDULER]
    iid = scheduler.add_replica(name)
    # None: accepted, launched once room frees (202).
    return web.json_response({"model": name, "instance": iid, "pending": iid is None,
                              "replicas": len(scheduler.loaded(name))},
                             status=200 if iid else 202)


async def remove_replica(request: web.Request) -> web.Response:
    name = model_name(request)
    iid, left = request.app[SCHEDULER].remove_replica(name, request.match_info.get("instance"))
    return web.json_response({"model": name, "instance": iid, "remaining_replicas": left})


async def runtime_list(request: web.Request) -> web.Response:
    models = request.app[RUNTIME_MODELS]
    return web.json_response({
        "file": str(models.file) if models.file else None,
        "models": [e.as_table() for e in models.entries()],
        # Kept in the file, not served: what the rule refuses now, and why.
        "withheld": [{**e.as_table(), "reason": why} for e, why in models.withheld()]})


async def _body(request: web.Request) -> dict[str, Any]:
    return jsonc.loads_object(await request.read())


async def runtime_create(request: web.Request) -> web.Response:
    """{"name", "from", "load"?, ...parameters}: see docs/admin-api.md."""
    data = await _body(request)
    name, source = data.pop("name", None), data.pop("from", None)
    load_now = bool(data.pop("load", False))
    if not isinstance(name, str) or not name or not isinstance(source, str) or not source:
        raise BadRequest("'name' and 'from' (a model Corral serves, or an hf.co/... name) "
                         "are required strings")
    status, out = await create_runtime(request.app, name, source, data, load_now)
    return web.json_response(out, status=status)


async def runtime_delete(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    await request.app[RUNTIME_MODELS].delete(name)
    return web.json_response({"model": name, "deleted": True})


# -- the event stream ----------------------------------------------------------------------


def model_state(app: web.Application, name: str) -> dict[str, Any] | None:
    """What the event stream sends when it changes: the model's state, queue, load
    estimate, instances (id, state, in flight) and operations."""
    for m in app[SCHEDULER].model_status():
        if m["name"] != name:
            continue
        insts: Any = m["instances"]
        return {"model": name, "state": m["state"], "queued": m["queued"],
                "loading": m["loading"], "last_error": m["last_error"],
                "instances": [{k: i.get(k) for k in ("id", "state", "in_flight", "slots")}
                              for i in insts],
                "operations": [view(app, o) for o in app[OPERATIONS].of_model(name)
                               if not o.done]}
    return None


def _sse(event: str, data: object) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events for one model: ``state`` whenever its state changes (the
    first at once), ``scheduler`` for each launch, stop or crash, ``end`` when the
    model is gone or Corral shuts down."""
    return await stream_events(request, model_name(request))


async def stream_events(request: web.Request, name: str) -> web.StreamResponse:
    app = request.app
    resp = web.StreamResponse(headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    resp.content_type = "text/event-stream"
    await resp.prepare(request)
    ring = app[METRICS].events
    seen = ring[-1] if ring else None
    last: str | None = None
    quiet = 0.0
    known = known_secrets(app)
    try:
        while not app[_CLOSING].is_set():
            out = b""
            fresh = list(ring)
            if seen is not None and seen in fresh:
                fresh = fresh[fresh.index(seen) + 1:]
            if fresh:
                seen = fresh[-1]
            out += b"".join(_sse("scheduler", e) for e in fresh if e.get("model") == name)
            state = model_state(app, name)
            if state is None:
                await resp.write(out + _sse("end", {"reason": "model removed"}))
                break
            text = json.dumps(secrets.scrub_data(state, known), sort_keys=True)
            if text != last:
                out += _sse("state", json.loads(text))
                last = text
            if out:
                await resp.write(out)
                quiet = 0.0
            quiet += _EVENT_INTERVAL
            if quiet >= _HEARTBEAT:
                await resp.write(b": keep-alive\n\n")
                quiet = 0.0
            await asyncio.sleep(_EVENT_INTERVAL)
        else:
            await resp.write(_sse("end", {"reason": "corral shutting down"}))
    except ConnectionResetError:
        return resp
    await resp.write_eof()
    return resp


def add_routes(app: web.Application) -> None:
    """Before admin's ``/admin/models/{model:.+}``, which would take these paths."""
    r = app.router
    r.add_get("/admin/models/{model:.+}/events", events)
    r.add_post("/admin/models/{model:.+}/load", load)
    r.add_post("/admin/models/{model:.+}/cancel", cancel)
    r.add_post("/admin/models/{model:.+}/replicas", add_replica)
    r.add_post("/admin/models/{model:.+}/replicas/add", add_replica)
    r.add_post("/admin/models/{model:.+}/replicas/remove", remove_replica)
    r.add_delete("/admin/models/{model:.+}/replicas/{instance}", remove_replica)
    r.add_get("/admin/operations", operations)
    r.add_get("/admin/operations/{op}", operation)
    r.add_post("/admin/operations/{op}/cancel", cancel_operation)
    r.add_get("/admin/runtime-models", runtime_list)
    r.add_post("/admin/runtime-models", runtime_create)
    r.add_delete("/admin/runtime-models/{model:.+}", runtime_delete)
