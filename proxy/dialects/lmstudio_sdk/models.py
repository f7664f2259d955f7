"""Model listing, lookup, load and unload for the SDK's ``system``, ``llm`` and
``embedding`` namespaces.

Identity: a model's ``identifier`` and ``modelKey`` are its Corral name and its
``instanceReference`` is ``corral:<name>``: one stable token per model, so JS
handles survive an eviction and a reload, and cover every replica. Objects carry
the JS 2.0 superset of fields (JS hangs on a missing required one; Python ignores
extras), ints as ints, and optional fields omitted rather than null.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.calls import context
from proxy.calls.modelinfo import MODEL_INFO, ModelFacts, embedding, vision
from proxy.dialects.lmstudio_sdk.channel import Channel, Ctx
from proxy.dialects.lmstudio_sdk.codec import VOID, SdkError
from proxy.dialects.versions import LMSTUDIO_BUILD, LMSTUDIO_VERSION
from proxy.keys import SCHEDULER
from scheduler.config.root import ModelConfig
from scheduler.errors import UnknownModel
from scheduler.process.instance import State
from scheduler.scheduling import loadcost
from scheduler.scheduling.scheduler import LeaseHints, Scheduler

REF_PREFIX = "corral:"
PATH_PREFIX = "corral/"


def domain(cfg: ModelConfig) -> str:
    return "embedding" if embedding(cfg) else "llm"


def ready(scheduler: Scheduler, name: str) -> bool:
    return any(i.state is State.READY for i in scheduler.loaded(name))


def _publisher(facts: ModelFacts) -> str:
    org = facts.model_info.get("general.organization")
    return org if isinstance(org, str) and org else "corral"


def context_length(scheduler: Scheduler, cfg: ModelConfig, facts: ModelFacts) -> int:
    return context.shown(scheduler, cfg, facts.context_length)


def asked_context(p: Mapping[str, Any]) -> int:
    """The contextLength a load's config stack asks for (``llm.load({contextLength})``);
    0: none. The last layer that sets it wins, as in LM Studio's stacks."""
    stack = p.get("loadConfigStack")
    layers = stack.get("layers") if isinstance(stack, dict) else None
    asked = 0
    for layer in layers if isinstance(layers, list) else []:
        cfg = layer.get("config") if isinstance(layer, dict) else None
        fields = cfg.get("fields") if isinstance(cfg, dict) else None
        for f in fields if isinstance(fields, list) else []:
            if (isinstance(f, dict) and str(f.get("key", "")).endswith("load.contextLength")
                    and isinstance(f.get("value"), int) and f["value"] > 0):
                asked = int(f["value"])
    return asked


def model_info(name: str, cfg: ModelConfig, facts: ModelFacts,
               most: int | None = None) -> dict[str, Any]:
    """A downloaded model (LlmInfo / EmbeddingModelInfo)."""
    out: dict[str, Any] = {
        "type": domain(cfg),
        "modelKey": name,
        "format": "gguf",
        "displayName": facts.info.name if facts.info and facts.info.name else name,
        "publisher": _publisher(facts),
        "path": PATH_PREFIX + name,
        "sizeBytes": int(facts.size or 0),
        "indexedModelIdentifier": PATH_PREFIX + name,
        "deviceIdentifier": None,
        "maxContextLength": most if most is not None else int(facts.context_length or 0),
    }
    if facts.architecture:
        out["architecture"] = facts.architecture
    if facts.parameter_size:
        out["paramsString"] = facts.parameter_size
    if not embedding(cfg):
        out["vision"] = vision(cfg)
        out["trainedForToolUse"] = bool(facts.native_tools)
    return out


def instance_info(scheduler: Scheduler, name: str, cfg: ModelConfig,
                  facts: ModelFacts) -> dict[str, Any]:
    """A loaded model (LlmInstanceInfo / EmbeddingModelInstanceInfo)."""
    ttls = [i.ttl_override for i in scheduler.loaded(name) if i.ttl_override is not None]
    ttl = ttls[0] if ttls else scheduler.config.ttl(cfg)
    return {
        **model_info(name, cfg, facts, context.most(scheduler, cfg, facts.context_length)),
        "identifier": name,
        "instanceReference": REF_PREFIX + name,
        "ttlMs": None if ttl < 0 else int(ttl * 1000),
        "lastUsedTime": None,
        "contextLength": context_length(scheduler, cfg, facts),
    }


