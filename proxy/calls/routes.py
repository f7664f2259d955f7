"""Every model-routed endpoint, as rows of one table.

A row names its path(s), where the model's name is found (JSON body ``model``,
multipart form field ``model``, ``?model=``), the capability the model needs, the
API family (which decides the error envelope) and the ports that mount it. The
OpenAI, Ollama and LM Studio apps call ``mount()``; adding an endpoint is one row.
Each row is a pass-through (contract 9): the body goes upstream as it came, the
answer comes back chunk by chunk, through the one call path (``proxy.calls.upstream``).
Anthropic Messages and Responses rows go translated to chat completions for an
upstream that lacks their family (``proxy.dialects.families.bridge``).
Dialects with a translation of their own (Ollama's /api, LM Studio's /api/v0) keep
their handlers and send through the same call path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from typing import Literal

from aiohttp import web

from proxy.calls import context, multipart, upstream, vision
from proxy.calls.call import JSON_HEADERS, Call
from proxy.calls.streaming import relay
from proxy.dialects import sdapi
from proxy.dialects.families import bridge as families_bridge
from proxy.edge import body as bodies
from proxy.edge import jsonc
from proxy.edge.errors import ROUTE_DIALECT, Family, family_dialect
from proxy.keys import BODY_BUDGET, FAMILIES, SCHEDULER
from proxy.metrics.registry import METRICS
from proxy.ops import pulls
from proxy.tools import entry as tools_entry
from scheduler.config.root import Capability, ModelConfig
from scheduler.errors import BadRequest, CannotServe
from scheduler.models.capabilities import capabilities
from scheduler.scheduling.scheduler import LeaseHints, Scheduler

Port = Literal["main", "ollama", "lmstudio"]
ModelIn = Literal["body", "form", "query"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MiB = 1 << 20
EVERY_PORT: frozenset[Port] = frozenset({"main", "ollama", "lmstudio"})
MAIN: frozenset[Port] = frozenset({"main"})


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    paths: tuple[str, ...]
    # What the model must be able to do; None: any model (tokenizing, props).
    capability: Capability | None
    family: Family = "openai"
    model_in: ModelIn = "body"
    method: Literal["GET", "POST"] = "POST"
    # The path sent upstream; None: the path that was called.
    upstream: str | None = None
    max_body: int = 64 * MiB
    ports: frozenset[Port] = EVERY_PORT

    @property
    def native(self) -> bool:
        """llama-server's own API: the model may be left out (``default_model``)."""
        return self.family == "native"


ROUTES: tuple[Route, ...] = (
    Route(("/v1/chat/completions",), "chat"),
    Route(("/v1/completions",), "completion"),
    Route(("/v1/embeddings",), "embedding", max_body=256 * MiB),
    Route(("/v1/chat/completions/input_tokens",), "chat"),
    Route(("/v1/responses",), "chat", "responses"),
    Route(("/v1/responses/input_tokens",), "chat", "responses"),
    Route(("/v1/messages",), "chat", "anthropic"),
    Route(("/v1/messages/count_tokens",), "chat", "anthropic"),
    Route(("/v1/rerank", "/v1/reranking"), "rerank"),
    Route(("/v1/audio/transcriptions",), "audio", model_in="form", max_body=1024 * MiB),
    Route(("/v1/audio/translations",), "audio", model_in="form", max_body=1024 * MiB),
    # Speech and images (docs/engines.md, "Long jobs"): the answers, audio bytes or
    # images, are relayed chunk by chunk like any other; uploads stream through.
    Route(("/v1/audio/speech",), "speech", max_body=1 * MiB),
    Route(("/v1/audio/voices",), "speech", model_in="query", method="GET"),
    Route(("/v1/images/generations",), "image", max_body=1 * MiB),
    Route(("/v1/images/edits", "/v1/images/variations"), "image", model_in="form",
          max_body=512 * MiB),
    # stable-diffusion WebUI's API (its model list is proxy.dialects.sdapi's).
    Route(("/sdapi/v1/txt2img",), "image", max_body=64 * MiB, ports=MAIN),
    Route(("/sdapi/v1/img2img",), "image", max_body=512 * MiB, ports=MAIN),
    # LM Studio's embeddings under its REST prefix.
    Route(("/api/v0/embeddings",), "embedding", upstream="/v1/embeddings",
          max_body=256 * MiB, ports=frozenset({"lmstudio"})),
    # llama-server's native API, on the main port.
    Route(("/rerank", "/reranking"), "rerank", "native", ports=MAIN),
    Route(("/completion", "/completions"), "completion", "native", ports=MAIN),
    Route(("/infill",), "infill", "native", ports=MAIN),
    Route(("/embedding", "/embeddings"), "embedding", "native", max_body=256 * MiB,
          ports=MAIN),
    Route(("/tokenize",), None, "native", ports=MAIN),
    Route(("/detokenize",), None, "native", ports=MAIN),
    Route(("/apply-template",), "chat", "native", ports=MAIN),
    Route(("/props",), None, "native", model_in="query", method="GET", ports=MAIN),
)


