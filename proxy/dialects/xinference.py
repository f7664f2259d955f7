"""Xinference's REST subset on the main port, mapped onto Corral's lifecycle
(proxy/ops/lifecycle.py): what ``xinference-client`` and the tools built on it call
(docs/compatibility.md has the table).

A Xinference *model uid* is a Corral model name. ``POST /v1/models`` launches a model by
name (a runtime model when it carries launch parameters such as ``n_ctx``); the uid
answers chat and the other OpenAI routes as any model does. Errors answer in
Xinference's envelope, ``{"detail": "..."}``, with Corral's status codes; what
Xinference has and Corral cannot map (virtual environments, engines Corral does not run,
placement on workers and GPUs, PEFT adapters) answers 400 naming it.

Keys: Corral's. Launching, terminating, cancelling, scaling, aborting and the cluster's
details need an admin key (Xinference's "admin"/"models:start|stop" scopes); listing,
describing, progress and the device count need a key whose scope covers the model.
``GET /v1/cluster/auth`` is open: the client asks it, without a key, whether to send one.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

import psutil
from aiohttp import web

from proxy import __version__
from proxy.edge import jsonc
from proxy.edge.errors import public_message
from proxy.edge.guard import Forbidden
from proxy.keys import OPERATIONS, RUNTIME_MODELS, SCHEDULER
from proxy.metrics.registry import METRICS
from proxy.ops import inflight, lifecycle
from scheduler.config.root import ModelConfig
from scheduler.errors import BadRequest, CorralError, UnknownModel
from scheduler.keys import tenants
from scheduler.models.capabilities import capabilities
from scheduler.models.runtime import check_params
from scheduler.process.instance import State
from scheduler.scheduling import loadcost

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ENGINES = ("llama.cpp", "llama-cpp", "llama_cpp", "llamacpp", "gguf")
# Launch fields the client always sends; None (or its default) maps to nothing.
_PASSIVE = {"model_uid", "model_name", "model_type", "model_engine", "model_size_in_billions",
            "model_format", "quantization", "replica", "n_worker", "n_gpu", "wait_ready"}
# Launch fields Xinference has and Corral cannot map, and why.
_UNMAPPABLE = {
    "enable_virtual_env": "virtual environments: Corral runs the llama-server it installed",
    "virtual_env_packages": "virtual environments: Corral runs the llama-server it installed",
    "virtual_env_find_links": "virtual environments: Corral runs the llama-server it installed",
    "envs": "environment variables are a protected key (what Corral runs)",
    "peft_model_config": "PEFT/LoRA adapters are a protected key ([[models]] lora, in the "
                         "config file)",
    "worker_ip": "placement on workers: Corral is one node (see [cluster] for fronts)",
    "gpu_idx": "placement on GPUs: Corral places layers by its memory budget",
    "replica_config": "per-replica placement: Corral is one node",
    "request_limits": "request limits: use a key's max_concurrent ([[keys]])",
    "enable_thinking": "a launch-time thinking switch: send chat_template_kwargs per call",
    "model_path": "model_path: name a model Corral serves (its scan roots or cache)",
}
# Xinference's launch keywords for what a runtime model may set.
_ALIASES = {"n_ctx": "ctx_size", "context_length": "ctx_size", "n_parallel": "parallel"}


class LaunchFailed(CorralError):
    status = 503
    code = "model_load_failed"
    type = "unavailable_error"


def xinference(handler: Handler) -> Handler:
    """Errors of ``handler`` as Xinference words them: ``{"detail": message}``."""
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except CorralError as e:
            headers = {"X-Corral-Error": e.code}
            retry = getattr(e, "retry_after", None)
            if isinstance(retry, int | float):
                headers["Retry-After"] = str(max(1, round(retry)))
            return web.json_response({"detail": public_message(e)}, status=e.status,
                                     headers=headers)
    # /openapi.json documents this envelope for the route (proxy/ops/openapi.py).
    wrapped.error_envelope = "xinference"  # type: ignore[attr-defined]
    return wrapped


def _admin() -> None:
    key = tenants.current()
    if key is not None and not key.admin:
        raise Forbidden(f"key '{key.name}' is not an admin key")


async def _json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    return jsonc.loads_object(raw) if raw else {}


def is_client(request: web.Request) -> bool:
    """Whether the caller looks like xinference-client: its sync client is ``requests``,
    its async one aiohttp; ``?xinference=1`` asks for the fields from anything. An
    OpenAI SDK (httpx, "OpenAI/Python") gets OpenAI's shape alone."""
    ua = request.headers.get("User-Agent", "")
    return (ua.startswith("python-requests/") or "aiohttp/" in ua
            or request.query.get("xinference") in ("1", "true"))


