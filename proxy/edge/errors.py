"""One middleware that renders Corral's errors in the caller's dialect.

Handlers raise ``scheduler.errors.CorralError`` (the tree is drawn there, proxy
errors such as ``BadRequest`` included); this module owns every error body.
OpenAI callers get ``{"error": {...}}`` with the error's origin in ``src``, so a
client can tell a gateway error from one that the model server produced (those are
relayed untouched).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Literal

from aiohttp import web

from proxy.edge import reqlog
from scheduler.errors import (
    ContextTooLong,
    CorralError,
    Overloaded,
    RateLimited,
    RemotesDown,
    ShuttingDown,
    UpstreamFailed,
)

log = logging.getLogger(__name__)

# The envelope of an error body: the port's own, or the API family of the route.
Dialect = Literal["openai", "ollama", "lmstudio", "anthropic"]
# The API families of model-routed endpoints (proxy.calls.routes); each implies a dialect.
Family = Literal["openai", "responses", "anthropic", "native"]
# Set by a model-routed handler: its family's envelope wins over the port's.
ROUTE_DIALECT = web.RequestKey("corral_route_dialect", str)


def family_dialect(family: Family) -> Dialect:
    return "anthropic" if family == "anthropic" else "openai"


# Anthropic's error types by status (docs: errors); 529 is its "overloaded".
_ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
    529: "overloaded_error",
}


def anthropic_status(err: CorralError) -> int:
    return 529 if isinstance(err, Overloaded | ShuttingDown) else err.status


def anthropic_body(err: CorralError) -> dict[str, object]:
    kind = _ANTHROPIC_TYPES.get(anthropic_status(err), "api_error")
    return {"type": "error", "error": {"type": kind, "message": message(err, "anthropic")}}


def message(err: CorralError, dialect: Dialect) -> str:
    """The error's message as the dialect words it: a prompt too long for any context
    reads as each family's own error does, which clients recognise (Claude Code compacts
    the conversation on Anthropic's, OpenAI clients look for context_length_exceeded)."""
    if not isinstance(err, ContextTooLong):
        return public_message(err)
    n, most, out = err.tokens, err.maximum, err.output
    if dialect == "anthropic":
        return f"prompt is too long: {n} tokens > {most} maximum"
    if dialect == "ollama":
        return f"the input length exceeds the context length ({n} tokens > {most} maximum)"
    if dialect == "lmstudio":
        return (f"The number of tokens to keep from the initial prompt is greater than the "
                f"context length (n_keep: {n}>= n_ctx: {most}). Try to load the model with a "
                "larger context length, or provide a shorter input.")
    if out:
        return (f"This model's maximum context length is {most} tokens. However, you "
                f"requested {n + out} tokens ({n} in the messages, {out} in the "
                "completion). Please reduce the length of the messages or completion.")
    return (f"This model's maximum context length is {most} tokens. However, your messages "
            f"resulted in {n} tokens. Please reduce the length of the messages.")


def stream_error_event(err: CorralError, family: Family) -> bytes:
    """The last event of a stream that fails after its status line was sent."""
    if family == "anthropic":
        return b"event: error\ndata: " + json.dumps(anthropic_body(err)).encode() + b"\n\n"
    if family == "responses":
        body = {"type": "error", "code": err.code, "message": message(err, "openai"),
                "param": None}
        return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"
    return b"data: " + json.dumps(openai_body(err)).encode() + b"\n\n"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


Source = Literal["corral", "upstream"]


# Addresses in Corral's messages about its upstreams: socket tuples, URLs, IPv4 and
# bracketed IPv6 with or without a port, and host:port. A cluster front's nodes and
# a remote's address are the operator's business, not the caller's (issue 25).
_ADDRESS = re.compile(
    r"\('[^']*', \d+(?:, \d+, \d+)?\)"  # a socket address as Python prints it
    r"|\b[a-z][a-z0-9+.-]*://[^\s;,()'\"]+"
    r"|\[[0-9a-f:.]+\](?::\d+)?"
    r"|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"
    r"|\b[a-z0-9][a-z0-9.-]*:\d{2,5}\b",
    re.IGNORECASE,
)


def public_message(err: CorralError) -> str:
    """``err``'s message as a caller sees it: a failure of an upstream names no
    address (the server log has the whole message)."""
    if isinstance(err, UpstreamFailed | RemotesDown):
        return _ADDRESS.sub("<upstream>", err.message)
    return err.message


def openai_body(err: CorralError, wording: Dialect = "openai",
                src: Source = "corral") -> dict[str, object]:
    return {
        "error": {
            "message": message(err, wording),
            "type": err.type,
            "code": err.code,
            "param": "messages" if isinstance(err, ContextTooLong) else None,
            "src": src,
        }
    }


# The code of an error the model server produced and Corral only carried
# (proxy.dialects.translate.upstream_error).
UPSTREAM_CODE = "upstream_error"


def render(err: CorralError, dialect: Dialect, port: Dialect | None = None) -> web.Response:
    """``err`` in ``dialect``'s envelope; an upstream's own error says so in ``src``
    and carries no ``X-Corral-Error``. ``port``: the dialect of the port the call came
    in on, when the route's family sets the envelope (LM Studio's /v1 answers in
    OpenAI's, with LM Studio's words)."""
    src: Source = "upstream" if err.code == UPSTREAM_CODE else "corral"
    headers = {"X-Corral-Error": err.code} if src == "corral" else {}
    if isinstance(err, Overloaded | RateLimited):
        headers["Retry-After"] = str(max(1, round(err.retry_after)))
    status = err.status
    if dialect == "ollama":
        body: dict[str, object] = {"error": message(err, "ollama")}
    elif dialect == "anthropic":
        body = anthropic_body(err)
        status = anthropic_status(err)
    else:
        body = openai_body(err, "lmstudio" if "lmstudio" in (dialect, port) else "openai", src)
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers=headers,
    )

_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def caught(request: web.Request, e: Exception, dialect: Dialect) -> web.StreamResponse:
    """The answer to ``e``, raised by a handler (call it in the ``except`` block: it
    logs a bug's traceback). An HTTPException it does not render is raised again."""
    if isinstance(e, CorralError):
        if e.status >= 500:
            log.warning("%s %s: %s", request.method, request.path, e.message.splitlines()[0])
        return render(e, request.get(ROUTE_DIALECT, dialect), dialect)
    if isinstance(e, web.HTTPException):
        if e.status < 400 or dialect == "ollama":
            raise e
        # aiohttp's own 404/405 arrive as text; an OpenAI client expects JSON.
        err = CorralError(e.reason if e.status != 404 else f"no route for {request.path}")
        err.status = e.status
        err.code = _HTTP_CODES.get(e.status, "invalid_request")
        err.type = "invalid_request_error"
        return render(err, request.get(ROUTE_DIALECT, dialect))
    # A bug, not bad input: the traceback stays in the log, the caller gets the
    # request id to quote.
    info = reqlog.current()
    rid = info.id if info is not None else "-"
    log.exception("%s %s: unexpected error", request.method, request.path)
    return render(CorralError(f"internal error (request id {rid})"),
                  request.get(ROUTE_DIALECT, dialect))