HintsFor = Callable[[Scheduler, str, jsonc.Head], LeaseHints | None]
# The configured name a client's model name stands for on a port (Ollama's "x:latest").
NameFor = Callable[[Scheduler, str], str]


# Capabilities whose calls have a prompt that llama-server's prompt cache can reuse:
# only their bodies are hashed into a chain of prefixes (an embeddings batch is not),
# except on paths that render a prompt without running it in a slot.
PROMPTED: frozenset[Capability | None] = frozenset({"chat", "completion", "infill"})
_UNRUN = frozenset({"/apply-template"})


def default_hints(scheduler: Scheduler, model: str, head: jsonc.Head) -> LeaseHints | None:
    return LeaseHints(chain=head.chain()) if scheduler.balanced(model) else None


def same_name(scheduler: Scheduler, model: str) -> str:
    return model


def mount(app: web.Application, port: Port, hints_for: HintsFor = default_hints,
          name_for: NameFor = same_name) -> None:
    for route in ROUTES:
        if port in route.ports:
            handle = handler(route, hints_for, name_for)
            for path in route.paths:
                app.router.add_route(route.method, path, handle)
    if port == "main":
        # Not model-routed: the WebUI's list of checkpoints is Corral's image models.
        app.router.add_get("/sdapi/v1/sd-models", sdapi.sd_models)
        # Calls are counted by capability at scrape time (every port shares these).
        if METRICS in app:
            app[METRICS].capability_of.update(
                {p: r.capability for r in ROUTES if r.capability for p in r.paths})


def handler(route: Route, hints_for: HintsFor, name_for: NameFor = same_name) -> Handler:
    if route.model_in == "form":
        return multipart.handler(route.family, route.capability, route.max_body, check,
                                 implied=sdapi.implied_model)
    dialect = family_dialect(route.family)
    # What a row decides once, not per call.
    prompted = route.capability in PROMPTED
    chat = route.capability == "chat"
    able = _Able(route.capability)

    async def handle(request: web.Request) -> web.StreamResponse:
        request[ROUTE_DIALECT] = dialect
        scheduler = request.app[SCHEDULER]
        async with request.app[BODY_BUDGET].hold(request.content_length or 0):
            if route.model_in == "query":
                body = None
                head = jsonc.Head(model=request.query.get("model") or None)
            else:
                body = await bodies.read(request, route.max_body)
                head = jsonc.head(body)
                if not prompted or request.path in _UNRUN:
                    head = jsonc.Head(model=head.model, stream=head.stream, ttl=head.ttl,
                                      request_id=head.request_id)
            model = name_for(scheduler, head.model or _default_model(request, route, body))
            await pulls.ensure(request.app, model)
            cfg = able.check(scheduler, model)
            if chat and vision.body_has_images(body):
                vision.require_vision(scheduler, model, cfg)
            if chat and body is not None and b"mcp" in body:
                # Names configured MCP servers: the tool loop answers (proxy/tools/).
                looped = await tools_entry.maybe(request, model, body)
                if looped is not None:
                    return looped
            path = route.upstream or request.path
            hints = hints_for(scheduler, model, head)
            bridge = families_bridge.of(route.family, request.path, path, body,
                                        request.app[FAMILIES], cfg, head.store)
            if (bridge is not None and bridge.translated_now and hints is not None
                    and hints.chain):
                # Always translated (the model's api lacks the family): its chain is
                # the chat's, which holds a Responses conversation's history too
                # (previous_response_id), so follow-ups share their past's prefixes.
                hints = dataclasses.replace(hints, chain=jsonc.chain_of(bridge.translated()))
            spec = Call(
                model=model,
                path=path,
                body=body,
                headers=_headers(request, route.family),
                hints=hints,
                method=route.method,
                query=request.query_string,
                feedback=feedback(request, cfg, route.family, head.streaming,
                                  route.capability),
                fit=context.of(path, body, family=route.family),
                call_id=head.call_id,
                # Translated to chat for an upstream that lacks the family.
                via=bridge.via if bridge is not None else None,
            )
            if bridge is not None:
                return await upstream.answer(request, route.family, spec, bridge.consume)
            return await upstream.answer(request, route.family, spec, relay)

    return handle


