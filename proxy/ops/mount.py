"""Mounts what the dashboard needs beyond the admin API on the main port's app.

The playground and the pull form also speak Ollama's API, which lives on its own
port; the dashboard may only call its own origin (CSP ``connect-src 'self'``), so
Ollama's own handlers are mounted here too, under ``/admin/ollama/`` (behind the API
key like every admin path, errors in Ollama's envelope). They are the same
functions, not copies.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.dialects import ollama, ollama_models
from proxy.edge.errors import ROUTE_DIALECT
from proxy.ops import catalog, config_edit, pin, timeseries
from scheduler.config.root import CorralConfig

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _as_ollama(handle: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        request[ROUTE_DIALECT] = "ollama"
        return await handle(request)

    return wrapped


OLLAMA_ROWS = (
    ("/admin/ollama/api/chat", ollama.chat),
    ("/admin/ollama/api/pull", ollama_models.pull),
)


def add_dashboard_routes(app: web.Application, cfg: CorralConfig) -> None:
    timeseries.add_routes(app, cfg.server.dashboard_history)
    config_edit.add_routes(app)
    catalog.add_routes(app)
    pin.add_routes(app)
    for path, handle in OLLAMA_ROWS:
        app.router.add_post(path, _as_ollama(handle))
