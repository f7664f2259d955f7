"""Admin API and dashboard on the main port. Reference: docs/admin-api.md.

Behind the API key when one is set (the auth middleware covers every path but
/health, / and the dashboard's static files, which hold no data: the page asks for
the key and sends it as a bearer token). Answers JSON; errors in the OpenAI
envelope like the rest of the port. Handlers stay thin: the scheduler, the metrics
and the reloader do the work.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import psutil
from aiohttp import web

from proxy import __version__
from proxy.edge.guard import Forbidden
from proxy.edge.reqlog import note_model
from proxy.keys import CONFIG, DISCOVERY, SCHEDULER
from proxy.metrics.registry import METRICS
from proxy.metrics.scrape import resident_memory
from proxy.ops import config_edit, inflight, lifecycle
from proxy.ops.reload import RELOADER
from scheduler.config import secrets
from scheduler.config.root import CorralConfig
from scheduler.errors import BadRequest, ConfigError, NotFound
from scheduler.process.instance import Instance, State

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "dashboard"
DASHBOARD_FILES = {
    "": ("index.html", "text/html"),
    "index.html": ("index.html", "text/html"),
    "app.js": ("app.js", "text/javascript"),
    "style.css": ("style.css", "text/css"),
    # The dashboard's ES modules (proxy/ops is their API) and the vendored uPlot.
    **{n: (n, "text/javascript") for n in (
        "charts.js", "playground.js", "config.js", "models.js", "keys.js", "requests.js",
        "util.js", "uplot.min.js")},
    "uplot.min.css": ("uplot.min.css", "text/css"),
    "favicon.svg": ("favicon.svg", "image/svg+xml"),
}
DASHBOARD_PATHS = tuple(f"/dashboard/{n}" for n in DASHBOARD_FILES)

# How often a followed log is checked for new lines, and how often an idle stream
# sends a comment so that proxies in between do not time it out.
_FOLLOW_INTERVAL = 0.25
_HEARTBEAT = 15.0
_CLOSING = web.AppKey("admin_closing", asyncio.Event)


def _int_query(request: web.Request, name: str, default: int) -> int:
    try:
        return int(request.query.get(name, default))
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("1", "true", "yes")


def _model_name(request: web.Request) -> str:
    """The configured name behind the {model:.+} in the path (an alias resolves)."""
    name = request.app[SCHEDULER].resolve(request.match_info["model"]).name
    note_model(name)
    return name


def _instance(request: web.Request) -> Instance:
    iid = request.match_info["instance"]
    for inst in request.app[SCHEDULER].instances():
        if inst.id == iid:
            return inst
    raise NotFound(f"no instance {iid!r}")


async def _memory(instances: Iterable[Instance]) -> dict[str, int]:
    pids = {i.id: i.pid for i in instances if i.pid is not None}
    return await asyncio.to_thread(resident_memory, pids) if pids else {}


def _with_memory(desc: dict[str, object], rss: dict[str, int]) -> dict[str, object]:
    return {**desc, "resident_memory_bytes": rss.get(str(desc["id"]))}


async def models_view(request: web.Request) -> list[dict[str, object]]:
    scheduler = request.app[SCHEDULER]
    rss = await _memory(scheduler.instances())
    out = []
    for ms in scheduler.model_status():
        cfg = scheduler.config.model(str(ms["name"]))
        insts = cast(list[dict[str, object]], ms["instances"])
        extra: dict[str, object] = {}
        if cfg is not None:
            extra = {"ctx_size": cfg.ctx_size, "parallel": cfg.parallel,
                     "ttl": scheduler.config.ttl(cfg)}
        out.append({**ms, **extra, "instances": [_with_memory(i, rss) for i in insts]})
    # A launch error carries the child's log tail, which may quote its env.
    scrubbed: list[dict[str, object]] = secrets.scrub_data(out, known_secrets(request))
    return scrubbed


# -- models -------------------------------------------------------------------------


async def models(request: web.Request) -> web.Response:
    found = request.app.get(DISCOVERY)
    # Files the directory scan skipped (not GGUF, a link leaving the tree, ...).
    problems = list(found.problems) if found is not None else []
    return web.json_response({"models": await models_view(request),
                              "scan_problems": problems})


async def model(request: web.Request) -> web.Response:
    name = _model_name(request)
    for m in await models_view(request):
        if m["name"] == name:
            return web.json_response(m)
    raise NotFound(f"model {name!r} is gone")  # removed by a reload meanwhile


async def unload(request: web.Request) -> web.Response:
    """Drains: running calls finish, then the instances stop."""
    name = _model_name(request)
    n = await request.app[SCHEDULER].unload(name)
    return web.json_response({"model": name, "stopping": n})


async def restart(request: web.Request) -> web.Response:
    """Unload (the instances drain), then a load to follow, as ``load`` answers (202
    and its operation); ``?wait=1``: when the new instance is ready."""
    name = _model_name(request)
    scheduler = request.app[SCHEDULER]
    n = await scheduler.unload(name)
    if lifecycle.waits(request):
        up = await scheduler.load(name)
        return web.json_response({"model": name, "stopping": n, "instance": up.instance_id,
                                  "waited_seconds": round(up.waited, 3)})
    op = lifecycle.start_load(request.app, name)
    return web.json_response({"model": name, "stopping": n,
                              "operation": lifecycle.view(request.app, op)}, status=202)


async def reset(request: web.Request) -> web.Response:
    name = _model_name(request)
    request.app[SCHEDULER].reset(name)
    return web.json_response({"model": name, "reset": True})


async def drain(request: web.Request) -> web.Response:
    """Every model's instances drain and stop. A later call launches again."""
    scheduler = request.app[SCHEDULER]
    stopping = {}
    for m in scheduler.config.models:
        stopping[m.name] = await scheduler.unload(m.name)
    return web.json_response({"stopping": stopping})


