"""Where a route's family meets an upstream that may not speak it.

A model-routed call of the Anthropic Messages or Responses family is decided per
leased upstream (a fallback or a remote may differ from the first choice): when the
upstream speaks the family (``Upstream.apis`` names it, or is None and the upstream
has not been learned to lack it), the call is the pass-through, byte for byte.
Otherwise its body is translated to chat completions, sent to ``/v1/chat/completions``
through the same call path (lease, time limits, resends, loading feedback), and the
answer translated back, streamed as it comes. An undeclared upstream that answers the
family's route with "no such route" is learned to lack it, and the call is sent again
(``upstream.SendAgain``). Translated Responses are kept for ``previous_response_id``.
A call of a family that is never translated is refused when the model's ``api``
lacks it (``of``).

Token counting has no chat equivalent every server has, so ``count_tokens`` and
``input_tokens`` become a chat call with ``max_tokens: 1`` whose usage gives the prompt
tokens: the chat template and the tools are counted as the model sees them, on any
chat upstream, for the price of one generated token.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Collection
from types import ModuleType
from typing import Any

import aiohttp
from aiohttp import web

from proxy.calls import upstream
from proxy.calls.call import Call, Client
from proxy.calls.streaming import (
    error_answer,
    is_event_stream,
    relay,
    sse_json,
    stream_response,
    upstream_data_batches,
)
from proxy.dialects.families import Event, anthropic_chat, responses_chat
from proxy.dialects.families.chat import choice
from proxy.dialects.families.chunks import plain_text
from proxy.dialects.families.learned import MISSING_ROUTE, FamilyState, route_missing
from proxy.dialects.translate import upstream_error_body
from proxy.edge import jsonc, reqlog
from proxy.edge.errors import Family, render, stream_error_event
from proxy.keys import SCHEDULER
from proxy.metrics.registry import MODEL_HEADER, TRANSLATED_HEADER
from scheduler.config.root import ModelConfig
from scheduler.errors import BadRequest, CorralError, UpstreamFailed, UpstreamStalled
from scheduler.scheduling.scheduler import Upstream

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
# Tells a client (and a test) that its answer was translated from chat completions.

# The upstream API (scheduler.config.root.UpstreamApi) a family needs, and its translator.
_FAMILIES: dict[str, tuple[str, ModuleType, str]] = {
    "anthropic": ("messages", anthropic_chat, "Anthropic Messages"),
    "responses": ("responses", responses_chat, "OpenAI Responses"),
}


def _key(up: Upstream) -> str:
    # Instance ids are unique per launch; a port may be reused by another model.
    return f"{up.instance_id} {up.base_url}"


class Bridge:
    """One call of a translatable family: the body to send to each upstream, and the
    consumer that answers the client."""

    def __init__(self, family: Family, path: str, body: bytes | bytearray,
                 state: FamilyState, store: object = None) -> None:
        self.family = family
        self._state = state
        self._learned = state.learned
        self._parsed: dict[str, Any] = {}
        self.api, self._pair, self._name = _FAMILIES[family]
        self.count = path.endswith(("/count_tokens", "/input_tokens"))
        self._body = body
        self._chat: dict[str, Any] | None = None
        self._ask: Any = None
        # Translated before any lease: the model's api lacks the family.
        self.translated_now = False
        # A Responses call the server is to keep, for a later previous_response_id
        # (``store`` as the body's head has it: absent means keep).
        self.kept = family == "responses" and not self.count and store is not False

    def _translating(self, up: Upstream) -> bool:
        if up.apis is None:
            # llama-server keeps no Responses: a call that is to be kept (store is not
            # false) goes through Corral's store, which translates to chat.
            return self.kept or self._learned.lacks(_key(up), self.api)
        return self.api not in up.apis

    def via(self, up: Upstream) -> Call | None:
        """The call to send to ``up``: None for the pass-through."""
        if not self._translating(up):
            return None
        self._need_chat(up.model, up.apis)
        return Call(model=up.model, path=CHAT_PATH, payload=self.translated())

    def _need_chat(self, model: str, apis: Collection[str] | None) -> None:
        if apis is not None and "chat" not in apis:
            raise BadRequest(
                f"model '{model}' speaks neither {self._name} nor chat completions "
                f"(api = {sorted(apis)}), so a {self._name} call cannot be translated")

    def translated(self) -> dict[str, Any]:
        """The chat body, translated once: a resend to another upstream reuses it."""
        if self._chat is None:
            parsed = self._parsed = jsonc.loads_object(self._body)
            self._ask = self._pair.asked(parsed)
            args: tuple[Any, ...] = (parsed,)
            if self.family == "responses":
                previous = parsed.get("previous_response_id")
                args += (self._state.responses.get(str(previous)) if previous else None,)
            self._chat = (self._pair.count_request(*args) if self.count
                          else self._pair.request(*args))
        return self._chat

    def _keep(self, response_id: str, reply: dict[str, Any]) -> None:
        """A translated Responses conversation, for a later ``previous_response_id``."""
        if self.family != "responses" or self.count or self._chat is None:
            return
        conversation = responses_chat.history(self._parsed, self._chat, reply)
        if conversation is not None:
            self._state.responses.put(conversation, response_id)

    async def consume(self, up: Upstream, resp: aiohttp.ClientResponse,
                      client: Client) -> web.StreamResponse:
        if not self._translating(up):
            if up.apis is None and resp.status in MISSING_ROUTE and not client.answered:
                return await self._probed(up, resp, client)
            return await relay(up, resp, client)
        if resp.status >= 400:
            return await self._error(up, upstream_error_body(resp.status, await resp.read()),
                                     client)
        if self._ask.stream and not self.count:
            return await self._stream(up, resp, client)
        answer = jsonc.loads(await resp.read())
        if not isinstance(answer, dict):
            raise UpstreamFailed(f"model '{up.model}': the chat answer is not a JSON object")
        out = (self._pair.count_response(answer) if self.count
               else self._pair.response(answer, self._ask))
        if self.family == "responses":
            self._keep(str(out.get("id")), responses_chat.assistant(answer))
        client.answered = True
        return web.Response(body=jsonc.dumps(out), content_type="application/json",
                            headers={MODEL_HEADER: up.model, TRANSLATED_HEADER: "chat"})

    async def _probed(self, up: Upstream, resp: aiohttp.ClientResponse,
                      client: Client) -> web.StreamResponse:
        """An undeclared upstream refused the family's call: a missing route is learned
        and the call sent again, translated; any other error is the answer."""
        raw = await resp.read()
        if route_missing(resp.status, raw):
            self._learned.learn(_key(up), self.api)
            raise upstream.SendAgain(f"upstream {up.instance_id} has no {self._name} route "
                                     f"({resp.status}); translating to chat completions")
        client.answered = True
        return error_answer(up, resp, raw, self.family)

    async def _error(self, up: Upstream, err: CorralError,
                     client: Client) -> web.StreamResponse:
        client.answered = True
        if client.response is not None:
            # Loading feedback has sent the status line: the error is the last event.
            await client.response.write_eof(stream_error_event(err, self.family))
            return client.response
        headers = {MODEL_HEADER: up.model, TRANSLATED_HEADER: "chat"}
        if self.family == "anthropic":
            answer = render(err, "anthropic")  # the upstream's: no X-Corral-Error
            answer.headers.update(headers)
            return answer
        # OpenAI's envelope, without Corral's "src": the upstream said it.
        body = {"error": {"message": err.message, "type": err.type, "code": err.code,
                          "param": None}}
        return web.Response(status=err.status, body=jsonc.dumps(body),
                            content_type="application/json", headers=headers)

    async def _stream(self, up: Upstream, resp: aiohttp.ClientResponse,
                      client: Client) -> web.StreamResponse:
        machine = self._pair.Stream(self._ask)
        out = client.response
        started = False
        if not is_event_stream(resp):
            # A server that answered whole although asked to stream.
            batches: Any = _once([jsonc.dumps(_as_chunk(jsonc.loads(await resp.read())))])
        else:
            batches = upstream_data_batches(resp, up.instance_id)
        text_frame = machine.text_frame
        async with contextlib.aclosing(batches):
            try:
                async for batch in batches:
                    # Frames in order: bytes of the plain text deltas, events of the rest.
                    frames: list[bytes] = []
                    failed: CorralError | None = None
                    for data in batch:
                        if started:
                            text = plain_text(data)
                            if text is not None:
                                frame = text_frame(text)
                                if frame is not None:
                                    frames.append(frame)
                                    continue
                        chunk = sse_json(data)
                        if chunk is None:
                            continue
                        if "error" in chunk:
                            failed = upstream_error_body(502, jsonc.dumps(chunk))
                            break
                        if not started:
                            events = machine.start(chunk) + machine.feed(chunk)
                            started = True
                        else:
                            events = machine.feed(chunk)
                        if events:
                            frames.append(encode(events))
                    if out is None:
                        if failed is not None:
                            # Nothing sent yet: an ordinary error answer.
                            return await self._error(up, failed, client)
                        out = await self._prepare(up, client)
                    if not client.answered:
                        _first_byte()
                    client.answered = True
                    data = b"".join(frames)
                    if failed is not None:
                        await out.write_eof(data + stream_error_event(failed, self.family))
                        return out
                    if data:
                        await out.write(data)
            except CorralError as e:
                if not client.answered or out is None:
                    raise  # nothing sent: the call may be resent
                log.warning("instance %s broke mid-stream: %s", up.instance_id, e.message)
                if isinstance(e, UpstreamStalled) and client.request is not None:
                    # As the relay does: a stalled upstream gets its health checked now.
                    await client.request.app[SCHEDULER].suspect(up.instance_id,
                                                                "stalled mid-stream")
                await out.write_eof(stream_error_event(e, self.family))
                return out
        if out is None:
            out = await self._prepare(up, client)
        client.answered = True
        events = [] if started else machine.start({})
        events += machine.finish()
        if self.family == "responses":
            self._keep(machine.id, machine.assistant())
        reqlog.mark_ended()
        await out.write_eof(encode(events))
        return out

    async def _prepare(self, up: Upstream, client: Client) -> web.StreamResponse:
        out = stream_response(headers={
            "Cache-Control": "no-cache", "X-Accel-Buffering": "no", MODEL_HEADER: up.model,
            TRANSLATED_HEADER: "chat"})
        out.content_type = "text/event-stream"
        assert client.request is not None, "a translated stream answers an HTTP request"
        client.answered = True
        await out.prepare(client.request)
        return out


# The upstream API (scheduler.config.root.UpstreamApi) of each pass-through path.
_PATH_API = {
    "/v1/chat/completions": "chat", "/v1/completions": "completions",
    "/v1/embeddings": "embeddings", "/v1/rerank": "rerank", "/v1/reranking": "rerank",
    # llama-server's own, whatever its prefix.
    "/v1/chat/completions/input_tokens": "native",
    "/v1/audio/transcriptions": "transcriptions",
    "/v1/audio/translations": "translations",
    "/v1/audio/speech": "speech", "/v1/audio/voices": "speech",
    "/v1/images/generations": "images", "/v1/images/edits": "images",
    "/v1/images/variations": "images",
    "/sdapi/v1/txt2img": "sdapi", "/sdapi/v1/img2img": "sdapi",
}


def route_api(family: Family, path: str) -> str | None:
    """The upstream API a route's call needs (None: not one a config can name)."""
    if family == "native":
        return "native"
    if family in _FAMILIES:
        return _FAMILIES[family][0]
    return _PATH_API.get(path)


