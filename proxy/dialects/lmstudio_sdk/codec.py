"""Frames of the LM Studio SDK websocket protocol (docs/compatibility.md, "SDKs").

Every frame is one JSON text message. The client sends ``rpcCall``,
``channelCreate``, ``channelSend`` (only ``{"type": "cancel"}``) and a few frames we
only tolerate; the server answers with ``rpcResult``/``rpcError`` per call and
``channelSend``* then ``channelClose`` (or ``channelError`` alone) per channel.

Two client rules shape the encoders: the JS SDK rejects ``null`` where a field is
optional (so ``rpcResult`` of a void endpoint has no ``result`` key at all), and the
Python SDK tears the connection down on any top-level frame that names neither a
call nor a channel, so nothing unsolicited is ever sent but a
``communicationWarning``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import msgspec

# The result of a void endpoint: rpcResult goes out without a ``result`` key.
VOID: Final = object()

# msgspec: every predicted fragment is a frame (proxy/calls/streaming.py has the figures).
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def dumps(frame: dict[str, Any]) -> str:
    return _encode(frame).decode()


class SdkError(Exception):
    """An error the client sees as ``rpcError``/``channelError``: a title and, for the
    codes the SDKs format (``generic.noModelMatchingQuery``...), display data."""

    def __init__(self, title: str, code: str | None = None, **display: Any) -> None:
        super().__init__(title)
        self.title = title
        self.code = code
        self.display = display

    def serialized(self) -> dict[str, Any]:
        """SerializedLMSExtendedError."""
        out: dict[str, Any] = {"title": self.title, "rootTitle": self.title}
        if self.code is not None:
            out["displayData"] = {"code": self.code, **self.display}
        return out


def error_payload(title: str) -> dict[str, Any]:
    return SdkError(title).serialized()


class FrameError(Exception):
    """A frame that cannot be served; the ids say where the answer goes."""

    def __init__(self, message: str, call_id: int | None = None,
                 channel_id: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.call_id = call_id
        self.channel_id = channel_id


@dataclass(frozen=True, slots=True)
class RpcCall:
    call_id: int
    endpoint: str
    parameter: Any


@dataclass(frozen=True, slots=True)
class ChannelCreate:
    channel_id: int
    endpoint: str
    parameter: Any


@dataclass(frozen=True, slots=True)
class ChannelSend:
    channel_id: int
    message: Any


@dataclass(frozen=True, slots=True)
class Ignored:
    """Frames needing no answer: acks, warnings, unsubscribes."""

    kind: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class KeepAlive:
    pass


@dataclass(frozen=True, slots=True)
class Subscribe:
    subscribe_id: int
    endpoint: str
    writable: bool


Frame = RpcCall | ChannelCreate | ChannelSend | Ignored | KeepAlive | Subscribe

_IGNORED = frozenset({"channelAck", "communicationWarning", "signalUnsubscribe",
                      "writableSignalUnsubscribe", "writableSignalUpdate"})


def _int(frame: dict[str, Any], key: str) -> int | None:
    value = frame.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse(text: str | bytes) -> Any:
    """Any JSON value, or None for text that is not JSON or is nested past the
    decoder's depth (the auth packet: stdlib ``json`` let a deeply nested one raise
    RecursionError out of the handler before the key was checked)."""
    try:
        return _decode(text)
    except (msgspec.DecodeError, RecursionError, UnicodeError):
        return None


def decode(text: str | bytes) -> Frame:
    """One client frame; FrameError for anything malformed."""
    try:
        frame = _decode(text)
    except (msgspec.DecodeError, RecursionError) as e:
        raise FrameError(f"frame is not JSON: {e}") from None
    if not isinstance(frame, dict):
        raise FrameError("frame is not a JSON object")
    kind = frame.get("type")
    call_id, channel_id = _int(frame, "callId"), _int(frame, "channelId")
    endpoint = frame.get("endpoint")
    if kind == "rpcCall":
        if call_id is None:
            raise FrameError("rpcCall without an integer callId")
        if not isinstance(endpoint, str):
            raise FrameError("rpcCall without an endpoint", call_id=call_id)
        return RpcCall(call_id, endpoint, frame.get("parameter"))
    if kind == "channelCreate":
        if channel_id is None:
            raise FrameError("channelCreate without an integer channelId")
        if not isinstance(endpoint, str):
            raise FrameError("channelCreate without an endpoint", channel_id=channel_id)
        return ChannelCreate(channel_id, endpoint, frame.get("creationParameter"))
    if kind == "channelSend":
        if channel_id is None:
            raise FrameError("channelSend without an integer channelId")
        return ChannelSend(channel_id, frame.get("message"))
    if kind == "keepAlive":
        return KeepAlive()
    if kind in ("signalSubscribe", "writableSignalSubscribe"):
        sub = _int(frame, "subscribeId")
        if sub is None:
            raise FrameError(f"{kind} without an integer subscribeId")
        return Subscribe(sub, str(endpoint), kind.startswith("writable"))
    if isinstance(kind, str) and kind in _IGNORED:
        return Ignored(kind, str(frame.get("warning", "")))
    raise FrameError(f"unknown frame type {kind!r}", call_id=call_id, channel_id=channel_id)


def rpc_result(call_id: int, result: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "rpcResult", "callId": call_id}
    if result is not VOID:
        out["result"] = result
    return out


def rpc_error(call_id: int, error: dict[str, Any]) -> dict[str, Any]:
    return {"type": "rpcError", "callId": call_id, "error": error}


def channel_send(channel_id: int, message: dict[str, Any]) -> dict[str, Any]:
    return {"type": "channelSend", "channelId": channel_id, "message": message}


def channel_close(channel_id: int) -> dict[str, Any]:
    return {"type": "channelClose", "channelId": channel_id}


def channel_error(channel_id: int, error: dict[str, Any]) -> dict[str, Any]:
    return {"type": "channelError", "channelId": channel_id, "error": error}


def signal_error(subscribe_id: int, error: dict[str, Any],
                 writable: bool = False) -> dict[str, Any]:
    kind = "writableSignalError" if writable else "signalError"
    return {"type": kind, "subscribeId": subscribe_id, "error": error}


def warning(text: str) -> dict[str, Any]:
    """The only frame that may go out unasked (both SDKs log it)."""
    return {"type": "communicationWarning", "warning": text}


KEEP_ALIVE_ACK: Final = {"type": "keepAliveAck"}


def answer_to_bad_frame(err: FrameError) -> dict[str, Any]:
    if err.call_id is not None:
        return rpc_error(err.call_id, error_payload(err.message))
    if err.channel_id is not None:
        return channel_error(err.channel_id, error_payload(err.message))
    return warning(err.message)
