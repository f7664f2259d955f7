"""What the scheduler asks of engines, in one place: small functions called from
``scheduler.py`` so that its sections stay about scheduling."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from scheduler.config.root import CorralConfig, ModelConfig
from scheduler.engines.remote import Remote, shown_url
from scheduler.engines.runtime import build_runtime_spec, with_runtime
from scheduler.engines.settings import RemoteConfig, env_key
from scheduler.engines.templates import Runtime, resolve_runtime
from scheduler.errors import RemotesDown
from scheduler.process.instance import LaunchSpec

# (table, slots, key as read now) per remote of a model.
Wanted = list[tuple[RemoteConfig, int, str | None]]


def runtime_of(cfg: CorralConfig, model: ModelConfig) -> Runtime:
    return resolve_runtime(model.runtime, cfg.runtimes)


def runtime_spec(cfg: CorralConfig, model: ModelConfig, runtime: Runtime,
                 model_file: Path | None) -> LaunchSpec:
    return build_runtime_spec(cfg, model, runtime, model_file)


def llama_server_spec(spec: LaunchSpec, cfg: CorralConfig, model: ModelConfig,
                      runtime: Runtime) -> LaunchSpec:
    return with_runtime(spec, cfg, model, runtime)


def runtime_changed(old: CorralConfig, new: CorralConfig, model: ModelConfig) -> bool:
    """Whether the ``[runtimes.NAME]`` table a model runs under changed: its
    instances restart like those of a changed model."""
    if model.runtime is None or old.runtimes is new.runtimes:
        return False
    return old.runtimes.get(model.runtime) != new.runtimes.get(model.runtime)


def wanted_remotes(model: ModelConfig) -> Wanted:
    return [(rc, rc.slots or model.remote_slots, env_key(rc)) for rc in model.remote_configs()]


def same_remotes(have: Sequence[Remote], wanted: Wanted) -> bool:
    return len(have) == len(wanted) and all(
        r.config == rc and r.slots == slots and r.key == key
        for r, (rc, slots, key) in zip(have, wanted, strict=True)
    )


def remote_id(model: str, rc: RemoteConfig) -> str:
    return f"{model}@{shown_url(rc.url)}"


def remotes_down(model: str, remotes: Sequence[Remote]) -> RemotesDown:
    """What a caller is told: how many and when to retry, never which addresses (a
    cluster front's nodes, a provider's URL) or why; each remote's failure is logged
    as it happens and shown in /admin/models."""
    retry = min(r.retry_after() for r in remotes)
    return RemotesDown(
        f"model '{model}': no remote upstream answers ({len(remotes)} out of rotation); "
        f"try again in {retry:.0f} s", retry_after=retry,
    )



def with_provider_changes(
    report: dict[str, list[str]], before: set[str], after: list[str]
) -> dict[str, list[str]]:
    """A reload's report once its providers have listed: models a provider no longer
    offers are removed, models it newly offers are added."""
    final = set(after)
    out = {k: [n for n in v if n in final] for k, v in report.items()}
    out["removed"] = sorted({*report.get("removed", ()), *(before - final)})
    seen = {n for k, v in out.items() if k != "removed" for n in v}
    out.setdefault("added", []).extend(n for n in after if n not in seen)
    return out
