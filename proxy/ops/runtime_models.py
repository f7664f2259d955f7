"""The runtime models an admin created (scheduler/models/runtime.py has the rule): the
set offered to the scheduler as the dynamic source "runtime", and its file beside the
config. One owner: the main port's app (``RUNTIME_MODELS``).

An entry the rule no longer allows (its file left the scan roots, a reload removed its
root) is withheld: not served, kept in the file, and checked again at each config
reload, so that putting the root back serves it again. The rule is applied at start,
after every config reload (``recheck``, run by the reloader) and on every create.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from scheduler.config.root import CorralConfig, ModelConfig
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
        # Every entry, served or withheld, in the file's order.
        self._entries: dict[str, runtime.RuntimeModel] = {}
        # The served ones' models; the withheld ones' reasons (the rule refuses them now).
        self._models: dict[str, ModelConfig] = {}
        self._withheld: dict[str, str] = {}
        self._lock = asyncio.Lock()

    async def restore(self) -> None:
        """Offer the models the file keeps (those the rule allows)."""
        if self.file is None:
            return
        entries = await asyncio.to_thread(runtime.read, self.file)
        async with self._lock:
            self._entries = {e.name: e for e in entries}
            await self._apply(self._scheduler.configured)
            if self._models:
                log.info("runtime models: %s", ", ".join(self._models))

    async def recheck(self) -> None:
        """Apply the rule again to every entry, served or withheld (after a reload:
        ``Reloader.after_reload``)."""
        async with self._lock:
            await self._apply(self._scheduler.configured)

    async def _apply(self, cfg: CorralConfig) -> None:
        served: dict[str, ModelConfig] = {}
        withheld: dict[str, str] = {}
        for name, entry in self._entries.items():
            try:
                served[name] = await asyncio.to_thread(runtime.restore, entry, cfg)
            except CorralError as e:
                withheld[name] = e.message
        for name in sorted(withheld.keys() - self._withheld.keys()):
            log.warning("runtime models: %s withheld (kept in %s, served again when "
                        "allowed): %s", name, self.file, withheld[name])
        for name in sorted(served.keys() & self._withheld.keys()):
            log.info("runtime models: %s served again", name)
        changed = served != self._models
        self._models, self._withheld = served, withheld
        if changed:
            await self._offer()

    def entries(self) -> list[runtime.RuntimeModel]:
        """The entries served now."""
        return [self._entries[n] for n in self._models]

    def withheld(self) -> list[tuple[runtime.RuntimeModel, str]]:
        """The entries the rule refuses now, with the reason."""
        return [(self._entries[n], why) for n, why in self._withheld.items()]

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def get(self, name: str) -> runtime.RuntimeModel | None:
        return self._entries[name] if name in self._models else None

    async def create(self, name: str, base: ModelConfig, params: dict[str, object]
                     ) -> runtime.RuntimeModel:
        """Make ``name`` from ``base`` with ``params``, offer it and write the file."""
        runtime.check_params(params)  # a protected key is named before anything else
        async with self._lock:
            if name in self._withheld:
                raise BadRequest(f"runtime model '{name}' exists, withheld "
                                 f"({self._withheld[name]}); delete it first")
            if name not in self._models and name in self._scheduler.names():
                raise BadRequest(f"model '{name}' exists already; pick another name")
            cfg = self._scheduler.configured
            entry, model = await asyncio.to_thread(runtime.create, name, base, params, cfg)
            self._entries[name] = entry
            self._models[name] = model
            await self._offer()
            await self._save()
            return entry

    async def delete(self, name: str) -> None:
        async with self._lock:
            if name not in self._entries:
                raise UnknownModel(name, list(self._models))
            del self._entries[name]
            self._withheld.pop(name, None)
            if self._models.pop(name, None) is not None:
                await self._offer()
            await self._save()

    async def _offer(self) -> None:
        await self._scheduler.set_dynamic_models(SOURCE, list(self._models.values()))

    async def _save(self) -> None:
        if self.file is not None:
            await asyncio.to_thread(runtime.write, self.file, list(self._entries.values()))
