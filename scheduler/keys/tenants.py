"""API keys as tenants: lookup, model scopes, sliding-window limits, usage.

A ``[[keys]]`` entry (and every ``[server] api_keys`` string, as a key with every
scope) becomes a ``Key``. The edge (``proxy.edge.guard``, and the LM Studio SDK socket's
auth packet) looks the presented key up and sets ``CURRENT`` for the rest of the
request. The scheduler reads it where names are resolved (scopes) and where a
waiter joins a queue (fair shares); the one upstream call path (``proxy.calls.upstream``)
admits each call against the limits once and charges its tokens after. So every
port and dialect gets the same scope and limits without passing the key through
each handler.

The policy parts are pure functions over plain values (``may_use``, ``retry_after``)
and are table- and property-tested; ``Tenants`` holds the mutable usage and is only
touched on the event loop.

Secrets: keys are kept as SHA-256 digests only, compared in constant time against
every configured digest; nothing here ever returns or logs a key.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import time
from collections import deque
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field

from scheduler.config.root import CorralConfig, KeyConfig
from scheduler.errors import RateLimited

WINDOW = 60.0  # seconds: requests_per_minute and tokens_per_minute are sliding minutes


@dataclass(frozen=True, slots=True)
class Key:
    name: str
    models: tuple[str, ...] = ("*",)
    admin: bool = False
    priority: int = 0
    max_concurrent: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    # The [[mcp_servers]] a call with this key may name (docs/tools.md).
    mcp_servers: tuple[str, ...] = ("*",)

    @property
    def unscoped(self) -> bool:
        return "*" in self.models

    def may_use(self, names: Iterable[str]) -> bool:
        """Whether any of a model's names (its name and aliases) is in scope."""
        return self.unscoped or may_use(self.models, names)


# The key of the request being served; None: no keys configured (or an internal call).
CURRENT: ContextVar[Key | None] = ContextVar("corral_key", default=None)


def current() -> Key | None:
    return CURRENT.get()


def may_use(patterns: Iterable[str], names: Iterable[str]) -> bool:
    """Pure: a name matches a pattern exactly or as a glob (``*``, ``?``, ``[..]``)."""
    pats = tuple(patterns)
    return any(n == p or fnmatch.fnmatchcase(n, p) for n in names for p in pats)


@dataclass(slots=True)
class Usage:
    in_flight: int = 0
    requests_total: int = 0
    tokens_total: int = 0
    rejected_total: int = 0
    # Times of the calls admitted in the last WINDOW, and (time, tokens) charged.
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    tokens_in_window: int = 0

    def prune(self, now: float) -> None:
        edge = now - WINDOW
        while self.requests and self.requests[0] <= edge:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= edge:
            self.tokens_in_window -= self.tokens.popleft()[1]


def retry_after(key: Key, usage: Usage, now: float) -> tuple[str, float] | None:
    """Pure (after ``usage.prune(now)``): which limit a new call would break, and the
    seconds until it would not; None when the call may go.

    Tokens are counted after a call ends, so ``tokens_per_minute`` refuses while the
    last minute's total is at or over the limit: one call may overshoot it, the next
    waits until enough of the window has slid past.
    """
    if key.max_concurrent is not None and usage.in_flight >= key.max_concurrent:
        return "max_concurrent", 1.0
    if key.requests_per_minute is not None and len(usage.requests) >= key.requests_per_minute:
        # The oldest calls must leave the window until one more fits.
        oldest = usage.requests[len(usage.requests) - key.requests_per_minute]
        return "requests_per_minute", max(0.0, oldest + WINDOW - now)
    if key.tokens_per_minute is not None and usage.tokens_in_window >= key.tokens_per_minute:
        left = usage.tokens_in_window
        for t, n in usage.tokens:
            left -= n
            if left < key.tokens_per_minute:
                return "tokens_per_minute", max(0.0, t + WINDOW - now)
    return None


def digest(secret: str | bytes) -> bytes:
    return hashlib.sha256(secret.encode() if isinstance(secret, str) else secret).digest()


def keys_of(cfg: CorralConfig, api_keys: tuple[str, ...] | None = None) -> list[tuple[Key, bytes]]:
    """Every key a config defines, with its digest: ``[[keys]]`` first, then each
    ``[server] api_keys`` entry (``api_keys``: those to use instead of the config's)
    as ``api_keys.N`` with every scope, as before keys had scopes."""
    out = [(_key(k), bytes.fromhex(k.key_sha256) if k.key_sha256 else digest(k.key or ""))
           for k in cfg.keys]
    names = {k.name for k in cfg.keys}
    for i, secret in enumerate(cfg.server.api_keys if api_keys is None else api_keys):
        name = f"api_keys.{i}"
        if name not in names:
            out.append((Key(name, admin=True), digest(secret)))
    # A cluster node that requires keys takes the cluster token too, so that fronts
    # reach it without holding the clients' keys (docs/cluster.md); the front applied
    # the client's own scope and limits already.
    if out and cfg.cluster.role == "node" and cfg.cluster.token:
        out.append((Key("cluster.token", admin=True), digest(cfg.cluster.token)))
    return out