def describe(app: web.Application, name: str, cfg: ModelConfig) -> dict[str, Any]:
    """Xinference's model description fields for a Corral model."""
    caps = capabilities(cfg)
    if "embedding" in caps and "chat" not in caps:
        kind, ability = "embedding", ["embed"]
    elif "rerank" in caps:
        kind, ability = "rerank", ["rerank"]
    else:
        kind = "LLM"
        ability = ["generate", "chat", *(["vision"] if "vision" in caps else []),
                   *(["tools"] if "tools" in caps else [])]
    scheduler = app[SCHEDULER]
    ctx = scheduler.contexts(cfg.name)
    return {"model_type": kind, "model_name": name, "model_ability": ability,
            "model_engine": "llama.cpp", "model_format": "ggufv2",
            "model_hub": "huggingface" if cfg.hf_repo else "local",
            "context_length": ctx.default if ctx else None,
            "replica": len(scheduler.loaded(cfg.name)), "address": "", "accelerators": []}


# -- launch, describe, terminate ----------------------------------------------------------


def _launch_params(body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The runtime parameters of a launch body and its replica count; BadRequest for
    what cannot map."""
    for key, why in _UNMAPPABLE.items():
        if body.get(key) not in (None, False, [], {}):
            raise BadRequest(f"'{key}' cannot map onto Corral: {why}")
    engine = body.get("model_engine")
    if engine is not None and str(engine).lower() not in ENGINES:
        raise BadRequest(f"model_engine '{engine}' is not an engine Corral runs; Corral runs "
                         "llama.cpp (llama-server): use model_engine='llama.cpp'")
    kind = body.get("model_type")
    if kind not in (None, "LLM", "embedding", "rerank"):
        raise BadRequest(f"model_type '{kind}' cannot map: Corral launches LLM, embedding "
                         "and rerank models through this API")
    if body.get("n_worker") not in (None, 1):
        raise BadRequest("'n_worker' cannot map onto Corral: one model runs on one node")
    if body.get("n_gpu") not in (None, "auto") and not isinstance(body.get("n_gpu"), int):
        raise BadRequest("'n_gpu' must be \"auto\" or a number")
    replica = body.get("replica", 1)
    if not isinstance(replica, int) or isinstance(replica, bool) or replica < 1:
        raise BadRequest("'replica' must be a whole number of at least 1")
    params: dict[str, Any] = {}
    for key, value in body.items():
        if key in _PASSIVE or key in _UNMAPPABLE or value is None:
            continue
        params[_ALIASES.get(key, key)] = value
    return params, replica


def _uid_for(name: str, params: dict[str, Any]) -> str:
    """A launch with parameters and no uid gets a name of its own: "<model>-ctx2048"."""
    short = {"ctx_size": "ctx", "parallel": "p", "ttl": "ttl", "priority": "prio"}
    parts = [f"{short[k]}{params[k]}" for k in short if k in params]
    return re.sub(r"[^A-Za-z0-9._:/@+-]", "-", "-".join([name, *parts]))


@xinference
async def launch(request: web.Request) -> web.Response:
    _admin()
    app = request.app
    body = await _json(request)
    name = body.get("model_name")
    if not isinstance(name, str) or not name:
        raise BadRequest("'model_name' is required")
    params, replica = _launch_params(body)
    uid = body.get("model_uid") or None
    if uid is not None and not isinstance(uid, str):
        raise BadRequest("'model_uid' must be a string")
    scheduler, runtime = app[SCHEDULER], app[RUNTIME_MODELS]
    if params or (uid is not None and uid != name and uid not in scheduler.names()):
        # A model of its own: a runtime model over the named one's file.
        check_params(params)
        uid = uid or _uid_for(name, params)
        same = runtime.get(uid)
        if same is not None and (same.source, dict(same.params)) == (name, params):
            op = None  # launched again as it was: its instances stay
        else:
            if same is not None:
                await runtime.delete(uid)  # a relaunch with other parameters replaces it
            # Xinference's launched model stays loaded, with its replicas, until
            # terminated (an hf.co/... name is pulled first, in the operation).
            _, out = await lifecycle.create_runtime(app, uid, name, params, load=True,
                                                    scale=replica)
            op = app[OPERATIONS].get(out["operation"]["id"])
    else:
        uid = scheduler.resolve(uid or name).name
        op = None
    if op is None:
        scheduler.scale_to(uid, replica)
        op = lifecycle.start_load(app, uid)
    if request.query.get("wait_ready", "true").lower() not in ("false", "0", "no"):
        if op.task is not None:
            # asyncio.wait: a client that hangs up leaves the load running.
            await asyncio.wait({op.task})
        if op.state == "failed":
            raise LaunchFailed(op.error or f"the launch of '{uid}' failed")
        if op.state == "cancelled":
            raise LaunchFailed(f"the launch of '{uid}' was cancelled")
    return web.json_response({"model_uid": uid, "operation": op.id})


@xinference
async def terminate(request: web.Request) -> web.Response:
    """Unload the model; a runtime model is removed too (its uid is gone after)."""
    _admin()
    app = request.app
    name = lifecycle.model_name(request, "uid")
    await lifecycle.cancel_model(app, name)
    await app[SCHEDULER].unload(name)
    if name in app[RUNTIME_MODELS]:
        await app[RUNTIME_MODELS].delete(name)
    app[OPERATIONS].forget(name)
    return web.json_response({})


# -- progress, cancel, replicas, events, runtime --------------------------------------------


def _uid(request: web.Request) -> str:
    """The model a uid names, or a uid whose model is still being downloaded (it exists
    only as an operation yet: for an admin key)."""
    try:
        return lifecycle.model_name(request, "uid")
    except UnknownModel:
        uid = request.match_info["uid"]
        if not request.app[OPERATIONS].of_model(uid):
            raise
        _admin()
        return uid


@xinference
async def progress(request: web.Request) -> web.Response:
    """Xinference's launch progress in [0, 1]: a download counts for the first half of a
    runtime model's launch; Corral's state and operation ride along."""
    app = request.app
    name = _uid(request)
    ops = app[OPERATIONS].of_model(name)
    op = lifecycle.view(app, ops[-1]) if ops else None
    state = op["state"] if op else (
        "ready" if any(i.state is State.READY for i in app[SCHEDULER].loaded(name))
        else "queued")
    value = {"ready": 1.0, "queued": 0.0, "failed": 0.0, "cancelled": 0.0}.get(state)
    if state == "downloading" and op is not None:
        b = op["bytes"]
        value = 0.5 * b["completed"] / b["total"] if b["total"] else 0.0
    elif state == "loading" and op is not None:
        value = op["estimate"]["progress"]
        if op["kind"] == "create":
            value = 0.5 + value / 2
    return web.json_response({"progress": value, "state": state,
                              "error": op["error"] if op else None,
                              "operation": op["id"] if op else None})


@xinference
async def cancel(request: web.Request) -> web.Response:
    _admin()
    name = _uid(request)
    return web.json_response(await lifecycle.cancel_model(request.app, name))


@xinference
async def add_replicas(request: web.Request) -> web.Response:
    _admin()
    name = lifecycle.model_name(request, "uid")
    body = await _json(request)
    for key in ("replica_config",):
        if body.get(key) is not None:
            raise BadRequest(f"'{key}' cannot map onto Corral: {_UNMAPPABLE[key]}")
    engine = body.get("model_engine")
    if engine is not None and str(engine).lower() not in ENGINES:
        raise BadRequest(f"model_engine '{engine}' is not an engine Corral runs")
    count = body.get("replica", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise BadRequest("'replica' must be a whole number of at least 1")
    scheduler = request.app[SCHEDULER]
    added = [scheduler.add_replica(name) for _ in range(count)]  # None: pending room
    replicas = [{"model_uid": name, "replica_id": _replica_number(iid), "instance": iid}
                for iid in added]
    total = len(scheduler.loaded(name))
    if count == 1:
        return web.json_response({**replicas[0], "replica": total})
    return web.json_response({"replica": total, "replicas": replicas})


def _replica_number(iid: str | None) -> int | None:
    return int(iid.rsplit("#", 1)[1]) if iid and iid.rsplit("#", 1)[-1].isdigit() else None


@xinference
async def remove_replica(request: web.Request) -> web.Response:
    _admin()
    name = lifecycle.model_name(request, "uid")
    rid = request.match_info["replica"]
    iid = f"{name}#{rid}" if rid.isdigit() else rid
    removed, left = request.app[SCHEDULER].remove_replica(name, iid)
    return web.json_response({"model_uid": name, "replica_id": _replica_number(removed),
                              "remaining_replicas": left})


@xinference
async def events(request: web.Request) -> web.StreamResponse:
    """Xinference's list of a model's events; Corral's SSE stream when asked for one."""
    _admin()
    name = lifecycle.model_name(request, "uid")
    if "text/event-stream" in request.headers.get("Accept", ""):
        return await lifecycle.stream_events(request, name)
    out = [{"event_type": "INFO", "event_ts": int(e["time"]),  # type: ignore[call-overload]
            "event_content": f"{e['event']}: {e.get('detail') or e.get('reason') or ''}"
            .rstrip(": "), **e}
           for e in request.app[METRICS].events if e.get("model") == name]
    return web.json_response(out)


@xinference
async def runtime_info(request: web.Request) -> web.Response:
    """The running model as Corral sees it: state, instances, replicas, context, load
    estimate (the admin API's model view)."""
    _admin()
    name = lifecycle.model_name(request, "uid")
    for m in request.app[SCHEDULER].model_status():
        if m["name"] == name:
            return web.json_response(m)
    raise BadRequest(f"model '{name}' is gone")


@xinference
async def abort(request: web.Request) -> web.Response:
    _admin()
    lifecycle.model_name(request, "uid")  # an unknown uid is a 404
    request_id = request.match_info["request_id"]
    body = await _json(request)
    block = body.get("block_duration", 30)
    if not isinstance(block, int | float) or isinstance(block, bool) or block < 0:
        raise BadRequest("'block_duration' must be a number of seconds")
    # Corral's cancel (proxy/ops/inflight.py), by X-Request-Id or the body's request_id.
    found = inflight.cancel(request.app, request_id)
    # Xinference's abort of a call that has finished or is unknown is a no-op.
    return web.json_response({"aborted": found})


# -- the cluster ---------------------------------------------------------------------------


def _node(app: web.Application) -> dict[str, Any]:
    vm = psutil.virtual_memory()
    return {"node_type": "Supervisor", "ip_address": "127.0.0.1",
            "gpu_count": 1 if app[SCHEDULER].vram_budget is not None else 0,
            "gpu_vram_total": app[SCHEDULER].vram_budget or 0,
            "cpu_count": os.cpu_count() or 1, "mem_total": int(vm.total),
            "mem_available": int(vm.available), "mem_used": int(vm.total - vm.available)}


@xinference
async def cluster_auth(request: web.Request) -> web.Response:
    return web.json_response({"auth": request.app[SCHEDULER].tenants.enabled})


@xinference
async def cluster_info(request: web.Request) -> web.Response:
    _admin()
    node = _node(request.app)
    return web.json_response([node, {**node, "node_type": "Worker"}])


@xinference
async def cluster_devices(request: web.Request) -> web.Response:
    return web.json_response(_node(request.app)["gpu_count"])


@xinference
async def workers(request: web.Request) -> web.Response:
    _admin()
    scheduler = request.app[SCHEDULER]
    models = [{"model_uid": i.model, "replica_id": _replica_number(i.id), "state": str(i.state),
               "in_flight": i.in_flight, "slots": i.slots} for i in scheduler.instances()]
    estimate = {}
    for n in scheduler.loading():
        expected, elapsed = scheduler.load_estimate(n)
        estimate[n] = loadcost.remaining(expected, elapsed or 0.0)
    return web.json_response([{**_node(request.app), "node_type": "Worker",
                               "version": __version__, "models": models,
                               "loading": estimate}])


def add_routes(app: web.Application) -> None:
    """Before the OpenAI routes: ``GET /v1/models/{model:.+}`` would take these paths."""
    r = app.router
    m = "/v1/models/{uid:.+}"
    r.add_post("/v1/models", launch)
    r.add_get(m + "/progress", progress)
    r.add_post(m + "/cancel", cancel)
    r.add_post(m + "/replicas", add_replicas)
    r.add_delete(m + "/replicas/{replica}", remove_replica)
    r.add_get(m + "/events", events)
    r.add_get(m + "/runtime", runtime_info)
    r.add_post(m + "/requests/{request_id}/abort", abort)
    r.add_delete(m, terminate)
    r.add_get("/v1/cluster/auth", cluster_auth)
    r.add_get("/v1/cluster/info", cluster_info)
    r.add_get("/v1/cluster/devices", cluster_devices)
    r.add_get("/v1/workers", workers)

