"""Ollama routes (port 11434): translation both ways. See docs/compatibility.md.

Handlers read the request, resolve the model (``x`` and ``x:latest`` both work),
translate with ``proxy.dialects.translate`` and send the result. Every generation goes to
llama-server as a stream, whether or not the client asked for one: the same loop
then feeds NDJSON lines or one aggregated object. ``keep_alive`` becomes the lease's
idle TTL; without it the model's configured TTL applies again, as Ollama falls back
to its default for a request that does not say. The model endpoints (/api/tags, ps,
show, pull, ...) and those request helpers are ``proxy.dialects.ollama_models``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import os
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware

from proxy.calls import context, upstream, vision
from proxy.calls.call import Call, Client
from proxy.calls.modelinfo import MODEL_INFO, ModelInfoCache, embedding
from proxy.calls.streaming import Last, upstream_batches, upstream_data_batches, write_stream
from proxy.dialects import ollama_models, ollama_request, openai, stream_translate, translate
from proxy.dialects.ollama_models import (
    KeepAlive,
    Target,
    keep_alive,
    model_field,
    read_body,
    resolve,
    stream_flag,
)
from proxy.dialects.stream_translate import OllamaStream
from proxy.dialects.translate import upstream_error_body
from proxy.dialects.versions import OLLAMA_VERSION
from proxy.edge import jsonc
from proxy.edge.reqlog import note_model
from proxy.keys import SCHEDULER
from proxy.ops import pulls
from proxy.tools import ollama as tools_ollama
from scheduler.errors import BadRequest
from scheduler.scheduling.scheduler import LeaseHints, Scheduler, Upstream

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# What Ollama allows by default (envconfig.AllowedOrigins), plus OLLAMA_ORIGINS.
_DEFAULT_ORIGINS = (
    *(
        f"{scheme}://{host}{port}"
        for host in ("localhost", "127.0.0.1", "0.0.0.0")
        for scheme in ("http", "https")
        for port in ("", ":*")
    ),
    "app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*",
)
_ALLOW_HEADERS = (
    "Authorization, Content-Type, User-Agent, Accept, X-Requested-With, "
    "X-Stainless-Lang, X-Stainless-Package-Version, X-Stainless-Os, X-Stainless-Arch, "
    "X-Stainless-Retry-Count, X-Stainless-Runtime, X-Stainless-Runtime-Version, "
    "X-Stainless-Async, X-Stainless-Helper-Method, X-Stainless-Poll-Helper, "
    "X-Stainless-Custom-Poll-Interval, X-Stainless-Timeout"
)
_ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"


def origin_matcher(extra: str = "") -> Callable[[str], bool]:
    patterns = [*_DEFAULT_ORIGINS, *(o.strip() for o in extra.split(",") if o.strip())]
    if "*" in patterns:
        return lambda _origin: True
    rx = re.compile("|".join(fnmatch.translate(p) for p in patterns), re.IGNORECASE)
    return lambda origin: rx.fullmatch(origin) is not None


def ollama_middleware(allowed: Callable[[str], bool]) -> Middleware:
    """Ollama's CORS and its plain-text 404/405 (gin's), outside every other layer."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        # A page served by this very host is not a cross-origin caller.
        if origin and origin not in (f"http://{request.host}", f"https://{request.host}"):
            if not allowed(origin):
                # As Ollama: a foreign page must not drive a local model server.
                return web.Response(status=403, text="403 forbidden: origin not allowed")
            if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
                return web.Response(status=204, headers={
                    "Access-Control-Allow-Methods": _ALLOW_METHODS,
                    "Access-Control-Allow-Headers": _ALLOW_HEADERS,
                    "Access-Control-Max-Age": "43200",
                })
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return web.Response(status=404, text="404 page not found")
        except web.HTTPMethodNotAllowed:
            return web.Response(status=405, text="405 method not allowed")

    return middleware


