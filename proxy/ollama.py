"""Ollama routes (port 11434): translation both ways. See docs/compatibility.md."""

from __future__ import annotations

from aiohttp import web

from proxy import openai

VERSION = "0.12.6"


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def version(request: web.Request) -> web.Response:
    # Purely numeric: Open WebUI parses it with map(int, ...).
    return web.json_response({"version": VERSION})


def build_app(core: web.Application) -> web.Application:
    from proxy.app import build_port_app

    app = build_port_app(core, "ollama")
    app.router.add_get("/", root)
    app.router.add_get("/api/version", version)
    openai.add_routes(app)
    return app
