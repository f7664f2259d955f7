"""Where a model-routed call meets the tool loop: a call that names configured MCP
servers is answered by its family's adapter instead of the pass-through.

The test is cheap on the hot path: a body without the bytes ``mcp`` is not parsed.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.edge import jsonc
from proxy.keys import MCP_SERVERS
from proxy.tools import anthropic, chat, loop, responses

# The paths whose calls may name MCP servers, and their family.
PATHS = {"/v1/chat/completions": "openai", "/v1/responses": "responses",
         "/v1/messages": "anthropic"}


async def maybe(request: web.Request, model: str,
                body: bytes | bytearray | None) -> web.StreamResponse | None:
    """The answer of a call that names MCP servers; None for any other call."""
    family = PATHS.get(request.path)
    if family is None or body is None or b"mcp" not in body:
        return None
    servers = request.app.get(MCP_SERVERS)
    if servers is None:
        return None  # an app built without the core's (tests)
    parsed: dict[str, Any] = jsonc.loads_object(body)
    used = (responses.uses(parsed, servers) if family == "responses" else
            anthropic.uses(parsed, servers) if family == "anthropic" else
            chat.uses(parsed, servers))
    if not used:
        return None
    loop.check_uses(request.app, servers, model, [u.server for u in used])
    if family == "responses":
        return await responses.answer(request, model, parsed, used)
    if family == "anthropic":
        return await anthropic.answer(request, model, parsed, used)
    return await chat.answer(request, model, parsed, used)
