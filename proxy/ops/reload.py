"""Config reload: on a file change, on SIGHUP, or through the admin API.

One ``Reloader`` per process, made in the core app's cleanup_ctx after the scheduler.
Every path ends in ``Reloader.reload()``, which runs one at a time:

1. load and validate the file (and its models directory) off the event loop;
2. if that fails, keep running on the current config and remember why
   (``last_error``, ``corral_config_reload_success`` 0, an error log line);
3. else hand the new config to ``Scheduler.apply_config``, which restarts only the
   models whose config changed, drains and stops removed ones and adds new ones.

The watcher polls the files' mtimes every second rather than using inotify: it works
on every filesystem (bind mounts, NFS, ConfigMaps that swap a symlink) and costs a
few stat calls. ``[server]`` keys (ports, host, API keys) are bound when the
listeners start; a change there is reported as needing a restart, not applied.

A config written through the admin API is validated first (from a temporary file
beside the real one, so relative paths and ``models.d`` resolve the same), the
previous file is kept as ``<name>.bak``, and the new one replaces it atomically.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from proxy.edge import tuning
from proxy.metrics.registry import Metrics, labels
from scheduler.aio import cancel_and_wait
from scheduler.config.root import CorralConfig, load_config
from scheduler.config.writable import Refusal, moved_models_dir, refused_changes
from scheduler.errors import ConfigError, CorralError
from scheduler.scheduling.scheduler import Scheduler

log = logging.getLogger(__name__)

Signature = tuple[tuple[str, int, int] | None, ...]


class NoConfigFile(CorralError):
    status = 409
    code = "no_config_file"
    type = "invalid_request_error"


@dataclass
class Outcome:
    """What one reload did."""

    ok: bool
    source: str
    time: float
    changes: dict[str, list[str]] = field(default_factory=dict)
    restart_required: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "source": self.source, "time": round(self.time, 3),
                "changes": self.changes, "restart_required": self.restart_required,
                "error": self.error}


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + ".bak")


def server_changes(old: CorralConfig, new: CorralConfig) -> list[str]:
    """``[server]`` keys that differ: they only take effect after a restart."""
    before, after = old.server.model_dump(), new.server.model_dump()
    return [f"server.{k}" for k in before if before[k] != after.get(k)]


class ProtectedChange(CorralError):
    status = 403
    code = "protected_config_key"
    type = "permission_error"


def _refuse(path: Path, refused: list[Refusal]) -> None:
    if refused:
        raise ProtectedChange(
            f"refused, nothing written: {'; '.join(map(str, refused))}: these keys change "
            f"only in the file on disk ({path}), never over HTTP (docs/security.md)"
        )


class Reloader:
    def __init__(
        self,
        path: Path | None,
        scheduler: Scheduler,
        metrics: Metrics | None = None,
        *,
        interval: float = 1.0,
        loader: Callable[[Path], CorralConfig] = load_config,
    ) -> None:
        self.path = path
        self._scheduler = scheduler
        self._metrics = metrics
        self._interval = interval
        self._loader = loader
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._requested: str | None = None
        self._signature: Signature = ()
        self.last: Outcome | None = None
        self.last_error: str | None = None
        # Run after each reload that applied (runtime models check their rule again).
        self.after_reload: list[Callable[[], Awaitable[None]]] = []

    @property
    def current(self) -> CorralConfig:
        return self._scheduler.configured

    # -- triggers ------------------------------------------------------------------

    def request(self, source: str = "SIGHUP") -> None:
        """Ask the watcher to reload now. Safe from a signal handler: it only sets a
        flag and an event."""
        self._requested = source
        self._wake.set()

    async def run(self) -> None:
        """The watcher: reload when the files change or a reload is requested."""
        if self.path is not None:
            self._signature = await asyncio.to_thread(self._stat)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            self._wake.clear()
            source, self._requested = self._requested, None
            if self.path is None:
                if source is not None:
                    log.warning("reload requested (%s) but no config file is known", source)
                continue
            if source is None:
                signature = await asyncio.to_thread(self._stat)
                if signature == self._signature:
                    continue
                source = "file"
            try:
                await self.reload(source)
            except Exception:  # the watcher must outlive a bug in one reload
                log.exception("config reload (%s) failed", source)

    # -- reloading -----------------------------------------------------------------

    async def reload(self, source: str) -> Outcome:
        if self.path is None:
            raise NoConfigFile("Corral was started without a config file to reload")
        async with self._lock:
            return await self._reload(self.path, source)

    async def write(self, text: str) -> Outcome:
        """Validate ``text`` as the new config file, back up the old file, replace it,
        reload. Raises ConfigError (file untouched) when ``text`` is not valid, and
        ProtectedChange when it changes a key outside the allow-list
        (scheduler/config/writable.py)."""
        if self.path is None:
            raise NoConfigFile("Corral was started without a config file to write")
        path = self.path
        async with self._lock:
            await asyncio.to_thread(self._validate_and_replace, path, text)
            log.info("config written through the admin API; previous file kept as %s",
                     backup_path(path))
            return await self._reload(path, "admin-write")

    async def _reload(self, path: Path, source: str) -> Outcome:
        # Taken before reading: a write that lands while we load is seen next poll.
        self._signature = await asyncio.to_thread(self._stat)
        old = self.current
        try:
            new = await asyncio.to_thread(self._loader, path)
            changes = await self._scheduler.apply_config(new)
        except CorralError as e:
            outcome = Outcome(False, source, time.time(), error=e.message)
            self.last, self.last_error = outcome, e.message
            if self._metrics is not None:
                self._metrics.config_loaded(False)
            log.error("config reload (%s) failed; still running the previous config:\n%s",
                      source, e.message)
            return outcome
        restart = server_changes(old, new)
        outcome = Outcome(True, source, time.time(), changes, restart)
        self.last, self.last_error = outcome, None
        if self._metrics is not None:
            self._metrics.set_models(*labels(new))
            self._metrics.config_loaded(True)
        summary = ", ".join(f"{k}: {', '.join(v)}" for k, v in changes.items()
                            if v and k != "unchanged") or "no model changed"
        # The new config's objects are long-lived too (proxy.edge.tuning).
        tuning.tune_gc(new)
        log.info("config reloaded (%s): %s", source, summary)
        if restart:
            log.warning("config keys that take effect only after a restart changed: %s",
                        ", ".join(restart))
        for hook in self.after_reload:
            try:
                await hook()
            except Exception:  # the reload applied: one follower's bug must not undo that
                log.exception("after the config reload (%s): %s failed", source, hook)
        return outcome

    # -- blocking helpers (run in a thread) ----------------------------------------------

    def _stat(self) -> Signature:
        assert self.path is not None
        cfg = self.current
        mdir = cfg.models_dir or self.path.parent / "models.d"
        files = [self.path]
        with contextlib.suppress(OSError):
            files += sorted(mdir.glob("*.toml"))
        out: list[tuple[str, int, int] | None] = []
        for f in files:
            try:
                st = f.stat()
            except OSError:
                out.append(None)
                continue
            out.append((str(f), st.st_mtime_ns, st.st_size))
        return tuple(out)

    def _validate_and_replace(self, path: Path, text: str) -> None:
        # Before loading: the load would read another models_dir's files.
        moved = moved_models_dir(path, text, self.current)
        _refuse(path, [moved] if moved is not None else [])
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            try:
                new = self._loader(tmp)
            except ConfigError as e:
                raise ConfigError(e.message.replace(str(tmp), str(path))) from None
            _refuse(path, refused_changes(self.current, new))
            if path.exists():
                # The file may hold API keys: the new one keeps the old one's mode.
                shutil.copymode(path, tmp)
                shutil.copy2(path, backup_path(path))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    # -- views --------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        return {
            "path": str(self.path) if self.path else None,
            "backup": str(backup_path(self.path)) if self.path else None,
            "reload_success": self.last is None or self.last.ok,
            "last_reload": self.last.as_dict() if self.last else None,
            "last_reload_error": self.last_error,
        }


RELOADER = web.AppKey("reloader", Reloader)


def reload_ctx(
    path: Path | None, metrics: Metrics | None, interval: float = 1.0
) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    """Makes the Reloader and runs its watcher; after the core's cleanup_ctx."""

    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        from proxy.keys import SCHEDULER

        reloader = Reloader(path, app[SCHEDULER], metrics, interval=interval)
        app[RELOADER] = reloader
        watcher = asyncio.create_task(reloader.run(), name="corral-config-watcher")
        try:
            yield
        finally:
            await cancel_and_wait(watcher)

    return ctx
