"""The one JSON codec: msgspec behind three small functions, so the choice can change
in one place.

``head()`` is what the pass-through needs from a body: the model, the stream flag and
the leading messages for prefix affinity. It decodes into a typed struct, which makes
msgspec skip every other field without building it: a 50 MB embeddings body is read
in tens of milliseconds and leaves no parsed copy behind.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from scheduler.errors import BadRequest

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def _bad(e: Exception) -> BadRequest:
    if isinstance(e, RecursionError):
        return BadRequest("request body is nested too deeply")
    # msgspec names the byte or the path ("at `$.model`"): helpful as it is.
    return BadRequest(f"request body is not valid JSON: {e}")


def loads(body: bytes | bytearray | memoryview) -> Any:
    try:
        return _decoder.decode(body)
    except (msgspec.DecodeError, RecursionError) as e:
        raise _bad(e) from None


def dumps(obj: Any) -> bytes:
    return _encoder.encode(obj)


def loads_object(body: bytes | bytearray | memoryview) -> dict[str, Any]:
    """A JSON object body, parsed whole (the translating dialects need all of it)."""
    if not body:
        raise BadRequest("missing request body")
    payload = loads(body)
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    return payload


def model_of(payload: dict[str, Any]) -> str:
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a string")
    return model


class Head(msgspec.Struct):
    """The fields of a model-routed body that Corral itself reads."""

    model: str | None = None
    stream: Any = None
    # LM Studio's idle TTL, read on its port.
    ttl: Any = None
    # The conversation's start, kept as raw bytes: it is only hashed.
    messages: list[msgspec.Raw] | None = None
    system: msgspec.Raw = msgspec.Raw()
    prompt: msgspec.Raw = msgspec.Raw()
    input: msgspec.Raw = msgspec.Raw()

    @property
    def streaming(self) -> bool:
        return self.stream is True

    def prefix_key(self) -> str | None:
        """A hash of what a follow-up call shares with this one: the system prompt
        and first turn of a chat, or the start of a prompt or a Responses input."""
        h = hashlib.blake2b(digest_size=8)
        if self.messages:
            h.update(self.system)
            for m in self.messages[:2]:
                h.update(m)
        elif self.prompt:
            h.update(memoryview(self.prompt)[:256])
        elif self.input:
            h.update(memoryview(self.input)[:512])
        else:
            return None
        return h.hexdigest()


def prefix_key_of(payload: dict[str, Any]) -> str | None:
    """``Head.prefix_key()`` for a body Corral built itself (a translated chat): the
    hash of its first two messages as encoded here, stable across a conversation."""
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    return hashlib.blake2b(dumps(messages[:2]), digest_size=8).hexdigest()


_head_decoder = msgspec.json.Decoder(Head)


def head(body: bytes | bytearray | memoryview) -> Head:
    if not body:
        raise BadRequest("missing request body")
    try:
        return _head_decoder.decode(body)
    except msgspec.ValidationError as e:
        text = str(e)
        if "`$.model`" in text:
            raise BadRequest("'model' must be a string") from None
        if text.startswith("Expected `object`"):
            raise BadRequest("request body must be a JSON object") from None
        raise BadRequest(f"request body is not valid: {text}") from None
    except (msgspec.DecodeError, RecursionError) as e:
        raise _bad(e) from None