def cors_headers(allowed: Callable[[str], bool]) -> Callable[
    [web.Request, web.StreamResponse], Awaitable[None]
]:
    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin and allowed(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers.add("Vary", "Origin")

    return on_prepare


# --- helpers ---------------------------------------------------------------------------


def elapsed_ns(started: int) -> int:
    return time.monotonic_ns() - started


# --- generation ------------------------------------------------------------------------


async def _probe(request: web.Request, target: Target, keep: KeepAlive, kind: str) -> web.Response:
    """Empty messages or prompt: load the model (or unload it, with keep_alive 0)."""
    scheduler = request.app[SCHEDULER]
    if keep.unload:
        await scheduler.unload(target.name)
        reason = "unload"
    else:
        async with scheduler.lease(target.name, keep.hints) as up:
            note_model(up.model)
            reason = "load"
    return web.json_response(stream_translate.probe_line(kind, target.display, reason))


async def _lines(
    batches: AsyncGenerator[list[bytes], None],
    state: OllamaStream,
    started: int,
    load_ns: int,
) -> AsyncGenerator[list[dict[str, Any]] | bytes | Last, None]:
    async with contextlib.aclosing(batches):
        async for batch in batches:
            yield state.feed_data_batch(batch)
    yield Last(state.tail(elapsed_ns(started), load_ns))


async def _generate(
    request: web.Request,
    target: Target,
    hints: LeaseHints,
    path: str,
    payload: dict[str, Any],
    new_state: Callable[[], OllamaStream],
    stream: bool,
    started: int,
) -> web.StreamResponse:
    """Every generation goes upstream as a stream; a call whose client has received
    nothing yet (all of a ``stream: false`` one) is resent if its upstream fails."""

    async def consume(
        up: Upstream, resp: aiohttp.ClientResponse, client: Client
    ) -> web.StreamResponse:
        if resp.status != 200:
            raise upstream_error_body(resp.status, await resp.read())
        load_ns = round(up.waited * 1e9)
        state = new_state()  # fresh per attempt: a resent call starts over
        if stream:
            lines = _lines(upstream_data_batches(resp, up.instance_id), state, started, load_ns)
            return await write_stream(request, lines, ndjson=True, client=client)
        batches = upstream_batches(resp, up.instance_id)
        async with contextlib.aclosing(batches):
            async for batch in batches:
                for event in batch:
                    state.feed(event)
        client.answered = True
        return web.json_response(state.whole(elapsed_ns(started), load_ns))

    spec = Call(model=target.name, path=path, payload=payload, hints=hints,
                fit=context.of(path, payload=payload, family="ollama"))
    return await upstream.answer(request, "openai", spec, consume)


async def _prelude(request: web.Request,
                   body: dict[str, Any]) -> tuple[Scheduler, Target, KeepAlive]:
    """What chat and generate do first: the model (pulled if it must be), the vision
    check, the keep-alive asked for."""
    scheduler = request.app[SCHEDULER]
    await pulls.ensure(request.app, model_field(body))
    target = resolve(scheduler, model_field(body))
    if vision.ollama_has_images(body):
        vision.require_vision(scheduler, target.name, target.cfg)
    keep = keep_alive(scheduler, target, body.get("keep_alive"), body.get("options"))
    return scheduler, target, keep


async def chat(request: web.Request) -> web.StreamResponse:
    started = time.monotonic_ns()
    body = await read_body(request)
    scheduler, target, keep = await _prelude(request, body)
    if not body.get("messages"):
        return await _probe(request, target, keep, "chat")
    think = body.get("think") is not False
    if "mcp_servers" in body:
        # Names configured MCP servers: the tool loop answers (proxy/tools/).
        looped = await tools_ollama.maybe(request, body, target.name, target.display,
                                          stream_flag(body), think)
        if looped is not None:
            return looped
    payload = ollama_request.chat_body(body, target.name)
    hints = keep.hints
    if scheduler.balanced(target.name):  # replica choice and the slot cache
        hints = dataclasses.replace(hints, chain=jsonc.chain_of(payload))
    return await _generate(request, target, hints, "/v1/chat/completions", payload,
                           lambda: OllamaStream("chat", target.display, show_thinking=think),
                           stream_flag(body), started)


async def generate(request: web.Request) -> web.StreamResponse:
    started = time.monotonic_ns()
    body = await read_body(request)
    scheduler, target, keep = await _prelude(request, body)
    if not (body.get("prompt") or body.get("suffix") or body.get("system")):
        return await _probe(request, target, keep, "generate")
    path, payload = ollama_request.generate_call(body, target.name)
    think = body.get("think") is not False
    hints = keep.hints
    if scheduler.balanced(target.name):
        hints = dataclasses.replace(hints, chain=jsonc.chain_of(payload))
    return await _generate(request, target, hints, path, payload,
                           lambda: OllamaStream("generate", target.display, show_thinking=think),
                           stream_flag(body), started)


# --- embeddings ------------------------------------------------------------------------


async def _embed(
    request: web.Request, target: Target, hints: LeaseHints, inputs: list[str]
) -> tuple[list[list[float]], int, int]:
    """Vectors, prompt tokens and load nanoseconds for ``inputs``."""
    if not embedding(target.cfg):
        raise BadRequest(
            f'"{target.display}" does not support embeddings (set embedding = true in its '
            "model config)"
        )
    payload = {"model": target.name, "input": inputs}

    async def consume(
        up: Upstream, resp: aiohttp.ClientResponse, client: Client
    ) -> tuple[list[list[float]], int, int]:
        raw = await resp.read()
        if resp.status != 200:
            raise upstream_error_body(resp.status, raw)
        vectors, tokens = translate.embeddings_of(jsonc.loads(raw))
        return vectors, tokens, round(up.waited * 1e9)

    spec = Call(model=target.name, path="/v1/embeddings", payload=payload, hints=hints)
    return await upstream.call(request, "openai", spec, consume)


async def embed(request: web.Request) -> web.Response:
    started = time.monotonic_ns()
    body = await read_body(request)
    scheduler = request.app[SCHEDULER]
    target = resolve(scheduler, model_field(body))
    hints = keep_alive(scheduler, target, body.get("keep_alive")).hints
    inputs = translate.embed_inputs(body.get("input"))
    dims = body.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int)):
        raise BadRequest("dimensions must be a positive integer")
    if not inputs:
        return web.json_response({"model": target.display, "embeddings": []})
    vectors, tokens, load_ns = await _embed(request, target, hints, inputs)
    out: dict[str, Any] = {
        "model": target.display,
        "embeddings": [translate.truncate_dims(v, dims) for v in vectors],
        "total_duration": elapsed_ns(started),
        "load_duration": load_ns,
        "prompt_eval_count": tokens,
    }
    return web.json_response(out)


