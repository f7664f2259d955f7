"""What one upstream call is, for every path that sends one (proxy/calls/upstream.py)
and what serves it meanwhile (proxy/calls/feedback.py): the call to send (``Call``),
the client's side of it across attempts (``Client``) and the consumer that answers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import aiohttp
from aiohttp import web

from proxy.calls import context
from proxy.edge.errors import Family
from scheduler.scheduling.scheduler import LeaseHints, Upstream

T = TypeVar("T")

JSON_HEADERS: Mapping[str, str] = {"Content-Type": "application/json"}


class ClientLeft(ConnectionResetError):
    """The client went away while its answer was written (counted 499)."""


@dataclass(slots=True)
class Client:
    """The client side of one call, across its attempts."""

    # None for a caller that answers over something else (the LM Studio SDK's
    # websocket): it has no HTTP response to prepare.
    request: web.Request | None
    family: Family
    # Headers sent: by loading feedback, or by the answer itself.
    response: web.StreamResponse | None = None
    # Bytes of the answer have gone out: a failure can no longer be resent.
    answered: bool = False
    # The upstream answer being read: what an operator's cancel closes once the answer
    # flows (proxy/calls/tracking.py).
    upstream: aiohttp.ClientResponse | None = None
    # What the last attempt sent (after translation and request policy): a capture
    # records this body, not the one the client wrote.
    sent: Any = None


Consume = Callable[[Upstream, aiohttp.ClientResponse, Client], Awaitable[T]]


class FormData(Protocol):
    """A body built per attempt (a multipart form), with its ``model`` field set to
    ``rename`` for an upstream that names the model differently."""

    def __call__(self, rename: str | None = None) -> Any: ...


@dataclass(slots=True)
class Call:
    """One call to send upstream. Exactly one body: ``body`` (bytes as they came),
    ``payload`` (a translated body to encode), or ``data`` (built per attempt).

    Treated as immutable (changed with ``dataclasses.replace``) but not frozen: a
    frozen dataclass sets each of these fields through ``object.__setattr__``, a cost
    every call paid."""

    model: str
    path: str
    body: bytes | bytearray | None = None
    payload: Any = None
    data: FormData | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: JSON_HEADERS)
    hints: LeaseHints | None = None
    method: Literal["GET", "POST"] = "POST"
    query: str = ""
    # False for a body that is streamed through and cannot be sent twice.
    replayable: bool = True
    # Loading feedback for a stream that waits: None, "comments" or "visible".
    feedback: Literal["comments", "visible"] | None = None
    # The call to send instead to the upstream leased for an attempt (None: this one):
    # a family the upstream lacks goes as a translated chat call (proxy.dialects.families).
    via: Callable[[Upstream], Call | None] | None = None
    # Whether the prompt fits the leased instance's context (proxy/calls/context.py);
    # None: a call that generates nothing.
    fit: context.Fit | None = None
    # Another id the call answers to in the in-flight table, besides its request id:
    # the ``request_id`` an Xinference client put in the body.
    call_id: str | None = None
