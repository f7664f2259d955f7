"""Keeps the scheduler's scanned models current: a scan at start, then one every
``scan_interval`` seconds and at once after a config reload; only a changed result
reaches the scheduler, which drains and stops the models whose files vanished.

Polling, not inotify, for the reason the config reloader gives (bind mounts, NFS,
swapped symlinks). Each interval compares directory mtimes and linked files' targets
(scanner.signature, links followed as the scan follows them); a change (or every
``FULL_SCAN_EVERY`` intervals) runs the scan, which with the header cache costs a walk
and a stat per file.
"""

from __future__ import annotations

import asyncio
import logging

from scheduler.discovery.scanner import HeaderCache, ScanResult, scan, signature
from scheduler.scheduling.scheduler import Scheduler

log = logging.getLogger(__name__)

SOURCE = "scan"
_STEP = 0.25  # how soon a reload is noticed


# A full scan (one stat per file) at least every this many intervals, for files
# rewritten in place; between them only directory mtimes are compared.
FULL_SCAN_EVERY = 15


class Discovery:
    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self._cache = HeaderCache()
        self._signature: object = None
        self._quick = 0
        self.problems: tuple[str, ...] = ()

    async def changed(self) -> bool:
        """Whether a directory changed since the last scan (or a full scan is due)."""
        dirs = self._scheduler.configured.scan_dirs()
        sig = (dirs, await asyncio.to_thread(signature, dirs) if dirs else ())
        self._quick += 1
        if sig == self._signature and self._quick < FULL_SCAN_EVERY:
            return False
        self._signature, self._quick = sig, 0
        return True

    async def scan_once(self) -> ScanResult:
        cfg = self._scheduler.configured
        dirs = cfg.scan_dirs()
        result = await asyncio.to_thread(scan, dirs, self._cache) if dirs else ScanResult((), ())
        for p in sorted(set(result.problems) - set(self.problems)):
            log.warning("model scan: %s", p)
        self.problems = result.problems
        models = result.models
        if models != self._scheduler.dynamic_models(SOURCE):
            report = await self._scheduler.set_dynamic_models(SOURCE, models)
            log.info("model scan: %d model(s); added %s, removed %s", len(models),
                     report["added"] or "none", report["removed"] or "none")
        return result

    async def run(self) -> None:
        while True:
            cfg = self._scheduler.configured
            try:
                if await self.changed():
                    await self.scan_once()
            except Exception:  # a scan bug must not end discovery for the process
                log.exception("model scan failed")
            waited = 0.0
            while waited < cfg.scheduler.scan_interval and self._scheduler.configured is cfg:
                await asyncio.sleep(_STEP)
                waited += _STEP