async def facts_of(ctx: Ctx, cfg: ModelConfig) -> ModelFacts:
    return await ctx.app[MODEL_INFO].get(cfg)


async def info_of(ctx: Ctx, name: str) -> dict[str, Any]:
    scheduler = ctx.app[SCHEDULER]
    cfg = scheduler.resolve(name)
    return instance_info(scheduler, name, cfg, await facts_of(ctx, cfg))


def _in_domain(ctx: Ctx, names: list[str]) -> list[str]:
    scheduler = ctx.app[SCHEDULER]
    return [n for n in names if domain(scheduler.resolve(n)) == ctx.namespace]


def loaded_names(ctx: Ctx) -> list[str]:
    """Loaded models of this namespace, each once (aliases are not instances)."""
    scheduler = ctx.app[SCHEDULER]
    canonical = list(dict.fromkeys(scheduler.resolve(n).name for n in scheduler.names()))
    return [n for n in _in_domain(ctx, canonical) if ready(scheduler, n)]


def lookup(ctx: Ctx, key: str) -> str:
    """The model a key, path or reference names; pathNotFound if none."""
    scheduler = ctx.app[SCHEDULER]
    for prefix in (REF_PREFIX, PATH_PREFIX):
        if key.startswith(prefix):
            key = key[len(prefix):]
    try:
        cfg = scheduler.resolve(key)
    except UnknownModel:
        names = scheduler.names()
        raise SdkError(f"Cannot find a model with key or path '{key}'", "generic.pathNotFound",
                       path=key, availablePathsSample=names[:10],
                       totalModels=len(names)) from None
    if domain(cfg) != ctx.namespace:
        raise SdkError(f"Model '{key}' is an {domain(cfg)} model, not an {ctx.namespace} model",
                       "generic.domainMismatch", path=key, actualDomain=domain(cfg),
                       expectedDomain=ctx.namespace)
    return key


def _no_match(ctx: Ctx, query: object) -> SdkError:
    loaded = loaded_names(ctx)
    return SdkError("No loaded model satisfies all requirements specified in the query.",
                    "generic.noModelMatchingQuery", query=query,
                    loadedModelsSample=loaded[:10], totalLoadedModels=len(loaded))


def specified(ctx: Ctx, spec: object) -> str:
    """The model a ModelSpecifier names. A named model need not be loaded: the call
    that uses it takes a lease, which loads it. An empty query means "any loaded"."""
    if not isinstance(spec, Mapping):
        raise SdkError("a model specifier object is required")
    if spec.get("type") == "instanceReference":
        ref = spec.get("instanceReference")
        if not isinstance(ref, str):
            raise SdkError("instanceReference must be a string")
        try:
            return lookup(ctx, ref)
        except SdkError:
            raise SdkError(f"The model '{ref}' is no longer loaded",
                           "generic.specificModelUnloaded") from None
    query = spec.get("query")
    if spec.get("type") != "query" or not isinstance(query, Mapping):
        raise SdkError(f"unsupported model specifier {spec!r}")
    key = query.get("identifier") or query.get("path")
    if isinstance(key, str) and key:
        try:
            return lookup(ctx, key)
        except SdkError as e:
            if e.code == "generic.domainMismatch":
                raise
            raise _no_match(ctx, dict(query)) from None
    loaded = loaded_names(ctx)
    if not loaded:
        raise _no_match(ctx, dict(query))
    return loaded[0]


def param(value: object) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SdkError("this endpoint needs a parameter object")
    return value


# --- RPCs -----------------------------------------------------------------------------


async def list_downloaded(ctx: Ctx, _: object) -> list[dict[str, Any]]:
    scheduler = ctx.app[SCHEDULER]
    names = scheduler.names()
    cfgs = [scheduler.resolve(n) for n in names]
    facts = await ctx.app[MODEL_INFO].many(cfgs)
    return [model_info(n, c, facts[c.name]) for n, c in zip(names, cfgs, strict=True)]


async def list_loaded(ctx: Ctx, _: object) -> list[dict[str, Any]]:
    return [await info_of(ctx, n) for n in loaded_names(ctx)]


