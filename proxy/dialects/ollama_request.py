"""Ollama requests as llama-server's OpenAI-compatible bodies (pure, no I/O).

Messages (images, tool calls, thinking), tools, logprobs and the common sampling keys
of /api/chat and /api/generate become one /v1/chat/completions or /v1/completions body
(docs/compatibility.md). A client's mistake raises ``BadRequest`` (400).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from proxy.dialects.translate import (
    completion_format,
    parse_think,
    response_format,
    sampler_params,
    template_kwargs,
)
from scheduler.errors import BadRequest

# --- messages -------------------------------------------------------------------------

_IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


def image_url(data: object) -> str:
    """An Ollama image (bare base64) as the data URL llama-server reads."""
    if not isinstance(data, str) or not data:
        raise BadRequest("images must be base64-encoded strings")
    # Some clients already send a data URL; keep only the payload.
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    head = data[:32]
    try:
        raw = base64.b64decode(head + "=" * (-len(head) % 4))
    except (binascii.Error, ValueError):
        raise BadRequest("images must be base64-encoded strings") from None
    mime = "image/jpeg"  # Ollama's fallback too
    for magic, kind in _IMAGE_MAGIC:
        if raw.startswith(magic):
            mime = kind
            break
    else:
        if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
            mime = "image/webp"
    return f"data:{mime};base64,{data}"


def _content(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if not isinstance(content, str):
        raise BadRequest("message content must be a string")
    return content


def _call_arguments(arguments: object) -> str:
    # OpenAI wants a JSON string; Ollama sends an object. A string is kept as sent.
    if arguments is None:
        return "{}"
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, separators=(",", ":"))


def openai_messages(messages: object) -> list[dict[str, Any]]:
    """Ollama chat messages -> OpenAI messages for llama-server.

    Images become content parts with data URLs; assistant tool calls get string
    arguments; tool results get a ``tool_call_id`` (synthesised when missing, paired
    with the preceding assistant's calls by name, then in order) because some chat
    templates need one. ``thinking`` on history messages is dropped.
    """
    if not isinstance(messages, list):
        raise BadRequest("messages must be a list")
    out: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []  # (id, name) of calls not yet answered
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest("each message must be an object")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise BadRequest("each message needs a 'role'")
        role = role.lower()
        content = _content(message)
        msg: dict[str, Any] = {"role": role, "content": content}
        images = message.get("images")
        if images:
            if not isinstance(images, list):
                raise BadRequest("images must be a list of base64 strings")
            parts: list[dict[str, Any]] = [{"type": "text", "text": content}] if content else []
            parts += [{"type": "image_url", "image_url": {"url": image_url(im)}} for im in images]
            msg["content"] = parts
        calls = message.get("tool_calls")
        if role == "assistant" and calls:
            if not isinstance(calls, list):
                raise BadRequest("tool_calls must be a list")
            msg["tool_calls"] = []
            for k, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise BadRequest("each tool call needs function.name")
                call_id = call.get("id") or f"call_{i}_{k}"
                index = fn.get("index", k)
                msg["tool_calls"].append({
                    "id": call_id,
                    "type": "function",
                    "index": index if isinstance(index, int) else k,
                    "function": {
                        "name": fn["name"],
                        "arguments": _call_arguments(fn.get("arguments")),
                    },
                })
                pending.append((call_id, fn["name"]))
        if role == "tool":
            name = message.get("tool_name") or message.get("name")
            call_id = message.get("tool_call_id")
            if not call_id:
                match = next((p for p in pending if p[1] == name), pending[0] if pending else None)
                call_id = match[0] if match else f"call_{i}"
            pending = [p for p in pending if p[0] != call_id]
            msg["tool_call_id"] = call_id
            if isinstance(name, str) and name:
                msg["name"] = name
        out.append(msg)
    return out


def _tools(tools: object) -> list[Any] | None:
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise BadRequest("tools must be a list")
    return tools


def _logprobs(req: Mapping[str, Any]) -> dict[str, Any]:
    top = req.get("top_logprobs")
    valid = isinstance(top, int) and not isinstance(top, bool) and 0 <= top <= 20
    if top is not None and not valid:
        raise BadRequest("top_logprobs must be between 0 and 20")
    if not req.get("logprobs") and not top:
        return {}
    out: dict[str, Any] = {"logprobs": True}
    if top:
        out["top_logprobs"] = top
    return out


def _common(req: Mapping[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "stream": True,  # always: one loop serves streamed and whole answers
        "stream_options": {"include_usage": True},
        "cache_prompt": True,
        **sampler_params(req.get("options")),
        **_logprobs(req),
    }
    if body.get("n_predict", -1) >= 0:
        # llama-server reads n_predict first; a remote vLLM/SGLang/Ollama upstream only
        # knows max_tokens and would otherwise generate without a limit.
        body["max_tokens"] = body["n_predict"]
    kwargs = template_kwargs(parse_think(req.get("think")))
    if kwargs is not None:
        body["chat_template_kwargs"] = kwargs
    return body


def chat_body(req: Mapping[str, Any], model: str) -> dict[str, Any]:
    """An Ollama /api/chat request -> llama-server /v1/chat/completions body."""
    body = {"model": model, "messages": openai_messages(req.get("messages")), **_common(req)}
    tools = _tools(req.get("tools"))
    if tools is not None:
        body["tools"] = tools
    rf = response_format(req.get("format"))
    if rf is not None:
        body["response_format"] = rf
    return body


def generate_call(req: Mapping[str, Any], model: str) -> tuple[str, dict[str, Any]]:
    """An Ollama /api/generate request -> (llama-server path, body).

    ``raw`` prompts go to /v1/completions untouched; ``suffix`` (fill-in-the-middle)
    goes to /infill; anything else becomes a chat with an optional system message,
    so that llama-server applies the model's template. ``template`` (a Go template)
    cannot be honoured and ``context`` is deprecated: both are ignored.
    """
    prompt = req.get("prompt") or ""
    system = req.get("system")
    if not isinstance(prompt, str) or (system is not None and not isinstance(system, str)):
        raise BadRequest("prompt and system must be strings")
    images = req.get("images") or []
    if req.get("raw"):
        if req.get("template") or system or req.get("context"):
            raise BadRequest("raw mode does not support template, system, or context")
        if images:
            raise BadRequest("raw mode does not support images on this server")
        body = {"model": model, "prompt": prompt, **_common(req)}
        body.pop("chat_template_kwargs", None)
        body.update(completion_format(req.get("format")) or {})
        return "/v1/completions", body
    suffix = req.get("suffix")
    if suffix:
        if not isinstance(suffix, str):
            raise BadRequest("suffix must be a string")
        body = {"model": model, "input_prefix": prompt, "input_suffix": suffix, **_common(req)}
        body.pop("stream_options")
        body.pop("chat_template_kwargs", None)
        return "/infill", body
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt, "images": images})
    return "/v1/chat/completions", chat_body({**req, "messages": messages, "tools": None}, model)


