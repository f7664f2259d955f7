"""LM Studio routes (port 1234): /v1 pass-through. See docs/compatibility.md."""

from __future__ import annotations

from aiohttp import web

from proxy import openai


def build_app(core: web.Application) -> web.Application:
    from proxy.app import build_port_app

    app = build_port_app(core, "lmstudio")
    openai.add_routes(app)
    return app
