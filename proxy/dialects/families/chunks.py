"""The common chat chunk, read without a dict parse (pure).

Nearly every chunk of a translated stream is one content delta that continues the
text already open. msgspec decodes it into these structs, skipping every field the
families never read, and the stream machines write its event from bytes around the
encoded text; anything else (the first chunk, reasoning, tool calls, a finish reason,
usage, an error) takes the general path: a dict parse and ``Stream.feed``.
"""

from __future__ import annotations

import msgspec


# A field typed None takes only null: any other value fails the decode, in C, and the
# chunk goes to the general path.
class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: None = None
    reasoning: None = None
    tool_calls: None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: None = None
    # Takes nothing, null included: the general path ends the stream at any "error".
    error: msgspec.UnsetType = msgspec.UNSET


_decode = msgspec.json.Decoder(_Chunk).decode


def plain_text(data: bytes) -> str | None:
    """The text of a chunk that carries only a content delta; None: any other chunk
    (or one that is not a chat chunk at all), for the general path to judge."""
    try:
        choices = _decode(data).choices
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    if not choices:
        return None
    delta = choices[0].delta
    return None if delta is None else delta.content


# A str as JSON, written as jsonc.dumps writes it (the events must read the same
# whichever path built them).
encode = msgspec.json.Encoder().encode
