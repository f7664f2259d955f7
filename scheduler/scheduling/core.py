"""The state every part of the scheduler shares, set up in one place.

scheduler.Scheduler is put together from parts, one concern each (all in
scheduler/scheduling/): leases (leasing.py), the dispatcher that hands out slots and
decides launches and evictions (dispatch.py), launching and retiring instances
(launching.py), and configuration, lifecycle and status (scheduler.py).
They share the state that ``Core.__init__`` sets up; what one part calls on another is
declared here for the type checker.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from scheduler.config import policy as policy_rules
from scheduler.config.root import CorralConfig, ModelConfig
from scheduler.engines.providers import Providers
from scheduler.engines.remote import Remote
from scheduler.errors import ContextTooLong, CorralError, UnknownModel
from scheduler.keys import tenants
from scheduler.models.sources import ModelFiles, placement_at
from scheduler.process.health import HealthWatch
from scheduler.process.instance import Instance
from scheduler.process.slotcache import SlotCache
from scheduler.scheduling import contexts, policy, prefixes
from scheduler.scheduling.state import (
    BinaryFinder,
    Events,
    LeaseHints,
    ModelState,
    NoEvents,
    Picker,
    Servable,
)

log = logging.getLogger("scheduler.scheduling.scheduler")


def default_finder(configured: Path | None) -> Path | None:
    from scheduler.installing.install import find_llama_server

    return find_llama_server(configured)


class Core:
    """The scheduler's shared state; the parts that act on it are its subclasses."""

    def __init__(
        self,
        cfg: CorralConfig,
        session: aiohttp.ClientSession,
        *,
        find_binary: BinaryFinder = default_finder,
        clock: Callable[[], float] = time.monotonic,
        reap_interval: float = 0.5,
        events: Events | None = None,
    ) -> None:
        self._cfg = cfg
        # What the config file says; _cfg adds the dynamic models (set_dynamic_models).
        self._configured = cfg
        self._dynamic: dict[str, tuple[ModelConfig, ...]] = {}
        # One switch of the effective config at a time: a switch awaits (sizing files
        # off the loop) and another source's (a scan, a runtime model, a reload) would
        # change the models under it; each computes its config when its turn comes.
        self._switching = asyncio.Lock()
        self.events: Events = events or NoEvents()
        self._session = session
        self._find_binary = find_binary
        self._clock = clock
        self._reap_interval = reap_interval
        self._models: dict[str, ModelState] = {}
        self._names: dict[str, ModelState] = {}
        self._listed: list[str] = []
        # The names a key's scope is matched against, per name a call may use.
        self._scope: dict[str, tuple[str, ...]] = {}
        self.shapes: dict[str, policy_rules.Shape] = {}
        self._files = ModelFiles()
        self._binary: Path | None = None
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._kicking = False
        self._rekick = False
        self._reaper: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._health = HealthWatch(session, cfg.scheduler.ready_check_interval,
                                   self.instances, self._unhealthy)
        # Bytes model footprints may use; None = not enforced. Set by start().
        self.memory_budget: int | None = None
        self.vram_budget: int | None = None
        # The model another was drained for: the room that frees up is its to take,
        # otherwise the drained model (whose callers queued earlier) takes it back.
        self._reserved_for: str | None = None
        # Chooses among a model's upstreams; a cluster front puts node choice here
        # (scheduler/cluster/nodes.py). Called on the event loop, must not block.
        self.pick: Picker = policy.pick_instance
        # Instances whose caller went away mid-call, until when Corral leaves them
        # alone (Leasing.quiet).
        self._quiet: dict[str, float] = {}
        # Launches an operator cancelled (instance ids): their end is no failure.
        self._cancelled: set[str] = set()
        # [[providers]]: their listings become dynamic models (engines/providers.py).
        self.providers = Providers(self, session)
        # API keys: scopes, limits, usage (scheduler/keys/tenants.py).
        self.tenants = tenants.Tenants(cfg, clock)
        self.slots = SlotCache(cfg, session)
        self.slots.on_restore = self._restored
        self._apply_models(cfg)

    def _apply_models(self, cfg: CorralConfig) -> None:
        for mc in cfg.models:
            self._models[mc.name] = ModelState(mc)
        self._index()

    def _index(self) -> None:
        """Every name a call may use: models, aliases and variants (a variant is a
        name for its model's ModelState), the names listings show, and the request
        policy of each name that has one (scheduler/config/policy.py)."""
        self._names = {}
        self._listed = []
        self._scope = {}
        shapes: dict[str, policy_rules.Shape] = {}
        for m in self._models.values():
            cfg = m.cfg
            own = (cfg.name, *cfg.aliases)
            rules = policy_rules.compile_rules(cfg.request)
            for name in own:
                self._names[name] = m
                self._scope[name] = own
                if rules:
                    shapes[name] = policy_rules.Shape(cfg.name, cfg.name, rules)
            if not cfg.unlisted:
                self._listed += own
            for v in cfg.variants:
                # A key whose scope names the model may call its variants; one that
                # names a variant, that variant only.
                names = (v.name, *v.aliases)
                shape = policy_rules.Shape(cfg.name, v.name,
                                           policy_rules.compile_rules(cfg.request, v))
                for name in names:
                    self._names[name] = m
                    self._scope[name] = (*names, *own)
                    shapes[name] = shape
                if not v.unlisted:
                    self._listed += names
        # Read by the call path on every call: empty when no model has a policy or a
        # variant, which then costs one truth test (proxy/calls/policy.py).
        self.shapes = shapes

    def _restored(self, model: str, seconds: float) -> None:
        m = self._models.get(model)
        if m is not None:
            m.restore_times.add(seconds)

    def _visible(self, name: str) -> ModelState:
        m = self._names.get(name)
        key = tenants.current()
        if m is None or (key is not None and not key.may_use(self._scope[name])):
            raise UnknownModel(name, self.names())
        return m

    def _instance(self, iid: str) -> Instance | None:
        for m in self._models.values():
            for i in m.instances:
                if i.id == iid:
                    return i
        return None

    def _choose(self, m: ModelState, hints: LeaseHints) -> Servable | None:
        """The upstream of ``m`` to take a call now (policy.pick_instance, or a cluster
        front's node choice), by the prefixes of the call each holds, leaving out those
        the call already failed on while another is ready or starting, and those whose
        context is too small for it."""
        servables = policy.avoiding(m.servables(), hints.avoid)
        if hints.need_ctx or hints.want_ctx:
            servables = contexts.fitting(servables, self._need(m, hints))
        return self.pick(servables, prefixes.matches(m.prefixes, hints.chain),
                         self._cfg.scheduler.max_load)

    def instances(self) -> list[Instance]:
        """Every local instance; those of the calling key's scope only."""
        key = tenants.current()
        return [i for m in self._models.values()
                if key is None or key.may_use((m.cfg.name, *m.cfg.aliases))
                for i in m.instances]

    def remotes(self) -> list[Remote]:
        return [r for m in self._models.values() for r in m.remotes]

    def names(self) -> list[str]:
        """Every listed model name, alias and variant, in config order (``unlisted``
        ones are left out); those of the calling key's scope only."""
        key = tenants.current()
        if key is None or key.unscoped:
            return list(self._listed)
        return [n for n in self._listed if key.may_use(self._scope[n])]

    def knows(self, name: str) -> bool:
        """Whether a call may name ``name`` (listed or not, any key)."""
        return name in self._names

    # -- context (scheduler/scheduling/contexts.py) --------------------------------

    def _need(self, m: ModelState, hints: LeaseHints) -> int:
        """Tokens per slot a call must get; 0: any instance will do."""
        if not (hints.need_ctx or hints.want_ctx):
            return 0
        return contexts.requirement(hints.need_ctx, hints.want_ctx, m.ctx)

    def _too_long(self, m: ModelState, need: int) -> ContextTooLong | None:
        """The error for a need no instance of ``m`` can meet (None: it can be met, or
        the model's contexts are not known yet)."""
        if m.ctx is None or need <= m.ctx.maximum:
            return None
        return ContextTooLong(m.cfg.name, need, m.ctx.maximum)

    def _placement(self, m: ModelState, ctx: int) -> tuple[int, int]:
        """(RAM, VRAM) an instance of ``m`` launched with ``ctx`` tokens per slot needs."""
        if ctx <= 0 or not m.sized:
            return m.footprint, m.vram
        return placement_at(m.cfg, m.size, self.vram_budget is not None, ctx)

    # What the parts call on each other (the type checker's view; Scheduler has them).
    if TYPE_CHECKING:
        def _kick(self) -> None: ...

        def _snapshot(self) -> policy.Snapshot: ...

        def _launch(self, m: ModelState, ctx: int = 0) -> Instance: ...

        def _retire(self, inst: Instance, reason: str, *, drain: bool = True) -> None: ...

        def _fail_waiters(self, m: ModelState, error: CorralError) -> None: ...

        def _retry_after(self, m: ModelState) -> float: ...

        def _unhealthy(self, inst: Instance, reason: str) -> None: ...

        async def _size(self, m: ModelState, path: Path | None = None,
                        plan: bool = True) -> None: ...

        async def set_dynamic_models(
            self, source: str, models: Iterable[ModelConfig]
        ) -> dict[str, list[str]]: ...
