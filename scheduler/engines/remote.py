"""A remote OpenAI-compatible upstream: llama-server, vLLM or SGLang elsewhere, an
Ollama, a cloud API (OpenAI, Gemini's OpenAI endpoint, OpenRouter, Groq, Mistral).

It looks like an Instance to the dispatcher (id, state, in_flight, slots, last_used,
try_acquire/release), but Corral does not own its process: it is never launched,
evicted or counted against max_instances or the memory budget.

Health, per the remote's ``health``:

* ``auto``: ``/health``, then ``/v1/models``; the first 200 marks it healthy.
* ``/health`` or ``/v1/models``: that probe only (``/v1/models`` carries the key).
* ``none``: never probed (a cloud API where calls cost money or count against a
  quota). It starts READY; a call that cannot connect, is reset or times out takes
  it out of rotation (FAILED) for ``cooldown`` seconds, then it is tried again.

A probed remote leaves the rotation while its probe fails and comes back at the
first good one. Its key rides in ``egress.headers`` only: ``describe()``, log lines
and failure reasons never include headers, and the URL's user:password part is cut
from what they show.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from scheduler.aio import cancel_and_wait
from scheduler.engines.egress import Egress
from scheduler.engines.settings import RemoteConfig
from scheduler.process.instance import State

log = logging.getLogger(__name__)

_PROBES = {"auto": ("/health", "/v1/models"), "/health": ("/health",),
           "/v1/models": ("/v1/models",), "none": ()}


# Answers that take a never-probed remote out of rotation (as LiteLLM's cooldown):
# a rate limit, or the server failing. The answer itself still reaches the client.
COOLDOWN_STATUSES = frozenset({429, 500, 502, 503, 504})
# The longest Retry-After from upstream that is honoured.
MAX_RETRY_AFTER = 600.0


# What a remote is taken to speak when its table does not say. An OpenAI-style API
# base (a URL with a path: a cloud, a /v1 endpoint) or a remote that is never probed
# (a cloud API): what every OpenAI-compatible service serves; other families are
# translated. A bare host:port that is probed is taken for a llama-server (None:
# everything it speaks).
API_BASE_APIS = frozenset({"chat", "completions", "embeddings"})


def default_apis(url: str, health: str = "auto") -> frozenset[str] | None:
    if health == "none" or urlsplit(url).path not in ("", "/"):
        return API_BASE_APIS
    return None


def shown_url(url: str) -> str:
    """The URL without user:password, for logs, /admin and errors."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def build_egress(rc: RemoteConfig, key: str | None, rename: str | None) -> Egress:
    """Blocking only when ``ca_file`` is set (it reads the file)."""
    headers = dict(rc.headers)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    tls: ssl.SSLContext | bool = True
    if rc.ca_file is not None:
        tls = ssl.create_default_context(cafile=str(rc.ca_file))
    elif not rc.tls_verify:
        tls = False
    path = urlsplit(rc.url).path
    return Egress(headers=headers, rename=rename, api_base=path not in ("", "/"), ssl=tls,
                  first_byte_timeout=rc.timeout)


