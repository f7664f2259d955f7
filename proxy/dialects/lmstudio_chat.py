"""LM Studio's native REST v1 chat: ``POST /api/v1/chat`` on port 1234.

The request (``input``, ``system_prompt``, sampling fields, ``max_output_tokens``,
``store``, ``previous_response_id``) becomes an OpenAI chat streamed from
llama-server. With ``stream: true`` the answer is SSE with named events:
``chat.start``, ``model_load.start|progress|end`` when this call loads the model,
``prompt_processing.start|end``, ``reasoning.*`` and ``message.*`` deltas, ``error``,
and ``chat.end`` carrying the same result a non-streamed call returns. Stateful
chats keep the conversation per ``response_id`` in a bounded LRU store.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from typing import Any

from aiohttp import web

from proxy.dialects import translate
from proxy.dialects.chat_store import ChatStore
from proxy.dialects.lmstudio_sdk.models import ready
from proxy.dialects.lmstudio_sdk.upstream import event_batches
from proxy.edge import body as bodies
from proxy.edge import jsonc, reqlog
from proxy.edge.errors import public_message
from proxy.keys import CHAT_STORE, MCP_SERVERS, SCHEDULER
from proxy.tools import lmstudio as tools_lmstudio
from scheduler.errors import BadRequest, CorralError
from scheduler.scheduling import loadcost
from scheduler.scheduling.scheduler import LeaseHints

Event = tuple[str, dict[str, Any]]

_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
             "min_p": "min_p", "repeat_penalty": "repeat_penalty",
             "max_output_tokens": "max_tokens"}
PROGRESS_S = 1.0


def _input_messages(value: object) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise BadRequest("'input' must be a string or a non-empty list of input items")
    parts: list[dict[str, Any]] = []
    for item in value:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind in ("message", "text") and isinstance(item.get("content"), str):
            parts.append({"type": "text", "text": item["content"]})
        elif kind == "image" and isinstance(item.get("data_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": item["data_url"]}})
        else:
            raise BadRequest(f"unsupported input item {item!r}")
    if all(p["type"] == "text" for p in parts):
        return [{"role": "user", "content": "".join(p["text"] for p in parts)}]
    return [{"role": "user", "content": parts}]


def request_body(payload: dict[str, Any], store: ChatStore) -> tuple[str, dict[str, Any]]:
    """(model, llama-server chat body) of a /api/v1/chat request."""
    model = jsonc.model_of(payload)
    if payload.get("integrations"):
        # Answered by the tool loop (proxy/tools/lmstudio.py), which takes them out.
        raise BadRequest("'integrations' need [[mcp_servers]] in Corral's config")
    history: list[dict[str, Any]] = []
    previous = payload.get("previous_response_id")
    if previous is not None:
        found = store.get(previous) if isinstance(previous, str) else None
        if found is None:
            raise BadRequest(f"unknown previous_response_id {previous!r} (Corral keeps the "
                             "most recent stateful chats only)")
        history = found
    system = payload.get("system_prompt")
    if isinstance(system, str) and system and not history:
        history = [{"role": "system", "content": system}]
    body: dict[str, Any] = {
        "model": model, "messages": history + _input_messages(payload.get("input")),
        "stream": True, "stream_options": {"include_usage": True},
    }
    for ours, theirs in _SAMPLING.items():
        value = payload.get(ours)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise BadRequest(f"'{ours}' must be a number")
            body[theirs] = value
    if payload.get("reasoning") == "off":
        body["chat_template_kwargs"] = {"enable_thinking": False}
    return model, body


async def _load(app: web.Application, model: str) -> AsyncGenerator[Event, None]:
    """The model_load.* events of a call that finds its model not loaded."""
    scheduler = app[SCHEDULER]
    if ready(scheduler, model):
        return
    start = time.perf_counter()
    yield "model_load.start", {"model_instance_id": model}

    async def warm() -> None:
        async with scheduler.lease(model, LeaseHints()):
            pass

    task = asyncio.create_task(warm())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=PROGRESS_S)
            if done:
                break
            # Against the model's median load time, counted from the launch.
            expected, since = scheduler.load_estimate(model)
            elapsed = time.perf_counter() - start if since is None else since
            yield "model_load.progress", {"model_instance_id": model,
                                          "progress": loadcost.progress(expected, elapsed)}
        task.result()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, CorralError):
            await task
    yield "model_load.end", {"model_instance_id": model,
                             "load_time_seconds": round(time.perf_counter() - start, 3)}


async def events(app: web.Application, model: str, body: dict[str, Any], store: bool
                 ) -> AsyncGenerator[Event, None]:
    """Every event of one chat; the last is chat.end with the whole result."""
    yield "chat.start", {"model_instance_id": model}
    load_time: float | None = None
    async for name, data in _load(app, model):
        load_time = data.get("load_time_seconds", load_time)
        yield name, data
    started = time.perf_counter()
    ttft: float | None = None
    text, reasoning, state = "", "", ""
    timings: dict[str, Any] = {}
    usage: dict[str, Any] = {}
    error: str | None = None
    yield "prompt_processing.start", {}
    try:
        async with contextlib.aclosing(
            event_batches(app, model, "/v1/chat/completions", body)
        ) as batches:
            async for batch in batches:
                for event in batch:
                    if "error" in event:
                        raise translate.upstream_error(event)
                    timings = event.get("timings") or timings
                    usage = event.get("usage") or usage
                    choices = event.get("choices") or [{}]
                    delta = choices[0].get("delta") or {}
                    for key, kind in (("reasoning_content", "reasoning"), ("content", "message")):
                        piece = delta.get(key)
                        if not isinstance(piece, str) or not piece:
                            continue
                        if ttft is None:
                            ttft = time.perf_counter() - started
                            yield "prompt_processing.end", {}
                        if state != kind:
                            if state:
                                yield f"{state}.end", {}
                            state = kind
                            yield f"{kind}.start", {}
                        yield f"{kind}.delta", {"content": piece}
                        if kind == "message":
                            text += piece
                        else:
                            reasoning += piece
    except CorralError as e:
        error = public_message(e)
    if ttft is None and error is None:
        yield "prompt_processing.end", {}
    if state:
        yield f"{state}.end", {}
    if error is not None:
        yield "error", {"error": {"type": "unknown", "message": error}}
    output: list[dict[str, Any]] = []
    if reasoning:
        output.append({"type": "reasoning", "content": reasoning})
    output.append({"type": "message", "content": text})
    predicted = int(timings.get("predicted_n", usage.get("completion_tokens", 0)) or 0)
    stats: dict[str, Any] = {
        "input_tokens": int(usage.get("prompt_tokens") or
                            (timings.get("prompt_n", 0) + timings.get("cache_n", 0))),
        "total_output_tokens": predicted,
        "reasoning_output_tokens": 0,
        "tokens_per_second": float(timings.get("predicted_per_second", 0.0)),
        "time_to_first_token_seconds": round(ttft or 0.0, 4),
    }
    if load_time is not None:
        stats["model_load_time_seconds"] = load_time
    result: dict[str, Any] = {"model_instance_id": model, "output": output, "stats": stats}
    if store and error is None:
        messages = [*body["messages"], {"role": "assistant", "content": text}]
        result["response_id"] = app[CHAT_STORE].put(messages)
    yield "chat.end", {"result": result}


def _sse(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + jsonc.dumps({"type": name, **data}) + b"\n\n"


async def chat(request: web.Request) -> web.StreamResponse:
    payload = await bodies.read_json(request)
    if payload.get("integrations") and MCP_SERVERS in request.app:
        # Configured MCP servers, named: the tool loop answers (proxy/tools/).
        return await tools_lmstudio.answer(request, payload, request_body)
    model, body = request_body(payload, request.app[CHAT_STORE])
    request.app[SCHEDULER].resolve(model)  # an unknown model is a 404 before any event
    store = payload.get("store", True) is not False
    stream = events(request.app, model, body, store)
    if not payload.get("stream"):
        result: dict[str, Any] = {}
        async with contextlib.aclosing(stream):
            async for name, data in stream:
                if name == "error":
                    raise CorralError(data["error"]["message"])
                if name == "chat.end":
                    result = data["result"]
        return web.json_response(result)
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                      "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await out.prepare(request)
    async with contextlib.aclosing(stream):
        async for name, data in stream:
            if name == "chat.end":
                reqlog.mark_ended()
            await out.write(_sse(name, data))
    await out.write_eof()
    return out


def add_routes(app: web.Application) -> None:
    app[CHAT_STORE] = ChatStore()
    app.router.add_post("/api/v1/chat", chat)
