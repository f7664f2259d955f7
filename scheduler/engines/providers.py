"""Providers: servers that host many models (another Corral, an Ollama, a multi-model
vLLM, a cloud account), declared once with ``[[providers]]``.

Each provider's ``/v1/models`` is read at start (bounded, so a provider that is down
does not hold Corral's start) and every ``refresh`` seconds. Every id it lists (or
those of ``models`` it lists) becomes a model named ``prefix + id`` whose one remote
is the provider, with the id as the model name sent upstream where the names differ.
The models reach the scheduler through ``set_dynamic_models("provider:NAME", ...)``,
so they are listed on every port and routed, balanced and fallen back from as any
remote; models that disappear from a listing drain and go.

A provider is not probed per model: its listing is its health. A listing that fails
keeps the last known list and takes the provider's models out of rotation until the
next attempt (every ``min(refresh, DOWN_RETRY)`` seconds while it is down); their
calls get 503 with a Retry-After in the meantime. A failed call to one model sits
that model out for ``cooldown`` seconds (health "none" in engines/remote.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from pydantic import ValidationError

from scheduler.aio import cancel_and_wait
from scheduler.config.root import ModelConfig
from scheduler.engines.egress import Egress
from scheduler.engines.remote import Remote, build_egress, shown_url
from scheduler.engines.settings import ProviderConfig, RemoteConfig, env_key

log = logging.getLogger(__name__)

# Seconds between listings while a provider is down.
DOWN_RETRY = 10.0
# Seconds the first listing may take at start before Corral goes on without it.
START_WAIT = 5.0
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")


class Dynamic(Protocol):
    """The part of the Scheduler providers use."""

    async def set_dynamic_models(
        self, source: str, models: Iterable[ModelConfig]
    ) -> dict[str, list[str]]: ...

    def remotes(self) -> list[Remote]: ...


def source(provider: ProviderConfig) -> str:
    return f"provider:{provider.name}"


def listed_ids(body: Any) -> list[str]:
    """Model ids from an OpenAI ``/v1/models`` answer (``{"data": [{"id": ...}]}``)."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise ValueError("not an OpenAI model list (no 'data' array)")
    return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


def model_configs(provider: ProviderConfig, ids: Sequence[str]) -> list[ModelConfig]:
    """The models Corral offers for a listing: pure, so refreshes that list the same
    ids give equal configs and restart nothing."""
    wanted = None if provider.models == "*" else set(provider.models)
    out = []
    for upstream_id in ids:
        if wanted is not None and upstream_id not in wanted:
            continue
        name = provider.prefix + upstream_id
        if not _NAME_RE.match(name):
            log.warning("provider %s: model id %r is not a name Corral can offer; skipped",
                        provider.name, upstream_id)
            continue
        remote = RemoteConfig(
            url=provider.url, api_key=provider.api_key, api_key_env=provider.api_key_env,
            headers=provider.headers, model=upstream_id if name != upstream_id else None,
            tls_verify=provider.tls_verify, ca_file=provider.ca_file, timeout=provider.timeout,
            slots=provider.slots, health="none", cooldown=provider.cooldown, api=provider.api,
        )
        out.append(ModelConfig(name=name, remotes=(remote,), remote_slots=provider.slots,
                               origin=source(provider)))
    return out


@dataclass(slots=True)
class _Status:
    ids: tuple[str, ...] = ()
    ok: bool = False
    error: str | None = None
    listed_at: float | None = None


