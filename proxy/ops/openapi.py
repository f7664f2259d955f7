"""``GET /openapi.json`` on every port: every route the port serves, generated.

Model-routed endpoints come from the route table (``proxy.calls.routes``), with a request
schema per API family from the pydantic models below (named after the objects of
each API, extra fields allowed: a gateway passes on what it does not know) and the
configured model names as the ``model`` enum. Every other route is read from the
app's router, so nothing mounted can be missing from the document. Errors are
declared in the envelope each route answers with.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from proxy import __version__
from proxy.calls.routes import ROUTES, Port, Route
from proxy.keys import SCHEDULER

_OPEN = ConfigDict(extra="allow")
# A bound that keeps generated calls finite; real contexts are smaller still.
_MAX_TOKENS = 4096


class ChatMessage(BaseModel):
    model_config = _OPEN
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(BaseModel):
    model_config = _OPEN
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=0, le=_MAX_TOKENS)


class CompletionRequest(BaseModel):
    model_config = _OPEN
    model: str
    prompt: str | list[str]
    stream: bool = False
    max_tokens: int | None = Field(None, ge=0, le=_MAX_TOKENS)


class EmbeddingRequest(BaseModel):
    model_config = _OPEN
    model: str
    input: str | list[str]


class ResponsesRequest(BaseModel):
    model_config = _OPEN
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    stream: bool = False
    max_output_tokens: int | None = Field(None, ge=1, le=_MAX_TOKENS)


class AnthropicMessage(BaseModel):
    model_config = _OPEN
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(BaseModel):
    model_config = _OPEN
    model: str
    max_tokens: int = Field(ge=1, le=_MAX_TOKENS)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stream: bool = False


class CountTokensRequest(BaseModel):
    model_config = _OPEN
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)


class RerankRequest(BaseModel):
    model_config = _OPEN
    model: str
    query: str
    documents: list[str]
    top_n: int | None = Field(None, ge=1)


class SpeechRequest(BaseModel):
    """``POST /v1/audio/speech``: audio bytes back, or SSE with ``stream_format``."""

    model_config = _OPEN
    model: str | None = None
    input: str = Field(max_length=4096)
    voice: str | None = None
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float | None = Field(None, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"


class ImageGenerationRequest(BaseModel):
    """``POST /v1/images/generations`` (``stream``: partial-image events)."""

    model_config = _OPEN
    model: str | None = None
    prompt: str
    n: int | None = Field(None, ge=1, le=10)
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    stream: bool = False
    partial_images: int | None = Field(None, ge=0, le=3)


class Txt2ImgRequest(BaseModel):
    """stable-diffusion WebUI's txt2img and img2img; the model may be named in
    ``override_settings.sd_model_checkpoint``."""

    model_config = _OPEN
    model: str | None = None
    prompt: str
    negative_prompt: str | None = None
    steps: int | None = Field(None, ge=1, le=150)
    batch_size: int | None = Field(None, ge=1, le=8)
    override_settings: dict[str, Any] | None = None


class NativeRequest(BaseModel):
    """llama-server's own API: ``model`` picks the instance, the rest is its own."""

    model_config = _OPEN
    model: str | None = None


def _request_model(route: Route) -> type[BaseModel]:
    path = route.paths[0]
    if route.family == "anthropic":
        return CountTokensRequest if path.endswith("count_tokens") else MessagesRequest
    if route.family == "responses":
        return ResponsesRequest
    if route.family == "native":
        return NativeRequest
    if path.startswith("/sdapi/"):
        return Txt2ImgRequest
    by_capability: dict[str, type[BaseModel]] = {
        "chat": ChatCompletionRequest, "completion": CompletionRequest,
        "embedding": EmbeddingRequest, "rerank": RerankRequest,
        "speech": SpeechRequest, "image": ImageGenerationRequest,
    }
    return by_capability.get(route.capability or "", NativeRequest)


_OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message"], "properties": {"message": {"type": "string"}}}}}
_ANTHROPIC_ERROR = {"type": "object", "required": ["type", "error"], "properties": {
    "type": {"const": "error"}, "error": {"type": "object", "required": ["type", "message"]}}}
