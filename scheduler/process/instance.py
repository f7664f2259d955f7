"""One child process (llama-server or any runtime's server) and its state machine.

::

    (new) ──start()──► STARTING ──/health 200──► READY ──drain()──► DRAINING
                             │                       │                   │ in-flight = 0
                             │ exit/deadline         │ exit              ▼  (or grace over)
                             ▼                       ▼                STOPPING ──► STOPPED
                           FAILED ◄──────────────── FAILED

The instance is the only writer of its state (contract 3). Callers do not read the
state and then act; they call a method that checks and acts in one synchronous step
(``try_acquire``), which is atomic on the event loop.

Process discipline (``scheduler/process/children.py``): the child runs in its own
process group so that SIGTERM/SIGKILL reach anything it forks, and dies with Corral
even when Corral itself is SIGKILLed. Output is drained into a bounded ring buffer,
otherwise a chatty child blocks on a full pipe and looks hung.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiohttp

from scheduler.engines.egress import PLAIN, Egress
from scheduler.errors import LoadFailed
from scheduler.process.children import CHILD_PREEXEC, signal_group

log = logging.getLogger(__name__)
# A health answer's "status" that means ready (anything else in a JSON object: loading).
_READY = (None, "ok", "healthy", "ready")
# A child that lost its port to another process between Corral choosing it and the child
# binding it says so in one of these ways (llama-server, uvicorn, Go, C servers).
_PORT_LOST = re.compile(r"(?i)address already in use|couldn't bind|could not bind|"
                        r"failed to bind|bind: address")
PORT_TRIES = 3


class State(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"
    FAILED = "failed"


# States in which a process may be alive: these count against max_instances.
ALIVE = frozenset({State.STARTING, State.READY, State.DRAINING, State.STOPPING})


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """Everything needed to start one child; built by launcher.py."""

    model: str
    argv: Sequence[str]
    env: Mapping[str, str]
    host: str
    port: int
    slots: int
    load_timeout: float
    health_interval: float = 0.02
    # What the runtime is called in logs and errors (scheduler/engines/templates.py).
    engine: str = "llama-server"
    # Readiness: GET health_path answering health_status, or "tcp" (the port accepts).
    health_path: str = "/health"
    health_status: int = 200
    stop_signal: signal.Signals = signal.SIGTERM
    # The name the child serves the model under, when it differs from Corral's.
    upstream_model: str | None = None
    # The API families it speaks natively (None: llama-server's).
    apis: frozenset[str] | None = None




@dataclass(slots=True)
class _Stats:
    launched_at: float = 0.0
    ready_at: float = 0.0
    load_seconds: float = 0.0
    served: int = 0


class Instance:
    """A launched child. Single owner of its state; see the module docstring."""

    def __init__(
        self,
        instance_id: str,
        model: str,
        slots: int,
        on_change: Callable[[Instance], None],
        on_release: Callable[[Instance], None] | None = None,
        footprint: int = 0,
        vram: int = 0,
        log_lines: int = 500,
        clock: Callable[[], float] = time.monotonic,
        ctx: int = 0,
    ) -> None:
        self.id = instance_id
        self.model = model
        self.slots = slots
        self.footprint = footprint
        self.vram = vram
        # Tokens of context per slot it is launched with; 0 until known (the scheduler
        # sets it before the launch, once the model's file has been sized).
        self.ctx = ctx
        # Known once start() has prepared the launch (port, argv).
        self.spec: LaunchSpec | None = None
        self.base_url = ""
        self.log: deque[str] = deque(maxlen=log_lines)
        self.in_flight = 0
        self.exit_code: int | None = None
        self.failure: str | None = None
        self.stats = _Stats()
        self._clock = clock
        self.last_used = clock()
        # Per-instance idle timeout set by a client (Ollama keep_alive, LM Studio ttl);
        # None means the model's configured ttl.
        self.ttl_override: float | None = None
        # Created to be started: STARTING at once, so that it counts against the
        # limits and concurrent callers join it before its task has even run.
        self._state = State.STARTING
        self._started = False
        self._on_change = on_change
        # A call ending is far more frequent than a state change, and only matters
        # to the scheduler when someone is queued: it may get its own callback.
        self._on_release = on_release or on_change
        self._proc: asyncio.subprocess.Process | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._exited = asyncio.Event()

    # -- state -------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def load(self) -> float:
        return self.in_flight / self.slots

    @property
    def apis(self) -> frozenset[str] | None:
        return self.spec.apis if self.spec is not None else None

    @property
    def egress(self) -> Egress:
        rename = self.spec.upstream_model if self.spec is not None else None
        return Egress(rename=rename) if rename else PLAIN

    @property
    def weight(self) -> float:
        return 1.0

    def _set(self, state: State) -> None:
        if state is not self._state:
            log.debug("instance %s: %s -> %s", self.id, self._state, state)
            self._state = state
            self._on_change(self)

    def try_acquire(self) -> bool:
        """Take a slot if this instance is ready and has one free. Atomic on the loop."""
        if self._state is not State.READY or self.in_flight >= self.slots:
            return False
        self.in_flight += 1
        self._idle.clear()
        return True

    def touch(self) -> None:
        """A use that takes no slot (a raw passthrough call) resets the idle TTL."""
        self.last_used = self._clock()

    def release(self) -> None:
        self.in_flight -= 1
        self.stats.served += 1
        self.last_used = self._clock()
        if self.in_flight == 0:
            self._idle.set()
        self._on_release(self)

    def drain(self) -> None:
        """Stop taking new calls; running ones continue. Idempotent."""
        if self._state in (State.READY, State.STARTING):
            self._set(State.DRAINING)

    # -- lifecycle ---------------------------------------------------------------

    async def start(
        self,
        session: aiohttp.ClientSession,
        prepare: Callable[[], Awaitable[LaunchSpec]],
    ) -> None:
        """Prepare the launch, spawn the child and return once /health answers 200.

        ``prepare`` finds the binary and the model file (which may mean assembling
        it); the instance is STARTING meanwhile so that it counts against the limits
        and concurrent callers join this launch.

        Raises LoadFailed (state FAILED) if preparing fails, the child exits first,
        the deadline passes or the instance is told to stop meanwhile. The child's
        last log lines ride on the error: "exit status 1" alone tells a user nothing.
        """
        if self._started:
            raise RuntimeError(f"instance {self.id} already started")
        self._started = True
        self.stats.launched_at = self._clock()
        if self.state is not State.STARTING:
            self._exited.set()
            raise LoadFailed(self.model, "stopped before it started")
        try:
            spec = await prepare()
        except LoadFailed as e:
            self.failure = e.reason
            self._exited.set()
            self._set(State.FAILED)
            raise
        reason = ""
        for attempt in range(PORT_TRIES):
            outcome = await self._run(session, spec)
            if outcome is None:
                return
            reason = outcome
            if not (attempt + 1 < PORT_TRIES and self.state is State.STARTING
                    and self._exited.is_set() and _PORT_LOST.search("\n".join(self.log))):
                break
            # The port chosen free was taken before the child bound it (another
            # process on a busy machine): choose again, never fail the callers for it.
            log.warning("instance %s: port %d was taken before %s bound it; relaunching",
                        self.id, spec.port, spec.engine)
            self.log.clear()
            self._exited = asyncio.Event()
            try:
                spec = await prepare()
            except LoadFailed as e:
                reason = e.reason
                break
        self.failure = reason
        await self._kill()
        self._set(State.FAILED)
        raise LoadFailed(self.model, reason, list(self.log)[-20:])

    async def _run(self, session: aiohttp.ClientSession, spec: LaunchSpec) -> str | None:
        """Spawn the child for ``spec`` and wait until it is ready (None) or why not."""
        self.spec = spec
        self.base_url = f"http://{spec.host}:{spec.port}"
        if self.state is not State.STARTING:
            # Told to stop while preparing: never spawn.
            self._exited.set()
            self._set(State.STOPPED)
            raise LoadFailed(self.model, "stopped while loading")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=dict(spec.env),
                start_new_session=True,
                preexec_fn=CHILD_PREEXEC,
            )
        except OSError as e:
            self.failure = f"cannot execute {spec.argv[0]}: {e.strerror or e}"
            self._set(State.FAILED)
            self._exited.set()
            raise LoadFailed(self.model, self.failure) from None
        log.info("instance %s: launched pid %d on port %d", self.id, self._proc.pid, spec.port)
        self._spawn(self._drain_output())
        self._spawn(self._watch_exit())

        ready = asyncio.ensure_future(self._poll_health(session))
        exited = asyncio.ensure_future(self._exited.wait())
        try:
            done, _ = await asyncio.wait(
                {ready, exited},
                timeout=spec.load_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for fut in (ready, exited):
                fut.cancel()
            await asyncio.gather(ready, exited, return_exceptions=True)

        if ready in done and not ready.cancelled() and ready.exception() is None:
            if self.state is State.STARTING:
                self.stats.ready_at = self._clock()
                self.stats.load_seconds = self.stats.ready_at - self.stats.launched_at
                self.last_used = self.stats.ready_at
                self._set(State.READY)
                return None
            reason = "stopped while loading"
        elif self._exited.is_set():
            # Let the output drain catch the child's last words before quoting them.
            await asyncio.sleep(0.05)
            reason = f"{spec.engine} exited with status {self.exit_code} while loading"
        else:
            reason = f"not ready after {spec.load_timeout:g} s"
        return reason

    async def stop(
        self, drain_timeout: float, stop_timeout: float,
        before_stop: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Drain, then SIGTERM the process group, then SIGKILL after stop_timeout.

        ``before_stop`` runs once the drain is over, while the child still serves
        (the slot cache saves its slots then); it must not raise. Safe to call in any
        state and more than once.
        """
        if self._proc is None:
            # Never spawned (or still preparing): nothing to signal.
            if self._state is not State.FAILED:
                self._set(State.STOPPED)
            return
        self.drain()
        if self.in_flight and drain_timeout > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_timeout):
                    await self._idle.wait()
        if before_stop is not None and self._state is State.DRAINING and not self.in_flight:
            try:
                await before_stop()
            except Exception:
                # Saving its slots is a courtesy; stopping the child is not.
                log.exception("instance %s: before stopping", self.id)
        if self._state is not State.FAILED:
            self._set(State.STOPPING)
        await self._terminate(stop_timeout)
        if self._state is not State.FAILED:
            self._set(State.STOPPED)

    async def wait_exit(self, within: float) -> bool:
        """True once the process has exited, waiting at most ``within`` seconds."""
        if self._proc is None:
            return False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._exited.wait()
        return self._exited.is_set()

    # -- internals ---------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _poll_health(self, session: aiohttp.ClientSession) -> None:
        spec = self.spec
        assert spec is not None
        interval = spec.health_interval
        if spec.health_path == "tcp":
            await self._poll_port(spec)
            return
        url = self.base_url + spec.health_path
        timeout = aiohttp.ClientTimeout(total=max(1.0, interval * 20))
        while True:
            try:
                async with session.get(url, timeout=timeout) as resp:
                    if resp.status == spec.health_status:
                        # Older llama-server builds answer 200 {"status":"loading
                        # model"}; other servers answer anything, or nothing
                        # (Kokoro-FastAPI: {"status": "healthy"}).
                        try:
                            body = await resp.json(content_type=None)
                        except ValueError:
                            return
                        if not isinstance(body, dict) or body.get("status") in _READY:
                            return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(interval)

    async def _poll_port(self, spec: LaunchSpec) -> None:
        while True:
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(max(1.0, spec.health_interval * 20)):
                    _, writer = await asyncio.open_connection(spec.host, spec.port)
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return
            await asyncio.sleep(spec.health_interval)

    async def _drain_output(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        stream = self._proc.stdout
        while True:
            try:
                line = await stream.readline()
            except ValueError:
                # A line longer than the stream limit: keep the part we have.
                line = await stream.read(65536)
            if not line:
                return
            self.log.append(line.decode("utf-8", "replace").rstrip())

    async def _watch_exit(self) -> None:
        assert self._proc is not None
        code = await self._proc.wait()
        self.exit_code = code
        self._exited.set()
        if self._state in (State.READY, State.DRAINING):
            # Nobody asked it to stop: a crash.
            engine = self.spec.engine if self.spec is not None else "llama-server"
            self.failure = f"{engine} exited unexpectedly with status {code}"
            log.warning("instance %s: %s", self.id, self.failure)
            self._idle.set()
            self._set(State.FAILED)

    async def _kill(self) -> None:
        await self._terminate(0)

    async def _terminate(self, grace: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            stop = self.spec.stop_signal if self.spec is not None else signal.SIGTERM
            self._signal(stop if grace > 0 else signal.SIGKILL)
            try:
                async with asyncio.timeout(grace if grace > 0 else 5):
                    await self._exited.wait()
            except TimeoutError:
                self._signal(signal.SIGKILL)
                await self._exited.wait()
        else:
            await self._exited.wait()
        # Anything the child forked shares its group; make sure nothing lingers.
        self._signal(signal.SIGKILL)
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is not None:
            signal_group(self._proc.pid, sig)

    def describe(self) -> dict[str, object]:
        return {
            "id": self.id,
            "model": self.model,
            "state": str(self._state),
            "engine": self.spec.engine if self.spec else None,
            "pid": self.pid,
            "port": self.spec.port if self.spec else None,
            "base_url": self.base_url,
            "slots": self.slots,
            "ctx_size": self.ctx,
            "in_flight": self.in_flight,
            "load": self.load,
            "footprint_bytes": self.footprint,
            "vram_bytes": self.vram,
            "load_seconds": round(self.stats.load_seconds, 3),
            "served": self.stats.served,
            "idle_seconds": round(self._clock() - self.last_used, 3),
            "failure": self.failure,
            "exit_code": self.exit_code,
        }
