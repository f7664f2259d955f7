"""The common chat chunk, read without a dict parse (pure).

Nearly every chunk of a translated stream is one content delta that continues the
text already open. msgspec decodes it into these structs, skipping every field the
families never read, and the stream machines write its event from bytes around the
encoded text; anything else (the first chunk, reasoning, tool calls, a finish reason,
usage, an error) takes the general path: a dict parse and ``Stream.feed``.
"""

from __future__ import annotations

import msgspec


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: msgspec.Raw = msgspec.Raw()
    reasoning: msgspec.Raw = msgspec.Raw()
    tool_calls: msgspec.Raw = msgspec.Raw()


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: msgspec.Raw = msgspec.Raw()


class _Chunk(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: msgspec.Raw = msgspec.Raw()
    error: msgspec.Raw = msgspec.Raw()


_decode = msgspec.json.Decoder(_Chunk).decode
_NULL = b"null"


def _absent(raw: msgspec.Raw) -> bool:
    # Raw never equals bytes: a present field is copied out to be compared.
    return not raw or bytes(raw) == _NULL


def plain_text(data: bytes) -> str | None:
    """The text of a chunk that carries only a content delta; None: any other chunk
    (or one that is not a chat chunk at all), for the general path to judge."""
    try:
        chunk = _decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    choices = chunk.choices
    if not choices or not _absent(chunk.error) or not _absent(chunk.usage):
        return None
    c = choices[0]
    delta = c.delta
    if (delta is None or delta.content is None or not _absent(c.finish_reason)
            or not _absent(delta.reasoning_content) or not _absent(delta.reasoning)
            or not _absent(delta.tool_calls)):
        return None
    return delta.content


# A str as JSON, written as jsonc.dumps writes it (the events must read the same
# whichever path built them).
encode = msgspec.json.Encoder().encode
