"""The fake llama-server's other API families: Anthropic Messages, OpenAI Responses,
token counting, rerank, audio transcriptions and the native routes.

Shapes follow llama-server's (``server-task.cpp``: ``to_json_anthropic*``,
``to_json_oaicompat_resp*``). Text is the words of the last user turn, one per token,
as in the chat fake. ``FAKE_TOKEN_DELAY`` paces streams here too. The transcription
route reads the upload as it arrives and answers with what it received (its size, the
form's fields), so a test can check that Corral relayed a large file whole.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
from aiohttp import web

ReadJson = Callable[[web.Request], Awaitable[dict[str, Any] | web.Response]]
# llama-server's refusal of a prompt longer than the slot's context (None: it fits).
Exceeded = Callable[[web.Request, int], web.Response | None] | None


def _words(text: str) -> list[str]:
    return text.split() or ["hello"]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(b.get("text", "")) for b in content if isinstance(b, dict) and "text" in b
        )
    return ""


def _pieces(source: str, limit: Any) -> tuple[list[str], bool]:
    count = limit if isinstance(limit, int) and limit >= 0 else 8
    words = _words(source)
    return [("" if i == 0 else " ") + words[i % len(words)] for i in range(count)], (
        isinstance(limit, int)
    )


def _delay() -> float:
    try:
        return float(os.environ.get("FAKE_TOKEN_DELAY", "0"))
    except ValueError:
        return 0.0


def _sse(event: str | None, data: dict[str, Any]) -> bytes:
    head = f"event: {event}\n" if event else ""
    return (head + "data: " + json.dumps(data) + "\n\n").encode()


async def _stream(request: web.Request, frames: Iterator[bytes]) -> web.StreamResponse:
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await out.prepare(request)
    delay = _delay()
    for frame in frames:
        await out.write(frame)
        if delay:
            await asyncio.sleep(delay)
    await out.write_eof()
    return out


def _error(status: int, message: str) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response({"error": {"code": status, "message": message, "type": kind}},
                             status=status)


# --- Anthropic Messages -----------------------------------------------------------------


def _last_user(messages: Any) -> tuple[str, int]:
    last, tokens = "", 0
    for m in messages if isinstance(messages, list) else []:
        if isinstance(m, dict):
            text = _text(m.get("content"))
            tokens += len(text.split()) + 4
            if m.get("role") == "user":
                last = text
    return last, tokens


def messages_handler(read_json: ReadJson, exceeded: Exceeded = None
                     ) -> Callable[[web.Request], Awaitable[Any]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        if not isinstance(body.get("messages"), list):
            return _error(400, "'messages' is required")
        source, prompt_tokens = _last_user(body["messages"])
        if exceeded is not None and (refused := exceeded(request, prompt_tokens)) is not None:
            return refused
        pieces, limited = _pieces(source, body.get("max_tokens"))
        stop = "max_tokens" if limited else "end_turn"
        model = str(body.get("model") or "fake")
        ident = f"msg_{int(time.time() * 1e6):x}"
        usage = {"input_tokens": prompt_tokens, "output_tokens": len(pieces)}
        if not body.get("stream"):
            return web.json_response({
                "id": ident, "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": "".join(pieces)}],
                "stop_reason": stop, "stop_sequence": None, "usage": usage,
            })

        def frames() -> Iterator[bytes]:
            yield _sse("message_start", {"type": "message_start", "message": {
                "id": ident, "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}})
            yield _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": {"type": "text", "text": ""}})
            for p in pieces:
                yield _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                   "delta": {"type": "text_delta", "text": p}})
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
            yield _sse("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": stop, "stop_sequence": None},
                                         "usage": {"output_tokens": len(pieces)}})
            yield _sse("message_stop", {"type": "message_stop"})

        return await _stream(request, frames())

    return handle


def count_tokens_handler(read_json: ReadJson) -> Callable[[web.Request], Awaitable[Any]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        if "messages" in body:
            _, tokens = _last_user(body["messages"])
        else:
            tokens = len(_text(body.get("input")).split()) + 4
        if request.path.startswith("/v1/messages"):
            return web.json_response({"input_tokens": tokens})
        return web.json_response({"object": "response.input_tokens", "input_tokens": tokens})

    return handle


# --- OpenAI Responses ---------------------------------------------------------------------


def responses_handler(read_json: ReadJson) -> Callable[[web.Request], Awaitable[Any]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        given = body.get("input")
        source = given if isinstance(given, str) else _last_user(given)[0]
        pieces, _ = _pieces(source, body.get("max_output_tokens"))
        model = str(body.get("model") or "fake")
        ident = f"resp_{int(time.time() * 1e6):x}"
        text = "".join(pieces)
        item = {"type": "message", "id": f"msg_{ident}", "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}
        usage = {"input_tokens": len(source.split()), "output_tokens": len(pieces),
                 "total_tokens": len(source.split()) + len(pieces)}
        done = {"id": ident, "object": "response", "created_at": int(time.time()),
                "status": "completed", "model": model, "output": [item], "usage": usage}
        if not body.get("stream"):
            return web.json_response(done)

        def frames() -> Iterator[bytes]:
            seq = iter(range(1 << 30))
            started = {**done, "status": "in_progress", "output": []}
            for kind in ("response.created", "response.in_progress"):
                yield _sse(kind, {"type": kind, "response": started,
                                  "sequence_number": next(seq)})
            yield _sse("response.output_item.added", {
                "type": "response.output_item.added", "output_index": 0,
                "item": {**item, "status": "in_progress", "content": []},
                "sequence_number": next(seq)})
            for p in pieces:
                yield _sse("response.output_text.delta", {
                    "type": "response.output_text.delta", "item_id": item["id"],
                    "output_index": 0, "content_index": 0, "delta": p,
                    "sequence_number": next(seq)})
            yield _sse("response.output_item.done", {
                "type": "response.output_item.done", "output_index": 0, "item": item,
                "sequence_number": next(seq)})
            yield _sse("response.completed", {"type": "response.completed", "response": done,
                                              "sequence_number": next(seq)})

        return await _stream(request, frames())

    return handle


# --- rerank, audio, native ----------------------------------------------------------------


def rerank_handler(read_json: ReadJson) -> Callable[[web.Request], Awaitable[Any]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        query = set(str(body.get("query", "")).split())
        docs = body.get("documents")
        if not isinstance(docs, list):
            return _error(400, "'documents' must be a list")
        scored = [{"index": i, "relevance_score": float(len(query & set(str(d).split())))}
                  for i, d in enumerate(docs)]
        scored.sort(key=lambda r: -r["relevance_score"])
        return web.json_response({"model": body.get("model"), "object": "list",
                                  "results": scored, "usage": {"prompt_tokens": len(docs)}})

    return handle


async def handle_transcription(request: web.Request) -> web.StreamResponse:
    reader = await request.multipart()
    fields: dict[str, str] = {}
    received = 0
    while (part := await reader.next()) is not None:
        if not isinstance(part, aiohttp.BodyPartReader):
            continue
        if part.filename is None:
            fields[part.name or ""] = (await part.read()).decode()
            continue
        while chunk := await part.read_chunk(1 << 16):
            received += len(chunk)
    return web.json_response({"text": f"{received} bytes", "fields": fields})


def native_handler(read_json: ReadJson) -> Callable[[web.Request], Awaitable[Any]]:
    """/infill, /detokenize: an echo of what was asked (/apply-template is the
    chat fake's)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        if request.path == "/detokenize":
            tokens = body.get("tokens") or []
            return web.json_response({"content": " ".join(f"t{t}" for t in tokens)})
        pieces, _ = _pieces(str(body.get("input_prefix", "")), body.get("n_predict"))
        return web.json_response({"content": "".join(pieces), "stop": True})

    return handle


# FAKE_REFUSE=messages,responses: these families' routes answer 404, as on a server
# that speaks only chat completions (an old vLLM), so a test can see Corral translate.
_FAMILY_PATHS = {
    "messages": ("/v1/messages", "/v1/messages/count_tokens"),
    "responses": ("/v1/responses", "/responses", "/v1/responses/input_tokens"),
}


def add_routes(app: web.Application, read_json: ReadJson, exceeded: Exceeded = None) -> None:
    r = app.router
    refused = {p for f in os.environ.get("FAKE_REFUSE", "").split(",")
               for p in _FAMILY_PATHS.get(f.strip(), ())}

    def post(path: str, handler: Callable[[web.Request], Awaitable[Any]]) -> None:
        if path not in refused:
            r.add_post(path, handler)

    for path in ("/v1/messages",):
        post(path, messages_handler(read_json, exceeded))
    for path in ("/v1/messages/count_tokens", "/v1/responses/input_tokens",
                 "/v1/chat/completions/input_tokens"):
        post(path, count_tokens_handler(read_json))
    for path in ("/v1/responses", "/responses"):
        post(path, responses_handler(read_json))
    for path in ("/rerank", "/reranking", "/v1/rerank", "/v1/reranking"):
        r.add_post(path, rerank_handler(read_json))
    r.add_post("/v1/audio/transcriptions", handle_transcription)
    for path in ("/infill", "/detokenize"):
        r.add_post(path, native_handler(read_json))