class Remote:
    def __init__(
        self,
        remote_id: str,
        model: str,
        config: RemoteConfig,
        slots: int,
        on_change: Callable[[Remote], None],
        on_release: Callable[[Remote], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        key: str | None = None,
    ) -> None:
        self.id = remote_id
        self.model = model
        self.config = config
        self.base_url = config.url
        self.slots = slots
        self.weight = config.weight
        self.apis: frozenset[str] | None = (
            frozenset(config.api) if config.api is not None
            else default_apis(config.url, config.health)
        )
        # The key as resolved at load/reload: a changed api_key_env value makes a
        # new Remote (scheduler._sync_remotes compares it).
        self.key = key
        self.in_flight = 0
        self.served = 0
        self.failure: str | None = None
        self._clock = clock
        self.last_used = clock()
        self.ttl_override: float | None = None
        try:
            self.egress = build_egress(config, key, config.model)
        except (OSError, ssl.SSLError) as e:
            # A CA file that cannot be read: the remote stays out of rotation and says why.
            self.egress = Egress()
            self.failure = f"ca_file {config.ca_file}: {e}"
        self._probes = _PROBES[config.health]
        # Unknown until the first check answers; a remote that is never probed is
        # taken on trust until a call fails.
        self._state = (State.FAILED if self.failure
                       else State.READY if not self._probes else State.STARTING)
        self._on_change = on_change
        # A call ending is far more frequent than a state change, and only matters
        # to the scheduler when someone is queued: it may get its own callback.
        self._on_release = on_release or on_change
        self._task: asyncio.Task[None] | None = None
        self._cooldown: asyncio.TimerHandle | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def load(self) -> float:
        return self.in_flight / self.slots

    @property
    def share(self) -> float:
        """Calls served relative to its weight (policy.pick_instance)."""
        return self.served / self.weight

    @property
    def shown_url(self) -> str:
        return shown_url(self.base_url)

    def _set(self, state: State) -> None:
        if state is not self._state:
            self._state = state
            self._on_change(self)

    def try_acquire(self) -> bool:
        if self._state is not State.READY or self.in_flight >= self.slots:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1
        self.served += 1
        self.last_used = self._clock()
        self._on_release(self)

    def mark_failed(self, reason: str, for_seconds: float | None = None) -> None:
        """A call could not reach it: out of rotation until the next good check, or
        (never probed) for ``for_seconds``, by default its ``cooldown``."""
        if self._state is State.STOPPED:
            return
        self.failure = reason
        if not self._probes:
            wait = self.config.cooldown if for_seconds is None else for_seconds
            if self._state is not State.FAILED:
                log.warning("remote %s out of rotation for %g s: %s", self.id, wait, reason)
            if self._cooldown is not None:
                self._cooldown.cancel()
            self._cooldown = asyncio.get_running_loop().call_later(wait, self._cooled)
        self._set(State.FAILED)

    def answered(self, status: int, retry_after: str | None) -> None:
        """A call got ``status`` (one of COOLDOWN_STATUSES) from it."""
        if self._probes or status not in COOLDOWN_STATUSES:
            return  # a probed remote is judged by its probe
        wait: float | None = None
        if retry_after is not None:
            try:
                wait = min(MAX_RETRY_AFTER, max(1.0, float(retry_after)))
            except ValueError:
                wait = None  # an HTTP date: the configured cooldown will do
        self.mark_failed(f"answered {status}", for_seconds=wait)

    def recover(self) -> None:
        """Back in rotation now (its provider answered again)."""
        if self._cooldown is not None:
            self._cooldown.cancel()
            self._cooldown = None
        if self._state is State.FAILED and not self._probes:
            self.failure = None
            self._set(State.READY)

    def _cooled(self) -> None:
        self._cooldown = None
        if self._state is State.FAILED:
            log.info("remote %s back in rotation after its cooldown", self.id)
            self._set(State.READY)

    def retry_after(self) -> float:
        """Seconds until this remote may be tried again (a hint for clients)."""
        if self._cooldown is not None:
            return max(1.0, self._cooldown.when() - asyncio.get_running_loop().time())
        return 5.0

    def start(self, session: aiohttp.ClientSession, interval: float) -> None:
        if self._probes and self.failure is None:
            self._task = asyncio.create_task(self._check_loop(session, interval), name=self.id)

    async def stop(self) -> None:
        if self._cooldown is not None:
            self._cooldown.cancel()
            self._cooldown = None
        if self._task is not None:
            await cancel_and_wait(self._task)
        self._set(State.STOPPED)

    def _probe_url(self, probe: str) -> str:
        if probe == "/health" and self.egress.api_base:
            # vLLM at http://gpu:8000/v1 keeps /health at the root.
            parts = urlsplit(self.base_url)
            return urlunsplit(parts._replace(path="/health"))
        return self.base_url + self.egress.path(probe)

    async def check(self, session: aiohttp.ClientSession) -> bool:
        if not self._probes:
            return self._state is State.READY
        timeout = aiohttp.ClientTimeout(total=3)
        reason = "no answer"
        for probe in self._probes:
            try:
                async with session.get(self._probe_url(probe), timeout=timeout,
                                       headers=self.egress.headers,
                                       ssl=self.egress.ssl) as resp:
                    if resp.status == 200:
                        self.failure = None
                        self._set(State.READY)
                        return True
                    reason = f"{probe} answered {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as e:
                reason = f"{probe}: {e or type(e).__name__}"
        if self._state is not State.FAILED:
            log.warning("remote %s out of rotation: %s", self.id, reason)
        self.mark_failed(reason)
        return False

    async def suspect(self, session: aiohttp.ClientSession, reason: str) -> None:
        """A call to it tripped a time limit: probe it now, or (never probed) sit it
        out for its cooldown."""
        if self._probes:
            await self.check(session)
        else:
            self.mark_failed(reason)

    async def _check_loop(self, session: aiohttp.ClientSession, interval: float) -> None:
        while True:
            await self.check(session)
            await asyncio.sleep(interval)

    def describe(self) -> dict[str, object]:
        return {
            "id": self.id,
            "model": self.model,
            "state": str(self._state),
            "remote": True,
            "base_url": self.shown_url,
            "upstream_model": self.config.model,
            "health": self.config.health,
            "weight": self.weight,
            "slots": self.slots,
            "in_flight": self.in_flight,
            "load": self.load,
            "served": self.served,
            "idle_seconds": round(self._clock() - self.last_used, 3),
            "failure": self.failure,
        }