# Request headers that belong to an API family and go upstream with its body.
_FAMILY_HEADERS = {"anthropic": ("anthropic-version", "anthropic-beta")}


def _headers(request: web.Request, family: Family) -> Mapping[str, str]:
    names = _FAMILY_HEADERS.get(family)
    if not names or not any(n in request.headers for n in names):
        return JSON_HEADERS
    return {**JSON_HEADERS,
            **{n: request.headers[n] for n in names if n in request.headers}}


def _default_model(request: web.Request, route: Route, body: bytes | bytearray | None) -> str:
    scheduler = request.app[SCHEDULER]
    default = scheduler.config.server.default_model
    if route.native and default:
        return default
    implied = sdapi.implied_model(scheduler, route.capability, body)
    if implied is not None:
        return implied
    where = "the '?model=' query parameter" if route.model_in == "query" else "'model'"
    hint = " (or set [server] default_model)" if route.native else ""
    if route.capability in sdapi.OPTIONAL_MODEL and route.capability is not None:
        able = sdapi.able(scheduler, route.capability)
        hint = f" (models that serve {route.capability}: {', '.join(able) or 'none'})"
    raise BadRequest(f"{where} is required and must name a model{hint}")


class _Able:
    """``check()`` for one row, with each model config's capabilities remembered
    (deriving them cost a few µs a call); a reload's new configs are new objects."""

    __slots__ = ("_capability", "_known")

    def __init__(self, capability: Capability | None) -> None:
        self._capability = capability
        self._known: dict[int, tuple[ModelConfig, bool]] = {}

    def check(self, scheduler: Scheduler, model: str) -> ModelConfig:
        cfg = scheduler.resolve(model)
        known = self._known.get(id(cfg))
        if known is None or known[0] is not cfg:
            if len(self._known) >= 256:
                self._known.clear()
            capable = self._capability is None or self._capability in capabilities(cfg)
            known = self._known[id(cfg)] = (cfg, capable)
        if known[1]:
            return cfg
        return check(scheduler, model, self._capability)


def check(scheduler: Scheduler, model: str, capability: Capability | None) -> ModelConfig:
    """The model's config, if it can serve ``capability``; else a 400 naming those
    that can (UnknownModel, a 404, for a name nobody configured)."""
    cfg = scheduler.resolve(model)
    if capability is None or capability in capabilities(cfg):
        return cfg
    able = [n for n in scheduler.names() if capability in capabilities(scheduler.resolve(n))]
    raise CannotServe(model, capability, able)


def feedback(
    request: web.Request, cfg: ModelConfig, family: Family, streaming: bool,
    capability: Capability | None = "chat",
) -> Literal["comments", "visible"] | None:
    """What a stream shows while it waits for its model (None: nothing). A stream of
    partial images gets comments at most: "visible" is a chat chunk."""
    if not streaming or family == "native":
        return None
    asked = request.headers.get("X-Corral-Loading", "").lower()
    mode = asked if asked in ("visible", "comments", "off") else cfg.loading_feedback
    if mode == "off":
        return None
    return "visible" if mode == "visible" and capability not in sdapi.OPTIONAL_MODEL else (
        "comments")