def refuse_undeclared(family: Family, upstream_path: str, cfg: ModelConfig) -> None:
    """A 400 for a call of an API the model's ``api`` lacks (and not translated)."""
    api = route_api(family, upstream_path)
    if cfg.api is not None and api is not None and api not in cfg.api:
        raise BadRequest(f"model '{cfg.name}' is served by an upstream that does not "
                         f"speak {api} (its api = {list(cfg.api)})")


def of(family: Family, path: str, upstream_path: str, body: bytes | bytearray | None,
       state: FamilyState, cfg: ModelConfig, store: object = None) -> Bridge | None:
    """The bridge of a route's call; None for a family that is never translated.
    ``store`` is the body's own (read with its head), None when absent.

    When the model's ``api`` lacks the family, the body is translated now, so a call
    that cannot be is refused before a lease launches anything; a call of another
    family the model's ``api`` lacks is refused with a 400 that says so."""
    declared = cfg.api
    if family not in _FAMILIES or body is None:
        refuse_undeclared(family, upstream_path, cfg)
        return None
    bridge = Bridge(family, path, body, state, store)
    if declared is not None and bridge.api not in declared:
        bridge._need_chat(cfg.name, declared)
        bridge.translated()
        bridge.translated_now = True
    elif declared is None and bridge.kept:
        # A Responses call to keep goes through Corral's store on any upstream of an
        # undeclared api (Bridge._translating): translated now, an unknown
        # previous_response_id refused before a lease, and the call's chain of prefixes
        # the chat's, which holds the stored conversation.
        bridge.translated()
        bridge.translated_now = True
    return bridge