async def get_model_info(ctx: Ctx, value: object) -> Any:
    p = param(value)
    try:
        return await info_of(ctx, specified(ctx, p.get("specifier")))
    except SdkError:
        if p.get("throwIfNotFound", True):
            raise
        return VOID


async def get_load_config(ctx: Ctx, value: object) -> dict[str, Any]:
    # JS getContextLength() reads the context length from here (2048 if absent).
    name = specified(ctx, param(value).get("specifier"))
    scheduler = ctx.app[SCHEDULER]
    cfg = scheduler.resolve(name)
    return {"fields": [{"key": f"{ctx.namespace}.load.contextLength",
                        "value": context_length(scheduler, cfg, await facts_of(ctx, cfg))}]}


async def get_base_prediction_config(ctx: Ctx, value: object) -> dict[str, Any]:
    specified(ctx, param(value).get("specifier"))
    return {"fields": []}


async def unload_model(ctx: Ctx, value: object) -> object:
    ident = param(value).get("identifier")
    if not isinstance(ident, str):
        raise SdkError("unloadModel needs an identifier")
    name = lookup(ctx, ident)
    if await ctx.app[SCHEDULER].unload(name) == 0:
        loaded = loaded_names(ctx)
        raise SdkError(f"No loaded model with identifier '{ident}'", "generic.identifierNotFound",
                       identifier=ident, loadedModelsSample=loaded[:10],
                       totalLoadedModels=len(loaded))
    return VOID


async def version(ctx: Ctx, _: object) -> dict[str, Any]:
    return {"version": LMSTUDIO_VERSION, "build": LMSTUDIO_BUILD}


# --- load channels ----------------------------------------------------------------------


def _ttl(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 1:
        return float(value) / 1000.0
    return None


async def _load(ctx: Ctx, chan: Channel, name: str, ttl: float | None, packet: str,
                want_ctx: int = 0) -> bool:
    """Lease ``name`` until an instance (with ``want_ctx`` tokens of context, as far as
    the model can have) is ready; False if the client cancelled."""
    async def lease() -> None:
        async with ctx.app[SCHEDULER].lease(name, LeaseHints(keep_alive=ttl,
                                                             want_ctx=want_ctx)):
            pass

    scheduler = ctx.app[SCHEDULER]

    def progress(waited: float) -> dict[str, object]:
        # llama-server reports no load progress: time against the model's median load
        # time (scheduler/scheduling/loadcost.py), counted from the launch if one runs.
        expected, elapsed = scheduler.load_estimate(name)
        return {"type": packet,
                "progress": loadcost.progress(expected, waited if elapsed is None else elapsed)}

    async with chan.heartbeat(progress):
        _, cancelled = await chan.unless_cancelled(lease())
    return not cancelled


async def get_or_load(ctx: Ctx, chan: Channel, value: object) -> None:
    p = param(value)
    ident = p.get("identifier")
    if not isinstance(ident, str):
        raise SdkError("getOrLoad needs an identifier")
    name = lookup(ctx, ident)
    ttl = _ttl(p.get("loadTtlMs"))
    scheduler = ctx.app[SCHEDULER]
    if ready(scheduler, name):
        if ttl is not None:
            for inst in scheduler.loaded(name):
                inst.ttl_override = ttl
        await chan.send({"type": "alreadyLoaded", "info": await info_of(ctx, name)})
        return
    cfg = scheduler.resolve(name)
    await chan.send({"type": "startLoading", "identifier": name,
                     "info": model_info(name, cfg, await facts_of(ctx, cfg))})
    if not await _load(ctx, chan, name, ttl, "loadProgress"):
        raise SdkError(f"Loading '{name}' was cancelled")
    await chan.send({"type": "loadSuccess", "info": await info_of(ctx, name)})


async def load_model(ctx: Ctx, chan: Channel, value: object) -> None:
    p = param(value)
    key = p.get("modelKey")
    if not isinstance(key, str):
        raise SdkError("loadModel needs a modelKey")
    name = lookup(ctx, key)
    cfg = ctx.app[SCHEDULER].resolve(name)
    await chan.send({"type": "resolved", "info": model_info(name, cfg, await facts_of(ctx, cfg))})
    if not await _load(ctx, chan, name, _ttl(p.get("ttlMs")), "progress", asked_context(p)):
        raise SdkError(f"Loading '{name}' was cancelled")
    await chan.send({"type": "success", "info": await info_of(ctx, name)})
