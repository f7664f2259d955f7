"""Whether a call's prompt fits the context of the instance it was leased.

The scheduler gives every instance a context (scheduler/scheduling/contexts.py); a call
that needs more is served by an instance whose context fits, or refused in its family's
words (proxy/edge/errors.py) when none can have that much. What a call needs is counted
with llama-server's own tokenizer, and only when it could matter:

* A call is sent as it is. llama-server tokenizes it anyway and refuses a prompt longer
  than its slot before any work (``exceed_context_size_error``, with the exact count):
  the call is then leased again needing that many tokens, which the scheduler meets with
  a larger instance, or refuses with ``ContextTooLong``. The client has received
  nothing yet, so it never sees the first try; a prompt that fits costs nothing.
* Where ``max_tokens`` counts too (OpenAI's families refuse prompt + max_tokens over the
  context), llama-server would not refuse, so the prompt is counted first through its
  count endpoint (``/v1/chat/completions/input_tokens``, ``/tokenize`` ...), and only
  when the body's bytes (a bound on its tokens: a token covers at least a byte, and the
  JSON around the text outweighs what a chat template adds) + max_tokens exceed the
  instance's context.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from proxy.edge import jsonc
from scheduler.config.models import AUTO_CTX_FLOOR as FLOOR
from scheduler.config.root import ModelConfig
from scheduler.errors import ContextTooLong, CorralError
from scheduler.scheduling.scheduler import LeaseHints, Scheduler, Upstream

# Where llama-server counts a prompt of each upstream path without running it.
COUNT_PATHS = {
    "/v1/chat/completions": "/v1/chat/completions/input_tokens",
    "/v1/responses": "/v1/responses/input_tokens",
    "/v1/messages": "/v1/messages/count_tokens",
}
# llama-server's error type for a prompt longer than a slot's context.
EXCEEDED = "exceed_context_size_error"


class _Limits(msgspec.Struct):
    """The fields of a body that cap its answer, per family."""

    max_tokens: Any = None
    max_completion_tokens: Any = None
    max_output_tokens: Any = None


_limits = msgspec.json.Decoder(_Limits)


def _output(body: bytes | bytearray | None, payload: Any) -> int:
    if payload is not None:
        fields = payload if isinstance(payload, dict) else {}
        values = [fields.get(k) for k in ("max_completion_tokens", "max_tokens",
                                            "max_output_tokens")]
    else:
        try:
            lim = _limits.decode(body or b"{}")
        except (msgspec.DecodeError, msgspec.ValidationError):
            return 0
        values = [lim.max_completion_tokens, lim.max_tokens, lim.max_output_tokens]
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return 0


@dataclass(frozen=True, slots=True)
class Fit:
    """What a call brings to the context check. ``strict``: prompt + max_tokens over
    the context is refused (the OpenAI families); otherwise the answer just ends at the
    context's end, as Anthropic's current models and Ollama do."""

    path: str  # the upstream path the call goes to
    body: bytes | bytearray | None = None
    payload: Any = None  # a translated body, encoded only when counted
    strict: bool = False
    # Filled once known: the prompt's tokens (counted) and the max_tokens counted with it.
    tokens: int = 0
    output: int = 0

    def raw(self) -> bytes | bytearray:
        return self.body if self.body is not None else jsonc.dumps(self.payload)


class Larger(Exception):
    """The leased instance's context is too small: lease again with ``hints``."""

    def __init__(self, hints: LeaseHints, fit: Fit) -> None:
        super().__init__(f"needs {hints.need_ctx} tokens of context")
        self.hints = hints
        self.fit = fit


def of(path: str, body: bytes | bytearray | None = None, payload: Any = None,
       family: str = "openai") -> Fit | None:
    """The check for a call to ``path``; None for paths that generate nothing."""
    if path not in COUNT_PATHS and path != "/v1/completions":
        return None
    return Fit(path, body, payload, strict=family in ("openai", "responses"))


def quiet(scheduler: Scheduler, model: str, fit: Fit | None) -> bool:
    """Whether a stream that waits for its lease must not send loading feedback: its
    prompt may be longer than the model's default context, and once feedback has sent
    the status line a refusal could only be an event inside a 200 stream, where clients
    miss it (Claude Code compacts on Anthropic's 400, not on an event)."""
    if fit is None:
        return False
    planned = scheduler.contexts(model)
    return len(fit.raw()) > (planned.default if planned is not None else FLOOR)