async def embeddings(request: web.Request) -> web.Response:
    body = await read_body(request)
    scheduler = request.app[SCHEDULER]
    target = resolve(scheduler, model_field(body))
    hints = keep_alive(scheduler, target, body.get("keep_alive")).hints
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise BadRequest("prompt must be a string")
    if not prompt:
        return web.json_response({"embedding": []})
    vectors, _, _ = await _embed(request, target, hints, [prompt])
    return web.json_response({"embedding": vectors[0] if vectors else []})


# --- plain ------------------------------------------------------------------------------


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_VERSION})


def setup(app: web.Application) -> None:
    """Mount the Ollama routes on the port's app (``proxy.app.port_app``)."""
    app[MODEL_INFO] = ModelInfoCache()
    allowed = origin_matcher(os.environ.get("OLLAMA_ORIGINS", ""))
    # After the request middleware (index 0), so CORS refusals and preflights count.
    app.middlewares.insert(1, ollama_middleware(allowed))
    app.on_response_prepare.append(cors_headers(allowed))
    r = app.router
    r.add_get("/", root)
    r.add_get("/api/version", version)
    r.add_get("/api/tags", ollama_models.tags)
    r.add_get("/api/ps", ollama_models.ps)
    r.add_post("/api/show", ollama_models.show)
    r.add_post("/api/chat", chat)
    r.add_post("/api/generate", generate)
    r.add_post("/api/embed", embed)
    r.add_post("/api/embeddings", embeddings)
    r.add_post("/api/pull", ollama_models.pull)
    r.add_post("/api/push", ollama_models.push)
    r.add_post("/api/create", ollama_models.create)
    r.add_post("/api/copy", ollama_models.copy)
    r.add_delete("/api/delete", ollama_models.delete)
    r.add_head("/api/blobs/{digest}", ollama_models.blob_head)
    r.add_post("/api/blobs/{digest}", ollama_models.blob_post)
    openai.add_routes(app, "ollama", name_for=ollama_models.configured_name)
