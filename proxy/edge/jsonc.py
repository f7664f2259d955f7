"""The one JSON codec: msgspec behind three small functions, so the choice can change
in one place.

``head()`` is what the pass-through needs from a body: the model, the stream flag and
the prompt's parts for its chain of prefixes (replica choice and the slot cache). It
decodes into a typed struct, which makes msgspec skip every other field without
building it: a 50 MB embeddings body is read
in tens of milliseconds and leaves no parsed copy behind.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from scheduler.errors import BadRequest
from scheduler.scheduling import prefixes
from scheduler.scheduling.prefixes import Chain

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
    # Xinference's clients name a call by a body field (generate_config's
    # ``request_id``) where others send X-Request-Id: its abort route finds it so.
    request_id: Any = None
    # Responses' ``store`` (false: the server keeps nothing of the call).
    store: Any = None
    # The prompt's parts, kept as raw bytes: they are only hashed (chain()).
    messages: list[msgspec.Raw] | None = None
    tools: msgspec.Raw = msgspec.Raw()
    system: msgspec.Raw = msgspec.Raw()
    instructions: msgspec.Raw = msgspec.Raw()
    prompt: msgspec.Raw = msgspec.Raw()
    input: msgspec.Raw = msgspec.Raw()

    @property
    def streaming(self) -> bool:
        return self.stream is True

    @property
    def call_id(self) -> str | None:
        rid = self.request_id
        return rid if isinstance(rid, str) and 0 < len(rid) <= 128 else None

    def chain(self) -> Chain:
        """The call's prompt as a chain of prefixes (scheduler/scheduling/prefixes.py):
        a link after the tools and system prompt (Anthropic's ``system``, Responses'
        ``instructions``), then one after each message or Responses input item; a raw
        prompt, one every ``prefixes.BLOCK`` bytes."""
        if not self.messages and not self.input:
            return prefixes.prompt_chain(self.prompt) if self.prompt else ()
        b = prefixes.ChainBuilder()
        # Absent parts add nothing to the hash: skipped, as most calls have none.
        if self.tools:
            b.add(self.tools)
        if self.system:
            b.add(_unstamped(self.system))
        if self.instructions:
            b.add(self.instructions)
        b.cut()
        items = self.messages or _items(self.input)
        for m in items:
            b.add(m)
            b.cut()
        return b.chain()


# Claude Code's system prompt starts with "x-anthropic-billing-header: ...; cch=a5145;",
# a stamp that changes on every call; llama-server edits it out of the prompt
# (llama.cpp#21793), and so must the hash, or no two calls of a session would share
# their system prompt.
_BILLING = b"x-anthropic-billing-header:"
_STAMP = re.compile(rb"cch=[0-9A-Za-z]+")


def _unstamped(system: msgspec.Raw) -> bytes | msgspec.Raw:
    view = memoryview(system)
    head = bytes(view[:512])
    if _BILLING not in head:
        return system
    return _STAMP.sub(b"cch=", head, count=1) + bytes(view[512:])


_input_decoder = msgspec.json.Decoder(str | list[msgspec.Raw])


def _items(raw: msgspec.Raw) -> list[msgspec.Raw] | tuple[msgspec.Raw]:
    """A Responses ``input``: its items, or the one string."""
    try:
        decoded = _input_decoder.decode(raw)
    except msgspec.DecodeError:  # a ValidationError too: anything else is one block
        return (raw,)
    return (raw,) if isinstance(decoded, str) else decoded


def chain_of(payload: dict[str, Any]) -> Chain:
    """``Head.chain()`` of a body Corral built itself (a translated chat or prompt):
    each message as encoded here, the same across a conversation's calls."""
    messages = payload.get("messages")
    if isinstance(messages, list) and messages:
        return prefixes.chain_of([dumps(payload.get("tools")), *map(dumps, messages)])
    prompt = payload.get("prompt")
    if prompt:
        return prefixes.prompt_chain(dumps(prompt))
    return ()


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