class Providers:
    """Owns one refresh task per provider; start(), update() on reload, close()."""

    def __init__(self, scheduler: Dynamic, session: aiohttp.ClientSession) -> None:
        self._scheduler = scheduler
        self._session = session
        self._configs: dict[str, ProviderConfig] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._status: dict[str, _Status] = {}
        # How listings leave for each provider; built once, off the loop (ca_file).
        self._egress: dict[str, Egress] = {}

    async def start(self, providers: Sequence[ProviderConfig]) -> None:
        await self.update(providers)

    async def update(self, providers: Sequence[ProviderConfig]) -> None:
        """Switch to a new list: changed and new providers are listed now (at most
        START_WAIT seconds), removed ones take their models away."""
        new = {p.name: p for p in providers}
        for name in list(self._configs):
            if new.get(name) != self._configs[name]:
                await self._forget(name, drop_models=name not in new)
        fresh = [p for p in providers if p.name not in self._configs]
        for p in fresh:
            self._configs[p.name] = p
            self._status[p.name] = _Status()
            self._egress[p.name] = await asyncio.to_thread(_listing_egress, p)
        if fresh:
            # Concurrently: three providers that are down cost START_WAIT, not 3×.
            await asyncio.gather(*(self._first(p) for p in fresh))
        for p in fresh:
            self._tasks[p.name] = asyncio.create_task(self._loop(p), name=source(p))

    async def _first(self, p: ProviderConfig) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(START_WAIT):
                await self.refresh(p)

    async def _forget(self, name: str, drop_models: bool) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            await cancel_and_wait(task)
        p = self._configs.pop(name)
        self._status.pop(name, None)
        self._egress.pop(name, None)
        if drop_models:
            await self._scheduler.set_dynamic_models(source(p), ())

    async def close(self) -> None:
        for name in list(self._tasks):
            task = self._tasks.pop(name)
            await cancel_and_wait(task)

    async def _loop(self, p: ProviderConfig) -> None:
        while True:
            ok = self._status[p.name].ok
            await asyncio.sleep(p.refresh if ok else min(p.refresh, DOWN_RETRY))
            await self.refresh(p)

    async def refresh(self, p: ProviderConfig) -> bool:
        """List the provider's models once and apply the result; False if it failed."""
        status = self._status.setdefault(p.name, _Status())
        try:
            ids = await self._list(p)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            reason = _reason(e)
            if status.ok or status.error is None:
                log.warning("provider %s unreachable (%s); keeping its last list of %d "
                            "model(s)", p.name, reason, len(status.ids))
            status.ok, status.error = False, reason
            self._hold(p, reason)
            return False
        try:
            configs = model_configs(p, ids)
        except ValidationError as e:  # api_key_env unset since the config was loaded
            reason = _messages(e)
            log.warning("provider %s: %s; keeping its last list", p.name, reason)
            status.ok, status.error = False, reason
            return False
        unchanged = status.ok and tuple(ids) == status.ids
        if not unchanged:
            log.info("provider %s lists %d model(s)", p.name, len(ids))
        status.ids, status.ok, status.error = tuple(ids), True, None
        status.listed_at = time.time()
        if not unchanged:
            # The same listing again changes nothing: spare the config-change path.
            try:
                await self._scheduler.set_dynamic_models(source(p), configs)
            except ValidationError as e:  # a name clash the config could not foresee
                log.warning("provider %s: %s", p.name, _messages(e))
        names = {mc.name for mc in configs}
        for r in self._scheduler.remotes():
            if r.model in names:
                r.recover()
        return True

    def _hold(self, p: ProviderConfig, reason: str) -> None:
        names = {p.prefix + i for i in self._status[p.name].ids}
        for r in self._scheduler.remotes():
            if r.model in names and r.config.url == p.url:
                r.mark_failed(f"provider {p.name} unreachable: {reason}",
                              for_seconds=min(p.refresh, DOWN_RETRY))

    async def _list(self, p: ProviderConfig) -> list[str]:
        out = self._egress.get(p.name)
        if out is None:
            out = await asyncio.to_thread(_listing_egress, p)
        url = p.url + out.path("/v1/models")
        timeout = aiohttp.ClientTimeout(total=p.timeout or 10.0)
        async with self._session.get(url, headers=out.headers, ssl=out.ssl,
                                     timeout=timeout) as resp:
            if resp.status != 200:
                raise ValueError(f"/v1/models answered {resp.status}")
            return listed_ids(await resp.json(content_type=None))

    def status(self) -> list[dict[str, object]]:
        """For /admin: no key, no headers."""
        return [
            {
                "name": name,
                "url": shown_url(p.url),
                "prefix": p.prefix,
                "ok": self._status[name].ok,
                "error": self._status[name].error,
                "models": [p.prefix + i for i in self._status[name].ids],
                "listed_at": self._status[name].listed_at,
            }
            for name, p in self._configs.items()
        ]


def _listing_egress(p: ProviderConfig) -> Egress:
    """Blocking when ``ca_file`` is set (it reads the file)."""
    rc = RemoteConfig(url=p.url, api_key=p.api_key, api_key_env=p.api_key_env,
                      headers=p.headers, tls_verify=p.tls_verify, ca_file=p.ca_file)
    return build_egress(rc, env_key(p), None)


def _messages(e: ValidationError) -> str:
    # Messages only: pydantic's str() quotes the input, headers included.
    return "; ".join(err["msg"] for err in e.errors())


def _reason(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    return str(e) or type(e).__name__
