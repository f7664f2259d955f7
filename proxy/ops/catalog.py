"""GET /admin/catalog: every model the scheduler knows (configured in the file, or
offered by a dynamic source: a scanned directory, a provider, a pull) with what the
models view shows: source, size, quantization, context, capabilities.

GGUF facts come from the same per-file cache as Ollama's /api/tags (a header read in
a worker thread, remembered per file).
"""

from __future__ import annotations

from aiohttp import web

from proxy.calls.modelinfo import MODEL_INFO, ModelInfoCache, capabilities
from proxy.keys import SCHEDULER
from scheduler.config.root import ModelConfig
from scheduler.engines.remote import shown_url


def source(cfg: ModelConfig, configured: bool) -> dict[str, object]:
    """Where the model's weights come from, as the page labels it."""
    if cfg.path is not None:
        kind, where = "path", str(cfg.path)
    elif cfg.package is not None:
        kind, where = "package", cfg.package
    elif cfg.hf_repo is not None:
        kind, where = "huggingface", f"{cfg.hf_repo}/{cfg.hf_file}"
    elif cfg.runtime is not None:
        kind, where = "runtime", cfg.runtime
    else:
        # Shown URLs only: no user:password (docs/engines.md).
        kind, where = "remote", ", ".join(shown_url(rc.url) for rc in cfg.remote_configs())
    # origin: "config", "scan:<layout>" or "pulled", as Corral set it.
    return {"kind": kind, "where": where, "configured": configured, "origin": cfg.origin}


async def catalog(request: web.Request) -> web.Response:
    scheduler = request.app[SCHEDULER]
    cache = request.app[MODEL_INFO]
    configured = {m.name for m in scheduler.configured.models}
    cfgs = list(scheduler.config.models)
    facts = await cache.many(cfgs)
    states = {str(m["name"]): m for m in scheduler.model_status()}
    out = []
    for cfg in cfgs:
        f = facts[cfg.name]
        st = states.get(cfg.name, {})
        out.append({
            "name": cfg.name,
            "aliases": list(cfg.aliases),
            "source": source(cfg, cfg.name in configured),
            "size_bytes": f.size or None,
            "quantization": f.quantization or None,
            "parameters": f.parameter_size or None,
            "architecture": f.architecture or None,
            "context_length": f.context_length,
            "ctx_size": cfg.ctx_size,
            # Planned by the scheduler once the model's file was read (docs/scheduling.md).
            "context": st.get("context"),
            "max_context": st.get("max_context"),
            "parallel": cfg.parallel,
            "capabilities": capabilities(cfg, f),
            "state": st.get("state"),
            "footprint_bytes": st.get("footprint_bytes"),
            # evictable = false (the scheduling work's key): kept loaded, never evicted.
            "pinned": getattr(cfg, "evictable", True) is False,
        })
    return web.json_response({"models": out})


def add_routes(app: web.Application) -> None:
    if MODEL_INFO not in app:
        app[MODEL_INFO] = ModelInfoCache()
    app.router.add_get("/admin/catalog", catalog)
