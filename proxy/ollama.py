"""Ollama routes (port 11434): translation both ways. See docs/compatibility.md.

Handlers read the request, resolve the model (``x`` and ``x:latest`` both work),
translate with ``proxy.translate`` and send the result. Every generation goes to
llama-server as a stream, whether or not the client asked for one: the same loop
then feeds NDJSON lines or one aggregated object. ``keep_alive`` becomes the lease's
idle TTL; without it the model's configured TTL applies again, as Ollama falls back
to its default for a request that does not say.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import os
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware

from proxy import body as bodies
from proxy import (
    jsonc,
    ollama_request,
    openai,
    pulls,
    stream_translate,
    translate,
    upstream,
    vision,
)
from proxy.keys import SCHEDULER
from proxy.modelinfo import MODEL_INFO, ModelInfoCache, capabilities, embedding
from proxy.reqlog import note_model
from proxy.stream_translate import OllamaStream
from proxy.streaming import upstream_batches, upstream_data_batches, write_stream
from proxy.translate import tagged, upstream_error_body
from scheduler.config import ModelConfig
from scheduler.errors import BadRequest, NotSupported, UnknownModel
from scheduler.instance import State
from scheduler.scheduler import LeaseHints, Scheduler, Upstream

VERSION = "0.12.6"

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


@dataclass(frozen=True, slots=True)
class Target:
    cfg: ModelConfig
    name: str  # the configured name or alias to lease
    display: str  # the tagged name echoed to the client


def resolve(scheduler: Scheduler, raw: str) -> Target:
    for name in translate.name_candidates(raw):
        try:
            cfg = scheduler.resolve(name)
        except UnknownModel:
            continue
        return Target(cfg, name, tagged(name))
    raise UnknownModel(raw, scheduler.names())


async def read_body(request: web.Request) -> dict[str, Any]:
    return await bodies.read_json(request)


def model_field(body: dict[str, Any]) -> str:
    # Older clients send "name" (show, pull, push, delete).
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest("model is required")
    return name


@dataclass(frozen=True, slots=True)
class KeepAlive:
    hints: LeaseHints
    unload: bool  # keep_alive 0 was asked for explicitly


def keep_alive(scheduler: Scheduler, target: Target, value: object) -> KeepAlive:
    keep = translate.keep_alive_seconds(value)
    ttl = scheduler.config.ttl(target.cfg) if keep is None else keep
    return KeepAlive(LeaseHints(keep_alive=ttl), keep == 0)


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
) -> AsyncGenerator[list[dict[str, Any]] | bytes, None]:
    async with contextlib.aclosing(batches):
        async for batch in batches:
            yield state.feed_data_batch(batch)
    yield state.tail(elapsed_ns(started), load_ns)


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
        up: Upstream, resp: aiohttp.ClientResponse, client: upstream.Client
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

    spec = upstream.Call(model=target.name, path=path, payload=payload, hints=hints)
    return await upstream.answer(request, "openai", spec, consume)


def _stream_flag(body: dict[str, Any]) -> bool:
    # Absent means true (a nil *bool in Ollama); only an explicit false turns it off.
    return body.get("stream") is not False


async def chat(request: web.Request) -> web.StreamResponse:
    started = time.monotonic_ns()
    body = await read_body(request)
    scheduler = request.app[SCHEDULER]
    await pulls.ensure(request.app, model_field(body))
    target = resolve(scheduler, model_field(body))
    if vision.ollama_has_images(body):
        vision.require_vision(scheduler, target.name, target.cfg)
    keep = keep_alive(scheduler, target, body.get("keep_alive"))
    if not body.get("messages"):
        return await _probe(request, target, keep, "chat")
    payload = ollama_request.chat_body(body, target.name)
    think = body.get("think") is not False
    hints = keep.hints
    if scheduler.balanced(target.name):  # replica affinity and the slot cache
        hints = dataclasses.replace(hints, affinity=jsonc.prefix_key_of(payload))
    return await _generate(request, target, hints, "/v1/chat/completions", payload,
                           lambda: OllamaStream("chat", target.display, show_thinking=think),
                           _stream_flag(body), started)


async def generate(request: web.Request) -> web.StreamResponse:
    started = time.monotonic_ns()
    body = await read_body(request)
    scheduler = request.app[SCHEDULER]
    await pulls.ensure(request.app, model_field(body))
    target = resolve(scheduler, model_field(body))
    if vision.ollama_has_images(body):
        vision.require_vision(scheduler, target.name, target.cfg)
    keep = keep_alive(scheduler, target, body.get("keep_alive"))
    if not (body.get("prompt") or body.get("suffix") or body.get("system")):
        return await _probe(request, target, keep, "generate")
    path, payload = ollama_request.generate_call(body, target.name)
    think = body.get("think") is not False
    return await _generate(request, target, keep.hints, path, payload,
                           lambda: OllamaStream("generate", target.display, show_thinking=think),
                           _stream_flag(body), started)


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
        up: Upstream, resp: aiohttp.ClientResponse, client: upstream.Client
    ) -> tuple[list[list[float]], int, int]:
        raw = await resp.read()
        if resp.status != 200:
            raise upstream_error_body(resp.status, raw)
        vectors, tokens = translate.embeddings_of(jsonc.loads(raw))
        return vectors, tokens, round(up.waited * 1e9)

    spec = upstream.Call(model=target.name, path="/v1/embeddings", payload=payload, hints=hints)
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


# --- models ----------------------------------------------------------------------------


async def tags(request: web.Request) -> web.Response:
    scheduler = request.app[SCHEDULER]
    names = scheduler.names()
    cfgs = {n: scheduler.resolve(n) for n in names}
    facts = await request.app[MODEL_INFO].many(list(cfgs.values()))
    models = []
    for name in names:
        f = facts[cfgs[name].name]
        models.append({
            "name": tagged(name),
            "model": tagged(name),
            "modified_at": translate.rfc3339(f.modified or None),
            "size": f.size,
            "digest": f.digest or translate.name_digest(cfgs[name].name),
            "details": f.details(),
        })
    return web.json_response({"models": models})


# Go's time.Duration tops out near 292 years; Ollama shows "forever" that far out.
_FOREVER_S = 292 * 365 * 86400


async def ps(request: web.Request) -> web.Response:
    scheduler = request.app[SCHEDULER]
    cache: ModelInfoCache = request.app[MODEL_INFO]
    now = time.time()
    entries: list[tuple[float, dict[str, Any]]] = []
    for inst in scheduler.instances():
        if inst.state not in (State.READY, State.DRAINING):
            continue
        cfg = scheduler.resolve(inst.model)
        f = await cache.get(cfg)
        ttl = scheduler.config.ttl(cfg) if inst.ttl_override is None else inst.ttl_override
        idle_s = inst.describe()["idle_seconds"]
        idle = 0.0 if inst.in_flight or not isinstance(idle_s, float) else idle_s
        expires = now + _FOREVER_S if ttl < 0 else now + max(0.0, ttl - idle)
        entries.append((expires, {
            "name": tagged(inst.model),
            "model": tagged(inst.model),
            "size": f.size,
            "digest": f.digest or translate.name_digest(cfg.name),
            "details": f.details(),
            "expires_at": translate.rfc3339(expires),
            # Unknown without parsing llama-server's log; 0 is true for CPU builds, and a
            # GPU offload is only claimed when the config asks for one.
            "size_vram": f.size if cfg.n_gpu_layers else 0,
            "context_length": cfg.ctx_size or f.context_length or 0,
        }))
    entries.sort(key=lambda e: e[0], reverse=True)
    return web.json_response({"models": [e[1] for e in entries]})


async def show(request: web.Request) -> web.Response:
    body = await read_body(request)
    target = resolve(request.app[SCHEDULER], model_field(body))
    cfg = target.cfg
    f = await request.app[MODEL_INFO].get(cfg)
    source = f.path or cfg.path or cfg.package
    params = [f"num_ctx {cfg.ctx_size}"] if cfg.ctx_size else []
    return web.json_response({
        "license": f.license,
        "modelfile": f"# Modelfile generated by Corral\nFROM {source}\n",
        "parameters": "\n".join(params),
        "template": f.chat_template,
        "system": "",
        "details": f.details(),
        # Always present: ollama-python declares it without a default.
        "model_info": f.model_info,
        "capabilities": capabilities(cfg, f),
        "modified_at": translate.rfc3339(f.modified or None),
    })


async def pull(request: web.Request) -> web.StreamResponse:
    """``hf.co/...`` and configured hf_repo models are downloaded (proxy/pulls.py);
    another configured model is "pulled" by making sure it loads."""
    body = await read_body(request)
    scheduler = request.app[SCHEDULER]
    download = pulls.downloadable(scheduler, model_field(body))
    if download is not None:
        return await pulls.respond(request, model_field(body), download, _stream_flag(body))
    target = resolve(scheduler, model_field(body))
    hints = keep_alive(scheduler, target, body.get("keep_alive")).hints

    async def steps() -> AsyncGenerator[list[dict[str, Any]], None]:
        yield [{"status": "pulling manifest"}]
        async with scheduler.lease(target.name, hints) as up:
            note_model(up.model)
        yield [{"status": "verifying sha256 digest"}, {"status": "success"}]

    if _stream_flag(body):
        return await write_stream(request, steps(), ndjson=True)
    async with contextlib.aclosing(steps()) as it:
        async for _ in it:
            pass
    return web.json_response({"status": "success"})


def _unsupported(what: str, instead: str) -> NotSupported:
    return NotSupported(f"{what} is not supported by Corral: {instead}")


async def push(request: web.Request) -> web.Response:
    raise _unsupported("pushing models", "models come from corral.toml")


async def create(request: web.Request) -> web.Response:
    raise _unsupported("creating models", "add a [[models]] entry to corral.toml")


async def copy(request: web.Request) -> web.Response:
    body = await read_body(request)
    source = body.get("source")
    if not isinstance(source, str) or not source:
        raise BadRequest("source is required")
    resolve(request.app[SCHEDULER], source)
    raise _unsupported("copying models", "add an alias to the model in corral.toml")


async def delete(request: web.Request) -> web.Response:
    body = await read_body(request)
    target = resolve(request.app[SCHEDULER], model_field(body))
    if target.cfg.origin == "pulled":
        await pulls.delete(request.app[SCHEDULER], target.cfg)
        return web.Response()
    if target.cfg.origin.startswith("scan:"):
        raise _unsupported("deleting scanned models", "remove its file from the scanned "
                           "directory; it stops being offered within scan_interval")
    raise _unsupported("deleting models", "remove the model from corral.toml")


async def blob_head(request: web.Request) -> web.Response:
    return web.Response(status=404)


async def blob_post(request: web.Request) -> web.Response:
    raise _unsupported("uploading blobs", "point a model's path at a GGUF file")


# --- plain ------------------------------------------------------------------------------


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def version(request: web.Request) -> web.Response:
    # Purely numeric: Open WebUI parses it with map(int, ...).
    return web.json_response({"version": VERSION})


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
    r.add_get("/api/tags", tags)
    r.add_get("/api/ps", ps)
    r.add_post("/api/show", show)
    r.add_post("/api/chat", chat)
    r.add_post("/api/generate", generate)
    r.add_post("/api/embed", embed)
    r.add_post("/api/embeddings", embeddings)
    r.add_post("/api/pull", pull)
    r.add_post("/api/push", push)
    r.add_post("/api/create", create)
    r.add_post("/api/copy", copy)
    r.add_delete("/api/delete", delete)
    r.add_head("/api/blobs/{digest}", blob_head)
    r.add_post("/api/blobs/{digest}", blob_post)
    openai.add_routes(app, "ollama")