# -- instances and logs -------------------------------------------------------------------


async def instances(request: web.Request) -> web.Response:
    insts = request.app[SCHEDULER].instances()
    rss = await _memory(insts)
    return web.json_response({"instances": [_with_memory(i.describe(), rss) for i in insts]})


async def instance(request: web.Request) -> web.Response:
    inst = _instance(request)
    rss = await _memory([inst])
    return web.json_response(_with_memory(inst.describe(), rss))


def known_secrets(request: web.Request) -> tuple[str, ...]:
    """Every secret of the running config: what a child's log or a launch error
    must not show even when the child printed it (its env holds a model's token)."""
    cfg = request.app[SCHEDULER].config
    return tuple(secrets.values(cfg.model_dump(mode="json")) | cfg.credentials())


async def logs(request: web.Request) -> web.StreamResponse:
    inst = _instance(request)
    tail = _int_query(request, "tail", 100)
    known = known_secrets(request)
    if not _flag(request, "follow"):
        lines = list(inst.log)[-tail:] if tail > 0 else []
        return web.json_response({"instance": inst.id,
                                  "lines": secrets.scrub_data(lines, known)})
    return await _follow(request, inst, tail, known)


class LogCursor:
    """Follows an instance's log ring (a deque that drops old lines as new ones come).

    The ring has no sequence numbers, so the cursor remembers the last few line
    *objects* it sent and finds them again by identity: a new line is a new str
    object even when its text repeats. (CPython shares "" and one-character strings,
    hence a run of three, not one.)
    """

    _RUN = 3

    def __init__(self, ring: Sequence[str]) -> None:
        self._ring = ring
        self._last: tuple[str, ...] = ()

    def tail(self, n: int) -> list[str]:
        lines = list(self._ring)
        self._last = tuple(lines[-self._RUN:])
        return lines[-n:] if n > 0 else []

    def new_lines(self) -> list[str]:
        lines = list(self._ring)
        start = self._find(lines)
        self._last = tuple(lines[-self._RUN:])
        return lines[start:]

    def _find(self, lines: list[str]) -> int:
        """Where the unsent lines start: just after the remembered run, of which the
        oldest lines may have rotated out of the ring meanwhile."""
        last = self._last
        for end in range(len(lines), 0, -1):
            if all(lines[end - j] is last[-j] for j in range(1, len(last) + 1) if end - j >= 0):
                return end
        return 0  # everything sent has rotated out: all lines are new


