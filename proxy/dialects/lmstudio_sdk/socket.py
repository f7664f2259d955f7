"""One SDK websocket: authentication, then dispatch of RPCs and channels.

Calls and channels run concurrently, each in its own task held in the
connection's maps (call ids and channel ids are separate namespaces, chosen by the
client). Within a channel packets keep their order; a send lock serialises frames.
When the socket closes, every task still running is cancelled and awaited, which
closes its upstream request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSMsgType, web

from proxy.dialects.lmstudio_sdk import codec, llm, models
from proxy.dialects.lmstudio_sdk.channel import Channel, Ctx
from proxy.dialects.lmstudio_sdk.codec import SdkError
from proxy.edge import errors
from proxy.keys import SCHEDULER
from scheduler.errors import CorralError
from scheduler.keys import tenants
from scheduler.keys.tenants import Key, Tenants

log = logging.getLogger(__name__)

Rpc = Callable[[Ctx, Any], Awaitable[Any]]
ChannelHandler = Callable[[Ctx, Channel, Any], Awaitable[None]]

_MODEL_RPCS: dict[str, Rpc] = {
    "listLoaded": models.list_loaded,
    "getModelInfo": models.get_model_info,
    "getLoadConfig": models.get_load_config,
    "unloadModel": models.unload_model,
    "tokenize": llm.tokenize,
    "countTokens": llm.count_tokens,
}
_LOAD_CHANNELS: dict[str, ChannelHandler] = {
    "getOrLoad": models.get_or_load, "loadModel": models.load_model,
}
RPCS: dict[str, dict[str, Rpc]] = {
    "system": {"listDownloadedModels": models.list_downloaded, "version": models.version},
    "llm": {**_MODEL_RPCS, "getBasePredictionConfig": models.get_base_prediction_config,
            "applyPromptTemplate": llm.apply_prompt_template},
    "embedding": {**_MODEL_RPCS, "embedString": llm.embed_string},
}
CHANNELS: dict[str, dict[str, ChannelHandler]] = {
    "llm": {**_LOAD_CHANNELS, "predict": llm.predict, "completeRawText": llm.complete_raw_text},
    "embedding": dict(_LOAD_CHANNELS),
}
# Namespaces the SDKs open that Corral does not serve: every call gets an error.
UNSUPPORTED = ("files", "repository", "diagnostics", "plugins", "runtime")
AUTH_TIMEOUT_S = 10.0


def sdk_token(identifier: str, passkey: str) -> str:
    """LM Studio's API token format for a client identifier and passkey."""
    return f"sk-lm-{identifier}:{passkey}"


def authenticate(packet: object, keys: tuple[str, ...]) -> str | None:
    """None if the auth packet is accepted, else why not."""
    if not isinstance(packet, dict) or packet.get("authVersion") != 1:
        return "expected an auth packet {\"authVersion\": 1, ...}"
    ident, passkey = packet.get("clientIdentifier"), packet.get("clientPasskey")
    if not isinstance(ident, str) or not isinstance(passkey, str):
        return "clientIdentifier and clientPasskey must be strings"
    if not keys:
        return None
    given = sdk_token(ident.removeprefix("guest:"), passkey).encode()
    ok = False
    for key in keys:  # every key, always: timing says nothing about which matched
        ok |= hmac.compare_digest(given, key.encode())
    return None if ok else "Invalid API token: Corral needs an sk-lm-… key from server.api_keys"


def _error(e: BaseException) -> dict[str, Any]:
    if isinstance(e, SdkError):
        return e.serialized()
    if isinstance(e, CorralError):
        # A prompt too long for any context reads as LM Studio words it.
        return codec.error_payload(errors.message(e, "lmstudio"))
    log.exception("LM Studio SDK call failed", exc_info=e)
    return codec.error_payload(f"internal error in Corral: {type(e).__name__}")