def explained(err: ContextTooLong, fit: Fit | None) -> ContextTooLong:
    """The scheduler's error (which knows only the need) with the call's own counts."""
    if fit is not None and fit.tokens:
        err.tokens, err.output = fit.tokens, fit.output
    return err


async def check(session: aiohttp.ClientSession, up: Upstream, fit: Fit,
                hints: LeaseHints | None) -> None:
    """Before sending: raises Larger when the call's prompt + max_tokens (strict
    families) does not fit ``up``'s context. Counts only when bytes could not fit."""
    if not fit.strict or not up.ctx:
        return
    raw = fit.raw()
    if b'"max_' not in raw:
        return  # no max_tokens of any kind: nothing to decode (the common call)
    output = _output(fit.body, fit.payload)
    if not output or len(raw) + output <= up.ctx:
        return  # llama-server refuses a prompt that alone does not fit (refused())
    tokens = await _count(session, up, fit.path, raw)
    if tokens is None or tokens + output <= up.ctx:
        return
    fit = dataclasses.replace(fit, tokens=tokens, output=output)
    raise Larger(_needing(hints, tokens + output), fit)


async def refused(resp: aiohttp.ClientResponse, up: Upstream, fit: Fit,
                  hints: LeaseHints | None, model: str) -> None:
    """After a 400: raises Larger (or ContextTooLong where no other instance can be
    had) when llama-server refused the prompt as longer than its context. Otherwise
    returns; the body stays readable (aiohttp keeps it)."""
    try:
        err = jsonc.loads(await resp.read()).get("error")
    except (CorralError, AttributeError, aiohttp.ClientError):
        return
    if not isinstance(err, dict) or err.get("type") != EXCEEDED:
        return
    tokens, n_ctx = err.get("n_prompt_tokens"), err.get("n_ctx")
    if not isinstance(tokens, int) or not isinstance(n_ctx, int):
        return
    output = _output(fit.body, fit.payload) if fit.strict else 0
    fit = dataclasses.replace(fit, tokens=tokens, output=output)
    if not up.ctx:
        # A remote or another runtime: its context is all there is.
        raise ContextTooLong(model, tokens, n_ctx, output)
    # One token to answer with, at least.
    raise Larger(_needing(hints, tokens + max(output, 1)), fit)


def _needing(hints: LeaseHints | None, need: int) -> LeaseHints:
    base = hints or LeaseHints()
    return dataclasses.replace(base, need_ctx=max(need, base.need_ctx))


async def _count(session: aiohttp.ClientSession, up: Upstream, path: str,
                 raw: bytes | bytearray) -> int | None:
    """The prompt's tokens by llama-server's tokenizer; None when it cannot say."""
    count_path = COUNT_PATHS.get(path)
    if count_path is None:  # /v1/completions: the prompt text alone
        try:
            prompt = jsonc.loads(raw).get("prompt")
        except (CorralError, AttributeError):
            return None
        if not isinstance(prompt, str):
            return None
        count_path, raw = "/tokenize", jsonc.dumps({"content": prompt, "add_special": True})
    try:
        async with session.post(up.base_url + count_path, data=raw,
                                headers={"Content-Type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=30)) as resp:
            if resp.status != 200:
                return None
            answer = jsonc.loads(await resp.read())
    except (aiohttp.ClientError, TimeoutError, CorralError):
        return None
    if not isinstance(answer, dict):
        return None
    if "tokens" in answer and isinstance(answer["tokens"], list):
        return len(answer["tokens"])
    n = answer.get("input_tokens")
    return n if isinstance(n, int) else None


def shown(scheduler: Scheduler, cfg: ModelConfig, trained: int | None) -> int:
    """The context per slot a listing shows for a model: its running instances' largest,
    else what a launch would get, else what its config or header says; 0: unknown."""
    running = [i.ctx for i in scheduler.loaded(cfg.name) if i.ctx]
    if running:
        return max(running)
    planned = scheduler.contexts(cfg.name)
    if planned is not None:
        return planned.default
    if cfg.fixed_ctx or not trained:
        return cfg.fixed_ctx or 0
    return trained if cfg.ctx_size == 0 else min(trained, scheduler.config.scheduler.max_ctx)


def most(scheduler: Scheduler, cfg: ModelConfig, trained: int | None) -> int:
    """The most context per slot a call of the model can get (max_context_length)."""
    planned = scheduler.contexts(cfg.name)
    return planned.maximum if planned is not None else shown(scheduler, cfg, trained)