def _sse_lines(lines: Iterable[str]) -> bytes:
    return b"".join(b"data: " + ln.replace("\r", "").encode() + b"\n\n" for ln in lines)


async def _follow(request: web.Request, inst: Instance, tail: int,
                  known: tuple[str, ...]) -> web.StreamResponse:
    """Server-sent events: the last ``tail`` lines, then each new line, then an
    ``end`` event when the instance has stopped (or Corral shuts down)."""
    resp = web.StreamResponse(headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    resp.content_type = "text/event-stream"
    await resp.prepare(request)
    closing = request.app[_CLOSING]
    cursor = LogCursor(inst.log)
    await resp.write(_sse_lines(secrets.scrub_data(cursor.tail(tail), known))
                     or b": following\n\n")
    quiet = 0.0
    try:
        while True:
            ended = inst.state in (State.STOPPED, State.FAILED)
            lines = cursor.new_lines()
            if lines:
                await resp.write(_sse_lines(secrets.scrub_data(lines, known)))
                quiet = 0.0
            if ended or closing.is_set():
                reason = f"instance {inst.state}" if ended else "corral shutting down"
                await resp.write(b"event: end\ndata: " + reason.encode() + b"\n\n")
                break
            quiet += _FOLLOW_INTERVAL
            if quiet >= _HEARTBEAT:
                await resp.write(b": keep-alive\n\n")
                quiet = 0.0
            await asyncio.sleep(_FOLLOW_INTERVAL)
    except ConnectionResetError:
        return resp  # the reader went away
    await resp.write_eof()
    return resp


# -- recent activity ---------------------------------------------------------------------


async def events(request: web.Request) -> web.Response:
    limit = _int_query(request, "limit", 50)
    ring = list(request.app[METRICS].events)
    return web.json_response({"events": list(reversed(ring[-limit:])) if limit > 0 else []})


def _system_memory() -> dict[str, int]:
    vm = psutil.virtual_memory()
    return {"total_bytes": int(vm.total), "available_bytes": int(vm.available),
            "corral_resident_bytes": int(psutil.Process(os.getpid()).memory_info().rss)}


async def overview(request: web.Request) -> web.Response:
    """Everything the dashboard shows, in one call (it polls this every second)."""
    app = request.app
    scheduler = app[SCHEDULER]
    metrics = app[METRICS]
    memory = await asyncio.to_thread(_system_memory)
    memory["budget_bytes"] = scheduler.memory_budget or 0
    return web.json_response({
        "version": __version__,
        "time": round(time.time(), 3),
        "memory": memory,
        "models": await models_view(request),
        "requests": metrics.recent_requests(30),
        "events": list(reversed(list(metrics.events)[-20:])),
        "config": app[RELOADER].status(),
    })


# -- config ---------------------------------------------------------------------------


def _redacted(data: dict[str, Any], cfg: CorralConfig | None = None) -> dict[str, Any]:
    out: dict[str, Any] = secrets.redact(data)
    if cfg is not None:
        # What the naming rule cannot see in a dump: an upstream key quoted elsewhere.
        out = secrets.scrub_data(out, cfg.credentials())
    return out


async def get_config(request: web.Request) -> web.Response:
    reloader = request.app[RELOADER]
    cfg = reloader.current.model_dump(mode="json")
    return web.json_response({**reloader.status(),
                              "config": _redacted(cfg, reloader.current)})


async def providers(request: web.Request) -> web.Response:
    """Each [[providers]] entry: reachable or not, why, and the models it lists."""
    return web.json_response({"providers": request.app[SCHEDULER].providers.status()})


async def get_config_file(request: web.Request) -> web.Response:
    """The config file as it is on disk (what PUT /admin/config replaces)."""
    path = request.app[RELOADER].path
    if path is None:
        raise NotFound("Corral was started without a config file")
    try:
        text = await asyncio.to_thread(path.read_text, encoding="utf-8")
    except OSError as e:
        raise NotFound(f"{path}: {e.strerror or e}") from None
    # Every secret (the running config's and the file's own) replaced, as
    # ``_redacted`` does for the parsed view.
    return web.Response(text=config_edit.redact_text(text, request.app[RELOADER].current),
                        content_type="application/toml")


async def put_config(request: web.Request) -> web.Response:
    """Replace the config file with the TOML body (validated first; the old file is
    kept as .bak) and reload it."""
    reloader = request.app[RELOADER]
    # The listeners' [server] section, not the file's: turning writes on takes a
    # restart, and a write can never turn them on (scheduler/config/writable.py).
    if not request.app[CONFIG].server.admin_config_write:
        raise Forbidden(
            "writing the config over HTTP is off; set [server] admin_config_write = true "
            "in the config file and restart Corral to allow it"
        )
    # The page edits the redacted file: its placeholders become the running keys again.
    _path, text, _original = await config_edit.edited_text(request)
    try:
        outcome = await reloader.write(text)
    except ConfigError as e:
        raise BadRequest(f"invalid configuration, nothing written:\n{e.message}") from None
    return web.json_response(outcome.as_dict(), status=200 if outcome.ok else 422)


async def api_keys(request: web.Request) -> web.Response:
    """Every configured key (never its secret), its limits and its usage."""
    return web.json_response({"keys": request.app[SCHEDULER].tenants.view()})


async def reload_config(request: web.Request) -> web.Response:
    outcome = await request.app[RELOADER].reload("admin")
    return web.json_response(outcome.as_dict(), status=200 if outcome.ok else 422)


# -- dashboard -----------------------------------------------------------------------------


async def dashboard(request: web.Request) -> web.StreamResponse:
    entry = DASHBOARD_FILES.get(request.path.removeprefix("/dashboard/"))
    if entry is None:
        raise NotFound(f"no dashboard file {request.path!r}")
    name, content_type = entry
    return web.FileResponse(DASHBOARD_DIR / name, headers={
        "Content-Type": content_type + "; charset=utf-8", "Cache-Control": "no-cache"})


async def root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/dashboard/")


async def _closing(app: web.Application) -> None:
    app[_CLOSING].set()


def add_routes(app: web.Application) -> None:
    # Ends followed logs at shutdown instead of holding it for the drain timeout.
    app[_CLOSING] = asyncio.Event()
    app.on_shutdown.append(_closing)
    r = app.router
    r.add_get("/admin/overview", overview)
    r.add_get("/admin/models", models)
    # Load, cancel, replicas, events, operations, runtime models (non-blocking).
    lifecycle.add_routes(app)
    r.add_get("/admin/models/{model:.+}", model)
    r.add_post("/admin/models/{model:.+}/unload", unload)
    r.add_post("/admin/models/{model:.+}/restart", restart)
    r.add_post("/admin/models/{model:.+}/reset", reset)
    r.add_post("/admin/models/{model:.+}/drain", unload)
    r.add_post("/admin/drain", drain)
    r.add_get("/admin/instances", instances)
    r.add_get("/admin/instances/{instance}", instance)
    r.add_get("/admin/instances/{instance}/logs", logs)
    # The request list, captures, cancel and replay (proxy/ops/inflight.py).
    inflight.add_routes(app)
    r.add_get("/admin/events", events)
    r.add_get("/admin/config", get_config)
    r.add_get("/admin/providers", providers)
    r.add_put("/admin/config", put_config)
    r.add_get("/admin/config/file", get_config_file)
    r.add_post("/admin/config/reload", reload_config)
    r.add_get("/admin/keys", api_keys)
    # One plain route per file (no "/dashboard/{name}"): proxy/app.py opens exactly
    # these to keyless callers, and any other name is a 401 without a key.
    for path in DASHBOARD_PATHS:
        r.add_get(path, dashboard)
    r.add_get("/dashboard", root)
    r.add_get("/", root)
