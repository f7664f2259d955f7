"""The error tree. The scheduler raises these; the proxy renders them per dialect.

::

    CorralError                    every error Corral itself produces (src="corral")
    ├── BadRequest                 the caller's request is malformed         400
    │   ├── CannotServe            the model lacks what the endpoint needs   400
    │   └── ContextTooLong         the prompt (+ max_tokens) fits no context 400
    │                              the model can have; rendered in each family's words
    ├── TooLarge                   a body over its route's limit             413
    ├── Unauthorized               missing or wrong API key                  401
    ├── NotSupported               an endpoint or option Corral does not do  501
    ├── ConfigError                a config file or key is invalid          (startup/check)
    ├── BinaryNotFound             no llama-server binary can be found       500
    ├── UnknownModel               no model or alias by that name            404
    ├── Overloaded                 queue full or wait too long; retry_after  503 + Retry-After
    │   └── RemotesDown            every remote of a model is out of rotation 503 + Retry-After
    ├── RateLimited                an API key over one of its limits         429 + Retry-After
    ├── LoadFailed                 the instance did not become ready         503
    │   │                          (early exit, deadline, bad model file); carries log tail
    │   └── LoadCancelled          an operator cancelled the launch a call waited for
    ├── UpstreamFailed             the instance failed while serving a call  502
    │   │                          (connection refused, died mid-stream)
    │   └── UpstreamStalled        ... by going silent past a time limit
    └── ShuttingDown               Corral is draining; no new calls          503

The scheduler never raises HTTP exceptions: ``status`` is advice for the proxy, which
owns every wire format. ``code`` is a stable machine-readable string.
"""

from __future__ import annotations

from collections.abc import Sequence


class CorralError(Exception):
    status: int = 500
    code: str = "internal_error"
    type: str = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(CorralError):
    status = 400
    code = "invalid_request"
    type = "invalid_request_error"


class CannotServe(BadRequest):
    code = "model_cannot_serve"

    def __init__(self, model: str, capability: str, able: Sequence[str]) -> None:
        names = ", ".join(sorted(able)) or "none is configured"
        super().__init__(
            f"model '{model}' cannot serve {capability} calls; models that can: {names}"
        )


class ContextTooLong(BadRequest):
    """A call needs more context than any instance of its model can have.

    ``tokens`` is the prompt's length (or, where the scheduler found it, the context
    asked for), ``output`` the max_tokens counted with it (0: not counted), ``maximum``
    the most context per slot the model can get. proxy/edge/errors.py words it as each
    API family does."""

    code = "context_length_exceeded"

    def __init__(self, model: str, tokens: int, maximum: int, output: int = 0) -> None:
        asked = f"{tokens} + {output}" if output else f"{tokens}"
        super().__init__(f"model '{model}': the call needs {asked} tokens of context, "
                         f"more than the {maximum} it can have")
        self.model = model
        self.tokens = tokens
        self.maximum = maximum
        self.output = output


class TooLarge(CorralError):
    status = 413
    code = "request_too_large"
    type = "invalid_request_error"


class Unauthorized(CorralError):
    status = 401
    code = "invalid_api_key"
    type = "authentication_error"


class NotSupported(CorralError):
    status = 501
    code = "not_supported"
    type = "invalid_request_error"


class ConfigError(CorralError):
    code = "invalid_config"


class NotFound(CorralError):
    """Something a call names (an operation, a captured call, a loaded model) is not
    there; an unknown model is ``UnknownModel``."""

    status = 404
    code = "not_found"
    type = "invalid_request_error"


class BinaryNotFound(CorralError):
    code = "llama_server_not_found"


class UnknownModel(CorralError):
    status = 404
    code = "model_not_found"
    type = "invalid_request_error"

    def __init__(self, model: str, known: Sequence[str]) -> None:
        names = ", ".join(sorted(known)) or "(none configured)"
        super().__init__(f"model '{model}' not found; available models: {names}")
        self.model = model
        self.known = tuple(known)


class Overloaded(CorralError):
    status = 503
    code = "overloaded"
    type = "overloaded_error"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(CorralError):
    """A key over its max_concurrent, requests_per_minute or tokens_per_minute."""

    status = 429
    code = "rate_limit_exceeded"
    type = "rate_limit_error"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RemotesDown(Overloaded):
    """Every remote (or provider) serving a model is out of rotation: down, or
    cooling down after failed calls. Worth retrying, hence Overloaded's header."""

    code = "upstream_unavailable"
    type = "unavailable_error"


class LoadFailed(CorralError):
    status = 503
    code = "model_load_failed"
    type = "unavailable_error"

    def __init__(self, model: str, reason: str, log_tail: Sequence[str] = ()) -> None:
        # API clients get the reason; the child's log (paths, build, hardware) is for
        # the operator: the server log and /admin show ``detail``.
        msg = f"model '{model}' failed to load: {reason}"
        super().__init__(msg + (" (its log is in /admin/models)" if log_tail else ""))
        self.detail = msg + ("\nlast log lines:\n" + "\n".join(log_tail) if log_tail else "")
        self.model = model
        self.reason = reason
        self.log_tail = tuple(log_tail)


class LoadCancelled(LoadFailed):
    """An operator cancelled a launch (or its download) in progress: the calls that
    waited for it end with this instead of waiting out their queue timeout."""

    code = "model_load_cancelled"

    def __init__(self, model: str) -> None:
        super().__init__(model, "the launch was cancelled by an operator")


class UpstreamFailed(CorralError):
    status = 502
    code = "upstream_failed"
    type = "upstream_error"


class UpstreamStalled(UpstreamFailed):
    """The upstream went silent past its first-byte or stall limit: it may be
    wedged, so the scheduler checks it at once."""


class ShuttingDown(CorralError):
    status = 503
    code = "shutting_down"
    type = "unavailable_error"
