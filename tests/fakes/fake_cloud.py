"""A fake cloud API (OpenAI-compatible, behind a key) that is also a provider.

``build_app(key, ids, prefix)`` serves, under ``prefix`` (e.g. ``/openai/v1``, as
Gemini's endpoint sits under ``/v1beta/openai``):

* ``GET  {prefix}/models``            the listed ids (OpenAI's list shape)
* ``POST {prefix}/chat/completions``  streamed or not; the answer is
  ``"cloud <model>: <last user text>"``
* ``POST {prefix}/audio/transcriptions``  multipart; ``{"text": "<model> heard N bytes"}``

Every call without ``Authorization: Bearer <key>`` gets OpenAI's 401; a model that
is not listed gets OpenAI's 404 ``model_not_found``, so a proxy that does not send
the key or the cloud's own model name fails loudly.

Test hooks (no key needed): ``POST /fake/models {"ids": [...]}`` changes the list,
``POST /fake/down {"down": true}`` makes every other route answer 503, ``app[STATE]
["fail"] = (429, "7")`` makes every call answer that status with that Retry-After,
``app[STATE]["delay"] = s`` holds each chat answer back s seconds,
``GET /fake/requests`` the last calls (path, model, whether the key was right).

Run as a script: ``fake_cloud.py --port N --key K --models a,b,c [--prefix /v1]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import deque
from typing import Any

from aiohttp import web

STATE: web.AppKey[dict[str, Any]] = web.AppKey("state", dict)


def _error(status: int, message: str, code: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": "invalid_request_error", "param": None,
                   "code": code}}, status=status)


def build_app(key: str, ids: list[str], prefix: str = "/v1") -> web.Application:
    state: dict[str, Any] = {"ids": list(ids), "down": False, "requests": deque(maxlen=100),
                             "fail": None, "delay": 0.0}

    @web.middleware
    async def gate(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/fake/"):
            return await handler(request)
        if state["down"]:
            return _error(503, "the fake cloud is down", "unavailable")
        ok = request.headers.get("Authorization") == f"Bearer {key}"
        state["requests"].append({"path": request.path, "key_ok": ok,
                                  "extra": request.headers.get("X-Title")})
        if not ok:
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        if state["fail"] is not None and request.method == "POST":
            status, retry_after = state["fail"]
            resp = _error(status, "Rate limit reached", "rate_limit_exceeded")
            resp.headers["Retry-After"] = retry_after
            return resp
        return await handler(request)

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": i, "object": "model", "created": 0, "owned_by": "fake-cloud"}
            for i in state["ids"]]})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if state["delay"]:
            await asyncio.sleep(state["delay"])
        model = body.get("model")
        state["requests"][-1]["model"] = model
        if model not in state["ids"]:
            return _error(404, f"The model `{model}` does not exist", "model_not_found")
        last = next((m.get("content") for m in reversed(body.get("messages", []))
                     if m.get("role") == "user"), "")
        text = f"cloud {model}: {last}"
        created = int(time.time())
        if not body.get("stream"):
            return web.json_response({
                "id": "chatcmpl-cloud", "object": "chat.completion", "created": created,
                "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
            })
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for piece in (text[: len(text) // 2], text[len(text) // 2:]):
            chunk = {"id": "chatcmpl-cloud", "object": "chat.completion.chunk",
                     "created": created, "model": model,
                     "choices": [{"index": 0, "delta": {"content": piece},
                                  "finish_reason": None}]}
            await out.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        end = {"id": "chatcmpl-cloud", "object": "chat.completion.chunk", "created": created,
               "model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await out.write(b"data: " + json.dumps(end).encode() + b"\n\ndata: [DONE]\n\n")
        await out.write_eof()
        return out

    async def transcribe(request: web.Request) -> web.Response:
        form = await request.post()
        model = form.get("model")
        state["requests"][-1]["model"] = model
        if model not in state["ids"]:
            return _error(404, f"The model `{model}` does not exist", "model_not_found")
        file = form.get("file")
        size = len(file.file.read()) if isinstance(file, web.FileField) else 0
        return web.json_response({"text": f"{model} heard {size} bytes"})

    async def set_models(request: web.Request) -> web.Response:
        state["ids"] = list((await request.json())["ids"])
        return web.json_response({"ids": state["ids"]})

    async def set_down(request: web.Request) -> web.Response:
        state["down"] = bool((await request.json())["down"])
        return web.json_response({"down": state["down"]})

    async def requests(request: web.Request) -> web.Response:
        return web.json_response(list(state["requests"]))

    app = web.Application(middlewares=[gate])
    app[STATE] = state
    app.router.add_get(f"{prefix}/models", models)
    app.router.add_post(f"{prefix}/chat/completions", chat)
    app.router.add_post(f"{prefix}/audio/transcriptions", transcribe)
    app.router.add_post("/fake/models", set_models)
    app.router.add_post("/fake/down", set_down)
    app.router.add_get("/fake/requests", requests)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="fake-cloud")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--models", default="")
    parser.add_argument("--prefix", default="/v1")
    ns = parser.parse_args()
    ids = [m for m in ns.models.split(",") if m]

    async def run() -> None:
        runner = web.AppRunner(build_app(ns.key, ids, ns.prefix), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", ns.port).start()
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
