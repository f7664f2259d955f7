"""MCP servers for the tool loop's tests, written with the ``mcp`` SDK.

    python -m tests.fakes.mcp_tools stdio        MCP over stdin/stdout
    python -m tests.fakes.mcp_tools http         streamable HTTP on 127.0.0.1, a free
                                                 port: prints "PORT <n>" once listening

Tools: ``echo(text)``, ``add(a, b)``, ``fail(reason)`` (the tool reports an error),
``hang(seconds)`` (sleeps: a server that does not answer in time), ``env(name)`` (an
environment variable of the server, to see the config's ``env`` arrive), ``pid()``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("corral-test-tools")


@server.tool()
def echo(text: str) -> str:
    """Return the text as it came."""
    return text


@server.tool()
def add(a: int, b: int) -> str:
    """Add two integers."""
    return str(a + b)


@server.tool()
def fail(reason: str = "broken") -> str:
    """Always fails."""
    raise ToolError(f"the tool failed: {reason}")


@server.tool()
async def hang(seconds: float = 3600.0) -> str:
    """Sleep, then answer."""
    await asyncio.sleep(seconds)
    return "woke"


@server.tool()
def env(name: str) -> str:
    """An environment variable of this server."""
    return os.environ.get(name, "")


@server.tool()
def pid() -> str:
    """This server's process id."""
    return str(os.getpid())


async def _http() -> None:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    app = server.streamable_http_app()
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    serving = asyncio.ensure_future(srv.serve(sockets=[sock]))
    while not srv.started:  # the port is told once it accepts
        if serving.done():
            serving.result()
            return
        await asyncio.sleep(0.01)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    await serving


if __name__ == "__main__":
    if sys.argv[1:] == ["http"]:
        asyncio.run(_http())
    else:
        server.run("stdio")