def _key(k: KeyConfig) -> Key:
    return Key(k.name, k.models, k.admin, k.priority, k.max_concurrent,
               k.requests_per_minute, k.tokens_per_minute, k.mcp_servers)


class Tenants:
    """The configured keys and what each has used. Event-loop only."""

    def __init__(self, cfg: CorralConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._keys: list[tuple[Key, bytes]] = []
        self.usage: dict[str, Usage] = {}
        # [server] changes take a restart (proxy/ops/reload.py): its api_keys stay those
        # Corral started with; [[keys]] follow every reload.
        self._api_keys = cfg.server.api_keys
        self.configure(cfg)

    def configure(self, cfg: CorralConfig) -> None:
        """Switch to a config's keys; usage of names that remain is kept."""
        self._keys = keys_of(cfg, self._api_keys)
        self.usage = {k.name: self.usage.get(k.name) or Usage() for k, _ in self._keys}

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def keys(self) -> list[Key]:
        return [k for k, _ in self._keys]

    def named(self, name: str) -> Key | None:
        """The configured key called ``name`` (a worker names the key it admits)."""
        return next((k for k, _ in self._keys if k.name == name), None)

    def lookup(self, given: bytes) -> Key | None:
        """The key whose secret is ``given``. Compares against every digest, always,
        so the time taken says nothing about which key (or how much of one) matched."""
        mine = digest(given)
        found: Key | None = None
        for key, d in self._keys:
            if hmac.compare_digest(mine, d) and found is None:
                found = key
        return found

    # -- limits ------------------------------------------------------------------------

    def admit(self, key: Key) -> None:
        """Count a call in, or raise RateLimited (429 + Retry-After)."""
        usage = self.usage.get(key.name)
        if usage is None:  # a key removed by a reload while its caller was in flight
            usage = self.usage[key.name] = Usage()
        now = self._clock()
        usage.prune(now)
        over = retry_after(key, usage, now)
        if over is not None:
            usage.rejected_total += 1
            limit, wait = over
            raise RateLimited(
                f"key '{key.name}' is over its {limit} limit "
                f"({getattr(key, limit)}); retry in {max(1, round(wait))} s",
                retry_after=wait,
            )
        usage.in_flight += 1
        usage.requests_total += 1
        usage.requests.append(now)

    def release(self, key: Key) -> None:
        usage = self.usage.get(key.name)
        if usage is not None and usage.in_flight > 0:
            usage.in_flight -= 1

    def charge(self, key: Key, tokens: int) -> None:
        """Tokens a finished call used (prompt + completion, from its answer)."""
        usage = self.usage.get(key.name)
        if usage is None or tokens <= 0:
            return
        usage.tokens_total += tokens
        usage.tokens.append((self._clock(), tokens))
        usage.tokens_in_window += tokens

    # -- views -------------------------------------------------------------------------

    def view(self) -> list[dict[str, object]]:
        """``GET /admin/keys``: configuration (never the secret) and usage."""
        now = self._clock()
        out: list[dict[str, object]] = []
        for key, _ in self._keys:
            u = self.usage[key.name]
            u.prune(now)
            out.append({
                "name": key.name,
                "models": list(key.models),
                "admin": key.admin,
                "priority": key.priority,
                "limits": {"max_concurrent": key.max_concurrent,
                           "requests_per_minute": key.requests_per_minute,
                           "tokens_per_minute": key.tokens_per_minute},
                "usage": {"in_flight": u.in_flight, "requests_total": u.requests_total,
                          "tokens_total": u.tokens_total,
                          "requests_last_minute": len(u.requests),
                          "tokens_last_minute": u.tokens_in_window,
                          "rejected_total": u.rejected_total},
            })
        return out


class Admitted:
    """A call of a key counted in while it runs (``async with``): ``Tenants.admit`` on
    the way in (RateLimited over a limit), ``release`` on every way out. A class, as it
    runs on every call with a key."""

    __slots__ = ("_key", "_tenants")

    def __init__(self, tenants: Tenants, key: Key) -> None:
        self._tenants = tenants
        self._key = key

    async def __aenter__(self) -> None:
        self._tenants.admit(self._key)

    async def __aexit__(self, *exc: object) -> None:
        self._tenants.release(self._key)