def _first_byte() -> None:
    # Loading feedback sent bytes already: time to first token is the answer's.
    info = reqlog.current()
    if info is not None:
        info.first_byte = time.perf_counter()


def encode(events: list[Event]) -> bytes:
    """Translated events as SSE frames, ``event:`` line first where the family names
    its events (both do)."""
    parts: list[bytes] = []
    for name, data in events:
        parts += (_event_head(name), jsonc.dumps(data), b"\n\n")
    return b"".join(parts)


@functools.lru_cache(maxsize=64)  # a family names a few dozen events at most
def _event_head(name: str) -> bytes:
    return (b"event: " + name.encode() + b"\n" if name else b"") + b"data: "


async def _once(batch: list[bytes]) -> Any:
    yield batch




def _as_chunk(answer: Any) -> dict[str, Any]:
    """A whole chat answer as the one chunk of a stream."""
    if not isinstance(answer, dict):
        raise UpstreamFailed("the chat answer is not a JSON object")
    c = choice(answer)
    msg = c.get("message") or {}
    delta = {k: msg[k] for k in ("content", "reasoning_content") if k in msg}
    calls = msg.get("tool_calls")
    if isinstance(calls, list):
        delta["tool_calls"] = [{**tc, "index": i} for i, tc in enumerate(calls)
                               if isinstance(tc, dict)]
    return {"id": answer.get("id"), "model": answer.get("model"), "usage": answer.get("usage"),
            "choices": [{"index": 0, "delta": delta, "finish_reason": c.get("finish_reason")}]}

