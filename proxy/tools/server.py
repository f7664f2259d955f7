"""Corral as an MCP server: ``/mcp`` on the main port, admin keys only (docs/tools.md).

MCP's streamable HTTP, stateless: each POST carries one JSON-RPC message and gets its
answer as JSON (``initialize``, ``ping``, ``tools/list``, ``tools/call``); a
notification gets 202; GET and DELETE get 405 (no server-initiated stream, no session
to end). The ``server/discover`` probe of the newer SDKs gets "method not found", so
they use the ``initialize`` handshake. The guard keeps ``/mcp`` behind an admin key
(proxy/edge/guard.py ``ADMIN_PREFIXES``) and checks Host and Origin as for any route.

Tools: ``list_models``, ``load_model``, ``unload_model``, ``pin_model``,
``instance_log``, ``metrics_summary``, ``run_prompt``. A tool that fails answers
``isError`` with the reason, as MCP asks, never an HTTP error.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from proxy import __version__
from proxy.calls import upstream
from proxy.calls.call import Call
from proxy.dialects.families.chat import choice
from proxy.edge import body as bodies
from proxy.edge import jsonc
from proxy.keys import SCHEDULER
from proxy.metrics.registry import METRICS
from proxy.ops import admin
from proxy.ops.pin import set_pinned
from proxy.tools.loop import read_answer
from scheduler.config import secrets
from scheduler.errors import CorralError, NotFound

PATH = "/mcp"
# Handshake revisions this server answers in; another asked is answered with the newest.
VERSIONS = ("2025-03-26", "2025-06-18", "2025-11-25")
MAX_BODY = 1 << 20

Tool = Callable[[web.Request, dict[str, Any]], Awaitable[Any]]


def _schema(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(required)}


_MODEL = {"model": {"type": "string", "description": "a configured model name or alias"}}


async def list_models(request: web.Request, args: dict[str, Any]) -> Any:
    return await admin.models_view(request)


async def load_model(request: web.Request, args: dict[str, Any]) -> Any:
    up = await request.app[SCHEDULER].load(_str(args, "model"))
    return {"model": up.model, "instance": up.instance_id,
            "waited_seconds": round(up.waited, 3)}


async def unload_model(request: web.Request, args: dict[str, Any]) -> Any:
    name = _str(args, "model")
    return {"model": name, "stopping": await request.app[SCHEDULER].unload(name)}


async def pin_model(request: web.Request, args: dict[str, Any]) -> Any:
    answer, _ = await set_pinned(request.app, _str(args, "model"),
                                 args.get("pinned") is not False)
    return answer


async def instance_log(request: web.Request, args: dict[str, Any]) -> Any:
    iid = _str(args, "instance")
    tail = args.get("tail", 100)
    tail = tail if isinstance(tail, int) and not isinstance(tail, bool) else 100
    for inst in request.app[SCHEDULER].instances():
        if inst.id == iid:
            lines = list(inst.log)[-tail:] if tail > 0 else []
            return {"instance": iid, "lines": secrets.scrub_data(
                lines, admin.known_secrets(request))}
    raise NotFound(f"no instance {iid!r}")


async def metrics_summary(request: web.Request, args: dict[str, Any]) -> Any:
    metrics = request.app[METRICS]
    calls: dict[str, dict[str, int]] = {}
    for (model, _dialect, _endpoint, status), stats in metrics.calls.items():
        per = calls.setdefault(model or "-", {})
        per[str(status)] = per.get(str(status), 0) + stats.count
    return {"calls_by_model_and_status": calls, "recent_requests": metrics.recent_requests(10),
            "recent_events": list(metrics.events)[-10:]}


async def run_prompt(request: web.Request, args: dict[str, Any]) -> Any:
    model = _str(args, "model")
    max_tokens = args.get("max_tokens", 256)
    body = {"model": model, "messages": [{"role": "user", "content": _str(args, "prompt")}],
            "max_tokens": max_tokens if isinstance(max_tokens, int) else 256, "stream": False}
    request.app[SCHEDULER].resolve(model)
    answer = await upstream.call_app(request.app, Call(
        model=model, path="/v1/chat/completions", payload=body), read_answer)
    msg = choice(answer).get("message") or {}
    return {"model": model, "text": msg.get("content") or "", "usage": answer.get("usage")}


TOOLS: dict[str, tuple[Tool, str, dict[str, Any]]] = {
    "list_models": (list_models, "The configured models, their state and instances.",
                    _schema({})),
    "load_model": (load_model, "Load a model; waits until an instance is ready.",
                   _schema(_MODEL, ("model",))),
    "unload_model": (unload_model, "Unload a model: running calls finish, then it stops.",
                     _schema(_MODEL, ("model",))),
    "pin_model": (pin_model, "Pin (never evict) or unpin a model in the config file; "
                  "needs [server] admin_config_write.",
                  _schema({**_MODEL, "pinned": {"type": "boolean", "default": True}},
                          ("model",))),
    "instance_log": (instance_log, "The last lines of an instance's log (secrets removed).",
                     _schema({"instance": {"type": "string"},
                              "tail": {"type": "integer", "default": 100}}, ("instance",))),
    "metrics_summary": (metrics_summary, "Calls by model and status, recent calls and "
                        "scheduler events.", _schema({})),
    "run_prompt": (run_prompt, "Send one user prompt to a model; answers its text.",
                   _schema({**_MODEL, "prompt": {"type": "string"},
                            "max_tokens": {"type": "integer", "default": 256}},
                           ("model", "prompt"))),
}


def _str(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise _ToolInputError(f"'{key}' is required and must be a string")
    return value


class _ToolInputError(Exception):
    pass


def _tools_list() -> dict[str, Any]:
    return {"tools": [{"name": name, "description": desc, "inputSchema": schema}
                      for name, (_, desc, schema) in TOOLS.items()]}


async def _call(request: web.Request, params: dict[str, Any]) -> dict[str, Any]:
    name = params.get("name")
    entry = TOOLS.get(name) if isinstance(name, str) else None
    if entry is None:
        raise _RpcError(-32602, f"unknown tool: {name!r}")
    args = params.get("arguments") or {}
    if not isinstance(args, dict):
        raise _RpcError(-32602, "'arguments' must be an object")
    try:
        result = await entry[0](request, args)
    except (CorralError, _ToolInputError) as e:
        text = e.message if isinstance(e, CorralError) else str(e)
        return {"content": [{"type": "text", "text": text}], "isError": True}
    text = json.dumps(result, default=str)
    out: dict[str, Any] = {"content": [{"type": "text", "text": text}], "isError": False}
    if isinstance(result, dict):
        out["structuredContent"] = result
    return out


class _RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def _answer(request: web.Request, message: dict[str, Any]) -> dict[str, Any]:
    method = message.get("method")
    params = message.get("params") or {}
    if not isinstance(params, dict):
        raise _RpcError(-32602, "'params' must be an object")
    if method == "initialize":
        asked = params.get("protocolVersion")
        return {"protocolVersion": asked if asked in VERSIONS else VERSIONS[-1],
                "capabilities": {"tools": {"listChanged": False}},
                "serverInfo": {"name": "corral", "version": __version__},
                "instructions": "Manage the Corral gateway: its models, instances, logs "
                                "and metrics."}
    if method == "ping":
        return {}
    if method == "tools/list":
        return _tools_list()
    if method == "tools/call":
        return await _call(request, params)
    raise _RpcError(-32601, f"method not found: {method}")


async def handle(request: web.Request) -> web.StreamResponse:
    raw = await bodies.read(request, MAX_BODY)
    try:
        message = jsonc.loads(raw)
    except CorralError:
        return _rpc(None, error=(-32700, "parse error"))
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return _rpc(None, error=(-32600, "one JSON-RPC 2.0 message per POST"))
    if "method" not in message or "id" not in message:
        # A notification, or an answer to a request this server never sends.
        return web.Response(status=202)
    try:
        return _rpc(message["id"], result=await _answer(request, message))
    except _RpcError as e:
        return _rpc(message["id"], error=(e.code, e.message))


def _rpc(ident: Any, result: Any = None, error: tuple[int, str] | None = None
         ) -> web.Response:
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": ident}
    if error is not None:
        body["error"] = {"code": error[0], "message": error[1]}
    else:
        body["result"] = result
    return web.Response(body=jsonc.dumps(body), content_type="application/json")


async def not_allowed(request: web.Request) -> web.Response:
    return web.Response(status=405, headers={"Allow": "POST"})


def add_routes(app: web.Application) -> None:
    app.router.add_post(PATH, handle)
    app.router.add_get(PATH, not_allowed)
    app.router.add_delete(PATH, not_allowed)
