"""The frames between the owner and its workers (``scheduler.ipc.owner``,
``scheduler.ipc.worker``), and their encoding.

Frames are single-line JSON objects (msgspec never writes a raw newline)::

    worker -> owner                             owner -> worker
    {"op": "lease", "id", "model",              {"op": "config", "pickle"}   at start and
     "chain", "keep_alive", "key", "avoid",                                  on every change
     "need_ctx", "want_ctx"}
    {"op": "release", "id", "early"?}           {"op": "leased", "id", "up": [base_url,
    {"op": "suspect", "iid", "reason"}            instance_id, model, waited, apis, egress,
                                                  slot, ctx]}
    {"op": "failed", "iid", "reason", "connect"} {"op": "error", "id", "kind", "message",
    {"op": "unload", "id", "model"}                          "attrs"}
    {"op": "ensure", "id", "model"} (auto_pull)
    {"op": "admit", "id", "key"}                {"op": "done", "id", "value"}
    {"op": "unadmit", "id"}
    {"op": "charge", "key", "tokens"}
    {"op": "stats", "data"}  (opaque: metrics)  {"op": "loading", "models"}   on change

``key`` is an API key's configured name (never its secret), or null: ``admit``,
``unadmit`` and ``charge`` are a key's limits counted in the owner for every process.
``early`` names the instance of a call that ended early (``Scheduler.hush``).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import pickle
import ssl
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from scheduler import errors
from scheduler.config.root import CorralConfig
from scheduler.engines.egress import PLAIN, Egress
from scheduler.errors import CorralError
from scheduler.scheduling.prefixes import Chain
from scheduler.scheduling.scheduler import Upstream

# A config with hundreds of models is a few hundred KB; a frame is never larger.
FRAME_LIMIT = 64 << 20
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def config_frame(cfg: CorralConfig) -> dict[str, Any]:
    # Pickled, not dumped as JSON: a JSON dump masks SecretStr keys, and the worker's
    # log scrubber needs the real ones. Both ends are this program, over a socket pair
    # nobody else holds.
    return {"op": "config", "pickle": base64.b64encode(pickle.dumps(cfg)).decode()}


def config_of(frame: dict[str, Any]) -> CorralConfig:
    cfg = pickle.loads(base64.b64decode(frame["pickle"]))
    assert isinstance(cfg, CorralConfig)
    return cfg


def chain_of_frame(links: Any) -> Chain:
    """A lease frame's prefix chain ([[hash, bytes], ...]) as LeaseHints holds it."""
    if not isinstance(links, list):
        return ()
    return tuple((int(h), int(n)) for h, n in links)


def upstream_frame(up: Upstream) -> list[Any]:
    """An Upstream as JSON: with its egress (a remote's key and headers travel over
    the private socket, never to a log) and the CA certificates of its TLS context."""
    e = up.egress
    egress: dict[str, Any] | None = None
    if e is not PLAIN:
        tls: Any = e.ssl
        if isinstance(tls, ssl.SSLContext):
            tls = {"cadata": base64.b64encode(
                b"".join(tls.get_ca_certs(binary_form=True))).decode()}
        egress = {"headers": dict(e.headers), "rename": e.rename, "api_base": e.api_base,
                  "ssl": tls, "first_byte_timeout": e.first_byte_timeout}
    apis = sorted(up.apis) if up.apis is not None else None
    return [up.base_url, up.instance_id, up.model, up.waited, apis, egress, up.slot, up.ctx]


@functools.lru_cache(maxsize=32)
def _tls(cadata: str) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=base64.b64decode(cadata))


def upstream_of(data: list[Any]) -> Upstream:
    base_url, iid, model, waited, apis, egress, slot, ctx = data
    out = PLAIN
    if egress is not None:
        tls = egress["ssl"]
        out = Egress(headers=egress["headers"], rename=egress["rename"],
                     api_base=egress["api_base"],
                     ssl=_tls(tls["cadata"]) if isinstance(tls, dict) else bool(tls),
                     first_byte_timeout=egress["first_byte_timeout"])
    return Upstream(base_url, iid, model, float(waited),
                    frozenset(apis) if apis is not None else None, out, slot, int(ctx))


def error_frame(call_id: int, e: CorralError) -> dict[str, Any]:
    attrs = {k: v for k, v in vars(e).items()
             if k != "message" and isinstance(v, str | int | float | bool | None)}
    # Class-level defaults too: an error class not in scheduler.errors arrives as a
    # CorralError that must still render with the same status and code.
    attrs.update(status=e.status, code=e.code, type=e.type)
    return {"op": "error", "id": call_id, "kind": type(e).__name__, "message": e.message,
            "attrs": attrs}


def error_of(frame: dict[str, Any]) -> CorralError:
    """The CorralError a frame describes, of the same class, with the same fields."""
    cls = getattr(errors, str(frame.get("kind")), None)
    if not (isinstance(cls, type) and issubclass(cls, CorralError)):
        cls = CorralError
    # Subclasses have their own __init__ signatures; the message is already built.
    e = cls.__new__(cls)
    Exception.__init__(e, frame["message"])
    e.message = frame["message"]
    for k, v in (frame.get("attrs") or {}).items():
        setattr(e, k, v)
    return e


class Line:
    """One end of a frame stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._out: list[bytes] = []

    def send(self, frame: dict[str, Any]) -> None:
        # Frames sent in one turn of the event loop go out in one write (one syscall)
        # at its end: under load, many leases and releases share it.
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(_encode(frame) + b"\n")

    def _flush(self) -> None:
        if not self._out:
            return  # flushed early, by close()
        data, self._out = b"".join(self._out), []
        if not self.writer.is_closing():
            # No drain: frames are small and the peer reads continuously; a peer that
            # stops reading is dead and its socket is about to close.
            self.writer.write(data)

    async def next(self) -> dict[str, Any] | None:
        """The next frame; None once the peer has closed its end."""
        while True:
            try:
                line = await self.reader.readline()
            except (ConnectionError, ValueError):  # ValueError: a frame over the limit
                return None
            if not line:
                return None
            frame = _decode(line)
            if isinstance(frame, dict):
                return frame

    async def frames(self) -> AsyncIterator[dict[str, Any]]:
        while (frame := await self.next()) is not None:
            yield frame

    def close(self) -> None:
        self._flush()  # what was sent this turn still goes out
        self.writer.close()