class Connection:
    def __init__(self, ws: web.WebSocketResponse, ctx: Ctx) -> None:
        self.ws = ws
        self.ctx = ctx
        self._lock = asyncio.Lock()
        self.calls: dict[int, asyncio.Task[None]] = {}
        self.channels: dict[int, tuple[Channel, asyncio.Task[None]]] = {}

    async def send(self, frame: dict[str, Any]) -> None:
        if self.ws.closed:
            return
        async with self._lock:
            with contextlib.suppress(ConnectionResetError):
                await self.ws.send_str(codec.dumps(frame))

    async def _rpc(self, call: codec.RpcCall, fn: Rpc) -> None:
        try:
            result = await fn(self.ctx, call.parameter)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await self.send(codec.rpc_error(call.call_id, _error(e)))
        else:
            await self.send(codec.rpc_result(call.call_id, result))
        finally:
            self.calls.pop(call.call_id, None)

    async def _channel(self, create: codec.ChannelCreate, chan: Channel,
                       fn: ChannelHandler) -> None:
        try:
            await fn(self.ctx, chan, create.parameter)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await self.send(codec.channel_error(chan.id, _error(e)))
        else:
            await self.send(codec.channel_close(chan.id))
        finally:
            self.channels.pop(chan.id, None)

    def _unknown(self, endpoint: str) -> dict[str, Any]:
        return codec.error_payload(
            f"Endpoint {self.ctx.namespace}.{endpoint} is not implemented by Corral "
            "(see docs/compatibility.md, LM Studio SDKs)")

    async def dispatch(self, frame: codec.Frame) -> None:
        ns = self.ctx.namespace
        if isinstance(frame, codec.RpcCall):
            fn = RPCS.get(ns, {}).get(frame.endpoint)
            if fn is None or frame.call_id in self.calls:
                await self.send(codec.rpc_error(frame.call_id, self._unknown(frame.endpoint)))
                return
            self.calls[frame.call_id] = asyncio.create_task(self._rpc(frame, fn))
        elif isinstance(frame, codec.ChannelCreate):
            handler = CHANNELS.get(ns, {}).get(frame.endpoint)
            if handler is None or frame.channel_id in self.channels:
                await self.send(codec.channel_error(frame.channel_id,
                                                    self._unknown(frame.endpoint)))
                return
            chan = Channel(frame.channel_id, self.send_in(frame.channel_id))
            task = asyncio.create_task(self._channel(frame, chan, handler))
            self.channels[frame.channel_id] = (chan, task)
        elif isinstance(frame, codec.ChannelSend):
            open_ = self.channels.get(frame.channel_id)
            msg = frame.message
            if open_ is not None and isinstance(msg, dict) and msg.get("type") == "cancel":
                open_[0].cancelled.set()
        elif isinstance(frame, codec.Ignored) and frame.kind == "communicationWarning":
            # The JS SDK rejected one of our messages: a schema-drift alarm.
            log.warning("LM Studio SDK client on /%s rejected a message: %s", ns, frame.detail)
        elif isinstance(frame, codec.KeepAlive):
            await self.send(codec.KEEP_ALIVE_ACK)
        elif isinstance(frame, codec.Subscribe):
            await self.send(codec.signal_error(
                frame.subscribe_id, codec.error_payload("signals are not supported by Corral"),
                frame.writable))

    def send_in(self, channel_id: int) -> Callable[[dict[str, Any]], Awaitable[None]]:
        async def send(message: dict[str, Any]) -> None:
            await self.send(codec.channel_send(channel_id, message))
        return send

    async def close(self) -> None:
        tasks = [*self.calls.values(), *(t for _, t in self.channels.values())]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


async def _auth(ws: web.WebSocketResponse, registry: Tenants) -> tuple[bool, Key | None]:
    """Read the auth packet; (accepted, the key it carries when keys are configured).

    The token is looked up like an Authorization header (``[[keys]]`` and
    ``[server] api_keys``), so its scope and limits follow the socket's calls.
    """
    try:
        msg = await ws.receive(timeout=AUTH_TIMEOUT_S)
    except TimeoutError:
        await ws.close()
        return False, None
    if msg.type is not WSMsgType.TEXT:
        await ws.close()
        return False, None
    packet = codec.parse(msg.data)
    problem = authenticate(packet, ())  # its shape; the key is looked up below
    key = None
    if problem is None and registry.enabled:
        assert isinstance(packet, dict)
        token = sdk_token(packet["clientIdentifier"].removeprefix("guest:"),
                          packet["clientPasskey"])
        key = registry.lookup(token.encode())
        if key is None:
            problem = "Invalid API token: Corral needs an sk-lm-… key from its configured keys"
    if problem is not None:
        await ws.send_str(codec.dumps({"success": False, "error": problem}))
        await ws.close()
        return False, None
    await ws.send_str(codec.dumps({"success": True}))
    return True, key


def handler(namespace: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def serve(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=64 << 20)
        if not ws.can_prepare(request).ok:
            raise web.HTTPBadRequest(text="the LM Studio SDK endpoints are websockets")
        await ws.prepare(request)
        ok, key = await _auth(ws, request.app[SCHEDULER].tenants)
        if not ok:
            return ws
        if key is not None:
            # Every call and channel task of this socket starts from here: they
            # inherit the key's scope and limits.
            tenants.CURRENT.set(key)
        conn = Connection(ws, Ctx(request.app, namespace))
        try:
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                try:
                    frame = codec.decode(msg.data)
                except codec.FrameError as e:
                    await conn.send(codec.answer_to_bad_frame(e))
                    continue
                await conn.dispatch(frame)
        finally:
            await conn.close()
        return ws

    return serve


async def greeting(request: web.Request) -> web.Response:
    return web.json_response({"lmstudio": True})


# The SDKs reach these without an Authorization header (their key is in the auth
# packet): proxy/app.py OPEN_ROUTES opens them as websocket upgrades only.
NAMESPACES = ("system", "llm", "embedding", *UNSUPPORTED)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/lmstudio-greeting", greeting)
    for ns in NAMESPACES:
        app.router.add_get(f"/{ns}", handler(ns))