_OLLAMA_ERROR = {"type": "object", "required": ["error"],
                 "properties": {"error": {"type": "string"}}}
# A path that routes nowhere (a model id no route matches) is the port's 404.
_XINFERENCE_ERROR = {"anyOf": [{"type": "object", "required": ["detail"],
                                "properties": {"detail": {"type": "string"}}},
                               _OPENAI_ERROR]}


def _responses(error: dict[str, Any]) -> dict[str, Any]:
    body = {"content": {"application/json": {"schema": error}}}
    ok = {"description": "the answer (JSON, or a stream)", "content": {
        "application/json": {"schema": {}}, "text/event-stream": {"schema": {}},
        "application/x-ndjson": {"schema": {}}, "text/plain": {"schema": {}}}}
    out: dict[str, Any] = {"200": ok}
    for code, what in (("400", "bad request"), ("401", "no valid API key"),
                       ("403", "refused"), ("404", "no such model or route"),
                       ("413", "body too large"), ("429", "too many requests"),
                       ("501", "not supported"), ("502", "upstream failed"),
                       ("503", "overloaded or loading"), ("529", "overloaded")):
        out[code] = {"description": what, **body}
    return out


def _path(resource: web.AbstractResource) -> str:
    # "/v1/models/{model:.+}" -> "/v1/models/{model}"
    return re.sub(r"\{(\w+):[^}]*\}", r"{\1}", resource.canonical)


def document(app: web.Application, port: Port) -> dict[str, Any]:
    names = app[SCHEDULER].names()
    dialect_error = _OLLAMA_ERROR if port == "ollama" else _OPENAI_ERROR
    rows: dict[tuple[str, str], Route] = {
        (r.method, p): r for r in ROUTES if port in r.ports for p in r.paths}
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Any] = {}
    for resource in app.router.resources():
        path = _path(resource)
        for route in resource:
            method = route.method
            if method in ("HEAD", "*"):
                continue
            row = rows.get((method, path))
            op: dict[str, Any] = {"operationId": f"{method.lower()} {path}"}
            params = re.findall(r"\{(\w+)\}", path)
            if params:
                op["parameters"] = [{"name": p, "in": "path", "required": True,
                                     "schema": {"type": "string"}} for p in params]
            if row is not None:
                op["responses"] = _responses(
                    _ANTHROPIC_ERROR if row.family == "anthropic" else _OPENAI_ERROR)
                op["tags"] = [row.family]
                if row.capability == "speech" and method == "POST":
                    op["responses"]["200"]["content"]["audio/*"] = {"schema": {}}
                _add_body(op, row, names, schemas)
            else:
                # Xinference's routes answer errors in its envelope (dialects/xinference.py).
                xinference = getattr(route.handler, "error_envelope", "") == "xinference"
                op["responses"] = _responses(_XINFERENCE_ERROR if xinference else dialect_error)
                if method in ("POST", "PUT", "PATCH"):
                    op["requestBody"] = {"content": {"application/json": {
                        "schema": {"type": "object"}}}}
            paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": f"Corral ({port} port)", "version": __version__},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def _add_body(op: dict[str, Any], row: Route, names: list[str],
              schemas: dict[str, Any]) -> None:
    model_enum = {"type": "string", "enum": names} if names else {"type": "string"}
    if row.model_in == "query":
        op["parameters"] = [{"name": "model", "in": "query", "required": False,
                             "schema": model_enum}]
        return
    if row.model_in == "form":
        # An image edit's files are `image` (one or more) and `mask`; audio's is `file`.
        file = "image" if row.capability == "image" else "file"
        binary = {"type": "string", "format": "binary"}
        fields = {"model": model_enum, file: binary}
        if row.capability == "image":
            fields["mask"] = binary
        op["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["model", file], "properties": fields}}}}
        return
    model = _request_model(row)
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in schema.pop("$defs", {}).items():
        schemas[name] = sub
    schema["properties"]["model"] = model_enum
    schemas[model.__name__] = schema
    op["requestBody"] = {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}


def handler(port: Port) -> Any:
    async def handle(request: web.Request) -> web.Response:
        return web.json_response(document(request.app, port))

    return handle
