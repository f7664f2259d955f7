"""A fake vLLM-style engine for runtime tests: ``fake_engine.py serve MODEL --host H
--port P --served-model-name NAME --max-num-seqs N [...]``.

It is the fake llama-server (same routes, slots, ``FAKE_*`` faults, ``/fake/*`` hooks)
behind vLLM's command line and two of vLLM's habits a runtime must cope with:

* ``/health`` answers 200 with an empty body (not llama-server's JSON);
* a body whose ``model`` is not the served name gets vLLM's 404.

Its first stdout line is ``fake-engine argv: <json list>`` and, when set,
``fake-engine env FAKE_ENGINE_ECHO=<value>``, so a test reads what it was started with
from the instance log. Unknown flags are printed and ignored.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import fake_llama_server as fls  # type: ignore[import-not-found]  # run as a script
from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def translate(argv: list[str]) -> tuple[list[str], str]:
    """vLLM's argv → the fake llama-server's, and the served model name."""
    if not argv or argv[0] != "serve" or len(argv) < 2:
        raise SystemExit("usage: fake_engine.py serve MODEL [--host H] [--port P] ...")
    model = argv[1]
    served = model
    out = ["-m", model]
    i = 2
    flags = {"--host": "--host", "--port": "--port", "--max-num-seqs": "--parallel"}
    while i < len(argv):
        token = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) else ""
        if token in flags:
            out += [flags[token], value]
            i += 2
        elif token == "--served-model-name":
            served = value
            i += 2
        else:
            print(f"fake-engine: ignoring {token}", flush=True)
            i += 1
    return [*out, "--alias", served], served


def middleware(served: str) -> Any:
    @web.middleware
    async def vllm_habits(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/health":
            resp = await handler(request)
            return web.Response(status=resp.status)
        if request.method == "POST" and request.path.startswith("/v1/") and request.can_read_body:
            body = await request.read()
            try:
                model = json.loads(body).get("model")
            except (ValueError, AttributeError):
                model = None
            if model != served:
                return web.json_response(
                    {"object": "error", "message": f"The model `{model}` does not exist.",
                     "type": "NotFoundError", "param": None, "code": 404}, status=404)
        return await handler(request)

    return vllm_habits


def main() -> int:
    argv = sys.argv[1:]
    print("fake-engine argv: " + json.dumps(argv), flush=True)
    if "FAKE_ENGINE_ECHO" in os.environ:
        print(f"fake-engine env FAKE_ENGINE_ECHO={os.environ['FAKE_ENGINE_ECHO']}", flush=True)
    fake_argv, served = translate(argv)
    fls._early_start()  # FAKE_CRASH_AT_START and the early SIGTERM handler
    opts = fls.parse_args(fake_argv)
    build = fls.build_app

    def build_app(srv: Any) -> web.Application:
        app: web.Application = build(srv)
        app.middlewares.append(middleware(served))
        return app

    fls.build_app = build_app
    return int(asyncio.run(fls.serve(opts, fls.Faults.from_env())))


if __name__ == "__main__":
    sys.exit(main())
