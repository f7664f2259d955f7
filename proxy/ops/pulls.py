"""Models that arrive while Corral runs: the directory scanner's lifecycle, pulls
from Hugging Face (Ollama's ``/api/pull``, ``corral pull``) and ``auto_pull``.

A pulled model joins the scheduler as a dynamic model of source "pulled", so it is
listed and served at once. After a restart it is offered again when Corral's Hugging
Face cache is among the scanned directories (docs/models.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from aiohttp import web

from proxy.calls.streaming import write_stream
from proxy.keys import DISCOVERY, PULL_LOCKS, SCHEDULER
from scheduler.aio import cancel_and_wait
from scheduler.config.root import ModelConfig
from scheduler.discovery.watch import Discovery
from scheduler.errors import UnknownModel
from scheduler.ipc.worker import WorkerScheduler
from scheduler.models import pull
from scheduler.scheduling.scheduler import Scheduler

SOURCE = "pulled"

How = tuple[Callable[[], pull.Plan], ModelConfig | None]


@contextlib.asynccontextmanager
async def _discovery(app: web.Application) -> AsyncIterator[None]:
    found = Discovery(app[SCHEDULER])
    app[DISCOVERY] = found
    app[PULL_LOCKS] = {}
    # In the background: a tree of thousands of files must not delay the listeners.
    task = asyncio.create_task(found.run(), name="corral-discovery")
    try:
        yield
    finally:
        await cancel_and_wait(task)


def discovery_ctx(app: web.Application) -> contextlib.AbstractAsyncContextManager[None]:
    return _discovery(app)


def downloadable(scheduler: Scheduler, name: str) -> How | None:
    """How to pull ``name`` (the plan, and the configured model it serves, if any): a
    configured hf_repo model's own files, else an ``hf.co/...`` reference; None when
    there is nothing to download."""
    try:
        cfg: ModelConfig | None = scheduler.resolve(name)
    except UnknownModel:
        cfg = None
    if cfg is None:
        return _ref_plan(name)
    if cfg.origin != "config" or cfg.hf_repo is None or cfg.hf_file is None:
        # A file here already (scanned, pulled, a path or a package): "pulling" it
        # means making sure it loads, as for Ollama a model it has.
        return None
    repo, file, rev, mm = cfg.hf_repo, cfg.hf_file, cfg.hf_revision, cfg.mmproj
    return (lambda: pull.plan(repo, None, revision=rev, hf_file=file, mmproj=mm)), cfg


def _ref_plan(name: str) -> How | None:
    ref = pull.parse_ref(name)
    if ref is None:
        return None
    return (lambda: pull.plan(ref.repo, ref.tag)), None


async def register(scheduler: Scheduler, model: ModelConfig) -> None:
    """Add (or replace) a pulled model; the names it was asked by before stay."""
    pulled = scheduler.dynamic_models(SOURCE)
    for m in pulled:
        if m.name == model.name:
            aliases = tuple(dict.fromkeys((*m.aliases, *model.aliases)))
            model = model.model_copy(update={"aliases": aliases})
    if model in pulled:
        return
    await scheduler.set_dynamic_models(SOURCE, [*(m for m in pulled if m.name != model.name),
                                                model])


async def delete(scheduler: Scheduler, model: ModelConfig) -> None:
    """Ollama's delete of a pulled model: no longer offered (its instances drain), its
    files removed from Corral's cache."""
    await scheduler.set_dynamic_models(
        SOURCE, [m for m in scheduler.dynamic_models(SOURCE) if m.name != model.name])
    await asyncio.to_thread(pull.remove_files, model, scheduler.config.models)


async def run_pull(app: web.Application, name: str, make_plan: Callable[[], pull.Plan],
                   base: ModelConfig | None) -> AsyncGenerator[list[dict[str, Any]], None]:
    """Ollama's status lines for one pull (one at a time per name); the model is
    registered before success."""
    async with (app[PULL_LOCKS].setdefault(name, asyncio.Lock()),
                contextlib.aclosing(_pull_lines(app, name, make_plan, base)) as it):
        async for lines in it:
            yield lines


async def _pull_lines(app: web.Application, name: str, make_plan: Callable[[], pull.Plan],
                      base: ModelConfig | None) -> AsyncGenerator[list[dict[str, Any]], None]:
    scheduler = app[SCHEDULER]
    async with contextlib.aclosing(pull.steps(make_plan)) as it:
        async for item in it:
            if isinstance(item, pull.Plan):
                if base is None:
                    model = pull.model_for(item)
                    if name != model.name and not scheduler.knows(name):
                        model = model.model_copy(update={"aliases": (name,)})
                    await register(scheduler, model)
                continue
            yield [item]


async def respond(request: web.Request, name: str, how: How, stream: bool
                  ) -> web.StreamResponse:
    lines = run_pull(request.app, name, *how)
    if stream:
        return await write_stream(request, lines, ndjson=True)
    async with contextlib.aclosing(lines) as it:
        async for _ in it:
            pass
    return web.json_response({"status": "success"})


async def ensure(app: web.Application, name: str) -> None:
    """``auto_pull``: an unknown ``hf.co/...`` model named in a call is pulled first.
    Calls that name it meanwhile wait for that pull instead of starting another."""
    scheduler = app[SCHEDULER]
    if not scheduler.config.scheduler.auto_pull or scheduler.knows(name):
        return
    how = _ref_plan(name)
    if how is not None and isinstance(scheduler, WorkerScheduler):
        await scheduler.ensure_pulled(name)  # a worker process: the owner pulls
        return
    if how is None or PULL_LOCKS not in app:
        return
    async with app[PULL_LOCKS].setdefault(name, asyncio.Lock()):
        if scheduler.knows(name):
            return
        async with contextlib.aclosing(_pull_lines(app, name, *how)) as it:
            async for _ in it:
                pass
