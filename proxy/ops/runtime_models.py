"""The runtime models an admin created (scheduler/models/runtime.py has the rule): the
set offered to the scheduler as the dynamic source "runtime", and its file beside the
config. One owner: the main port's app (``RUNTIME_MODELS``).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from scheduler.config.root import ModelConfig
from scheduler.errors import BadRequest, CorralError, UnknownModel
from scheduler.models import runtime
from scheduler.scheduling.scheduler import Scheduler

log = logging.getLogger("proxy.ops.runtime_models")

SOURCE = "runtime"


class RuntimeModels:
    def __init__(self, scheduler: Scheduler, config_path: Path | None) -> None:
        self._scheduler = scheduler
        # None: Corral runs without a config file, and runtime models last until it stops.
        self.file = runtime.file_beside(config_path) if config_path is not None else None
        self._models: dict[str, tuple[runtime.RuntimeModel, ModelConfig]] = {}
        self._lock = asyncio.Lock()

    async def restore(self) -> None:
        """Offer the models the file keeps (those still valid)."""
        if self.file is None:
            return
        cfg = self._scheduler.configured
        for entry in await asyncio.to_thread(runtime.read, self.file):
            try:
                model = await asyncio.to_thread(runtime.restore, entry, cfg)
            except CorralError as e:
                log.warning("runtime models: %s skipped: %s", entry.name, e.message)
                continue
            self._models[entry.name] = (entry, model)
        if self._models:
            log.info("runtime models: %s", ", ".join(self._models))
            await self._offer()

    def entries(self) -> list[runtime.RuntimeModel]:
        return [e for e, _ in self._models.values()]

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def get(self, name: str) -> runtime.RuntimeModel | None:
        found = self._models.get(name)
        return found[0] if found is not None else None

    async def create(self, name: str, base: ModelConfig, params: dict[str, object]
                     ) -> runtime.RuntimeModel:
        """Make ``name`` from ``base`` with ``params``, offer it and write the file."""
        runtime.check_params(params)  # a protected key is named before anything else
        async with self._lock:
            if name not in self._models and name in self._scheduler.names():
                raise BadRequest(f"model '{name}' exists already; pick another name")
            cfg = self._scheduler.configured
            entry, model = await asyncio.to_thread(runtime.create, name, base, params, cfg)
            self._models[name] = (entry, model)
            await self._offer()
            await self._save()
            return entry

    async def delete(self, name: str) -> None:
        async with self._lock:
            if name not in self._models:
                raise UnknownModel(name, list(self._models))
            del self._models[name]
            await self._offer()
            await self._save()

    async def _offer(self) -> None:
        await self._scheduler.set_dynamic_models(SOURCE, [m for _, m in self._models.values()])

    async def _save(self) -> None:
        if self.file is not None:
            await asyncio.to_thread(runtime.write, self.file, self.entries())
