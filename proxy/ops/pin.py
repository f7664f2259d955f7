"""Pin and unpin a model from the dashboard: ``POST /admin/models/{model}/pin`` and
``.../unpin``.

Pinning is a config setting (``evictable = false`` on the model: one instance kept
loaded from start, never evicted, preempted or expired), so it survives a restart.
The action edits that one key of the model's ``[[models]]`` table in the file on disk
and goes through the same write as ``PUT /admin/config``: validated (the allow-list
included), the previous file kept as ``.bak``, reloaded. It therefore needs
``[server] admin_config_write = true``, and works for models defined in the main
file (not ``models.d/`` or discovered ones, which say so).
"""

from __future__ import annotations

import re

from aiohttp import web

from proxy.edge.guard import Forbidden
from proxy.keys import CONFIG, SCHEDULER
from proxy.ops.config_edit import read_original
from proxy.ops.reload import RELOADER, NoConfigFile
from scheduler.errors import BadRequest, ConfigError

PIN_KEY = "evictable"
_HEADER = re.compile(r"^\s*\[")
_MODELS = re.compile(r"^\s*\[\[\s*models\s*\]\]\s*(#.*)?$")


def set_model_key(text: str, model: str, key: str, value: str) -> str:
    """``text`` with ``key = value`` in the ``[[models]]`` table named ``model``: the
    key's line replaced when it is there, else a line added after the name. Raises
    BadRequest when no such table is in ``text``."""
    lines = text.splitlines(keepends=True)
    name = re.compile(r"^\s*name\s*=\s*[\"']" + re.escape(model) + r"[\"']\s*(#.*)?$")
    own = re.compile(r"^\s*" + re.escape(key) + r"\s*=")
    start = None
    for i, line in enumerate(lines):
        if _MODELS.match(line):
            start = i
        elif start is not None and _HEADER.match(line):
            start = None  # a sub-table or another section: not this model's keys
        elif start is not None and name.match(line):
            end = next((j for j in range(i + 1, len(lines)) if _HEADER.match(lines[j])),
                       len(lines))
            for j in range(start + 1, end):
                if own.match(lines[j]):
                    newline = "\n" if lines[j].endswith("\n") else ""
                    lines[j] = f"{key} = {value}{newline}"
                    return "".join(lines)
            newline = "" if line.endswith("\n") else "\n"
            lines[i] = f"{line}{newline}{key} = {value}\n"
            return "".join(lines)
    raise BadRequest(
        f"model {model!r} is not a [[models]] table of the main config file (a models.d "
        f"file or a discovered model): set {key} there by hand"
    )


async def set_pinned(app: web.Application, model: str,
                     pinned: bool) -> tuple[dict[str, object], bool]:
    """Pin or unpin ``model`` in the config file: (the answer, whether the reload took
    it). Shared by the admin route and Corral's own MCP server (proxy/tools/server.py)."""
    if not app[CONFIG].server.admin_config_write:
        raise Forbidden(
            "pinning is a config setting (evictable = false) and writing the config over "
            "HTTP is off; set [server] admin_config_write = true and restart Corral, or "
            "edit the file"
        )
    reloader = app[RELOADER]
    if reloader.path is None:
        raise NoConfigFile("Corral was started without a config file to write")
    name = app[SCHEDULER].resolve(model).name
    original = await read_original(reloader.path)
    text = set_model_key(original, name, PIN_KEY, "false" if pinned else "true")
    try:
        outcome = await reloader.write(text)
    except ConfigError as e:
        raise BadRequest(f"cannot {'pin' if pinned else 'unpin'} {name}:\n{e.message}") from None
    return {"model": name, "pinned": pinned, "reload": outcome.as_dict()}, outcome.ok


async def _set(request: web.Request, pinned: bool) -> web.Response:
    answer, ok = await set_pinned(request.app, request.match_info["model"], pinned)
    return web.json_response(answer, status=200 if ok else 422)


async def pin(request: web.Request) -> web.Response:
    return await _set(request, True)


async def unpin(request: web.Request) -> web.Response:
    return await _set(request, False)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/admin/models/{model:.+}/pin", pin)
    app.router.add_post("/admin/models/{model:.+}/unpin", unpin)
