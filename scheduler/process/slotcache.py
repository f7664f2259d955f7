"""Prompt caches that survive swaps: llama-server slots saved before an idle stop and
restored on the next launch of the same model and config.

Without this, a conversation whose model was swapped out (TTL, eviction, preemption,
unload) is re-processed from its first token on its next call: seconds of prompt
processing for a long chat on a CPU. With it:

* every local instance is launched with ``--slot-save-path`` (and ``--swa-full``,
  without which a sliding-window model re-processes a restored slot) set to a directory of
  its own model *and config* (``<name>.<hash>~<config digest>``): a config change
  or a new model file means a new directory, and the old one is deleted at the
  next launch of that model, since its slots would not fit the new context;
* each instance remembers the conversations it served, by the prefix hash that
  affinity computes (``LeaseHints.affinity``), newest last;
* before an instance that is stopped for a reason in ``SAVE_REASONS`` terminates
  (it has drained: no call runs), ``GET /slots`` tells which slots hold tokens, and
  each is saved with ``POST /slots/{id}?action=save`` as ``<prefix hash>.bin``.
  With one slot (``parallel = 1``, the default) the pairing of slot and
  conversation is exact; with more, slots are paired with conversations by recency
  (llama-server's task ids), a best effort: a wrong pairing costs only the cache;
* when a call whose prefix hash has a file is leased a fresh slot of a new
  instance, ``action=restore`` loads it into that slot before the call is sent, and
  llama-server's own prefix matching then reuses it (``timings.cache_n``);
* the directory tree is bounded by ``slot_cache_size``: least recently used files
  (a restore touches its file) are deleted after every save.

Failures only cost the cache: every error of a save or a restore is logged and
swallowed, with short time limits; file system work runs in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp

from scheduler.config.root import CorralConfig, ModelConfig
from scheduler.process.instance import Instance, LaunchSpec

log = logging.getLogger(__name__)

FLAG = "--slot-save-path"
# Sliding-window-attention models (Gemma 2/3, ...) keep only the window's KV cache,
# and llama-server re-processes a restored prompt from its first token unless the
# SWA cache is full size: measured on Gemma 3 270M, a restored 509-token slot gave
# cache_n 0 without this flag and 509 with it. It costs KV memory on SWA models
# only (llama-server ignores it elsewhere); ``slot_cache = false`` turns both off.
SWA_FULL = "--swa-full"
# Stops after which the same model and config may come back: worth saving for.
SAVE_REASONS = frozenset({"idle", "evicted", "preempted", "unload", "reload"})
# Seconds one save or restore may take (a 2,000-token slot of a small model takes
# milliseconds; a large model's can take a second or two).
ACTION_TIMEOUT = 30.0
_HEX = re.compile(r"^[0-9a-f]{8,64}$")
# Conversations remembered per instance: past this many, the oldest are forgotten
# (an instance with that many behind it has no fresh slot left to restore into).
_SERVED_ENTRIES = 1024
# Keys of a model's config that change what a saved slot means or whether it fits.
_LAUNCH_KEYS = frozenset({
    "path", "package", "hf_repo", "hf_file", "hf_revision", "ctx_size", "parallel",
    "n_gpu_layers", "args", "embedding", "rerank", "chat_template", "mmproj", "lora",
})


def config_digest(cfg: CorralConfig, model: ModelConfig, model_file: Path | None) -> str:
    """What a saved slot depends on: the launch flags, llama-server, the model file
    (its size and modification time: a replaced file is another model). Blocking
    (stat): call off the loop."""
    parts: dict[str, Any] = {
        "model": model.model_dump(mode="json", include=set(_LAUNCH_KEYS)),
        "llama_server": {"binary": str(cfg.llama_server.binary),
                         "args": list(cfg.llama_server.args)},
    }
    if model_file is not None:
        with contextlib.suppress(OSError):
            st = model_file.stat()
            parts["file"] = [str(model_file), st.st_size, st.st_mtime_ns]
    blob = json.dumps(parts, sort_keys=True).encode()
    return hashlib.blake2b(blob, digest_size=8).hexdigest()


def model_prefix(name: str) -> str:
    """A directory-name prefix unique to a model name (names may hold '/' and ':')."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:40]
    return f"{safe}.{hashlib.blake2b(name.encode(), digest_size=4).hexdigest()}~"


def slot_file(affinity: str) -> str | None:
    """The file name for a conversation's prefix hash; None for anything that is not
    a plain hex digest (llama-server refuses path separators; so do we)."""
    return f"{affinity}.bin" if _HEX.match(affinity) else None


def save_dir(inst: Instance) -> Path | None:
    """The directory an instance was launched with (None: launched without one)."""
    argv = list(inst.spec.argv) if inst.spec is not None else []
    for flag, value in itertools.pairwise(argv):
        if flag == FLAG:
            return Path(value)
    return None


def pair_slots(slots: Iterable[dict[str, Any]], recent: list[str]) -> list[tuple[int, str]]:
    """Pure: (slot id, prefix hash) to save. Slots holding tokens, latest task first,
    paired with the conversations served, newest first."""
    held = [s for s in slots if isinstance(s, dict) and isinstance(s.get("id"), int)
            and int(s.get("n_prompt_tokens") or 0) > 0]
    held.sort(key=lambda s: int(s.get("id_task") or -1), reverse=True)
    return [(int(s["id"]), key) for s, key in zip(held, reversed(recent), strict=False)]


def enforce_bound(root: Path, limit: int) -> list[Path]:
    """Delete the least recently used slot files until the tree holds at most
    ``limit`` bytes. Blocking: call off the loop. Returns what was deleted."""
    files: list[tuple[float, int, Path]] = []
    for f in root.glob("*/*.bin"):
        with contextlib.suppress(OSError):
            st = f.stat()
            files.append((st.st_mtime, st.st_size, f))
    total = sum(size for _, size, _ in files)
    gone = []
    for _, size, f in sorted(files):
        if total <= limit:
            break
        with contextlib.suppress(OSError):
            f.unlink()
            gone.append(f)
            total -= size
    return gone


def _prepare_dir(root: Path, prefix: str, digest: str) -> Path:
    """Blocking: make the model's directory for this config, delete its others."""
    target = root / f"{prefix}{digest}"
    target.mkdir(parents=True, exist_ok=True)
    for other in root.glob(f"{glob_escape(prefix)}*"):
        if other != target and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)
    return target


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


class SlotCache:
    """Saves and restores slots; one per scheduler. See the module docstring."""

    def __init__(self, cfg: CorralConfig, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._cfg = cfg
        # Instance id -> prefix hashes of the conversations it served, newest last.
        self._served: dict[str, OrderedDict[str, None]] = {}
        # Counts, for /admin and tests.
        self.saved = 0
        self.restored = 0
        self.failed = 0

    def configure(self, cfg: CorralConfig) -> None:
        self._cfg = cfg

    @property
    def root(self) -> Path:
        configured = self._cfg.scheduler.slot_cache_dir
        if configured is not None:
            return configured
        from scheduler.installing.install import corral_cache_dir

        return corral_cache_dir() / "slots"

    def enabled(self, model: ModelConfig) -> bool:
        return self._cfg.scheduler.slot_cache_size > 0 and model.slot_cache and model.local

    async def launch_spec(
        self, spec: LaunchSpec, model: ModelConfig, model_file: Path | None
    ) -> LaunchSpec:
        """``spec`` with ``--slot-save-path`` added, its directory made; ``spec``
        unchanged when the cache is off or the directory cannot be made."""
        if not self.enabled(model):
            return spec
        try:
            digest = await asyncio.to_thread(config_digest, self._cfg, model, model_file)
            where = await asyncio.to_thread(
                _prepare_dir, self.root, model_prefix(model.name), digest)
        except OSError as e:
            log.warning("slot cache off for %s: %s", model.name, e)
            return spec
        extra = [FLAG, str(where)] + ([] if SWA_FULL in spec.argv else [SWA_FULL])
        return replace(spec, argv=[*spec.argv, *extra])

    async def drop_models(self, names: Iterable[str]) -> None:
        """Delete the saved slots of models that are gone or whose config changed."""
        root = self.root

        def drop() -> None:
            for name in names:
                for d in root.glob(f"{glob_escape(model_prefix(name))}*"):
                    shutil.rmtree(d, ignore_errors=True)

        await asyncio.to_thread(drop)

    # -- per call ----------------------------------------------------------------------

    async def restore(self, inst: Instance, affinity: str) -> bool:
        """Before a call of conversation ``affinity`` is sent to ``inst``: restore its
        saved slot if the instance has not seen it and still has a fresh slot."""
        served = self._served.setdefault(inst.id, OrderedDict())
        if affinity in served:
            served.move_to_end(affinity)
            return False
        fresh = len(served) < inst.slots
        slot = len(served)
        # Noted before any await: a second call of the same conversation arriving
        # meanwhile must not restore it again into another slot.
        served[affinity] = None
        if len(served) > _SERVED_ENTRIES:
            served.popitem(last=False)
        name = slot_file(affinity)
        where = save_dir(inst)
        if not fresh or name is None or where is None:
            return False
        path = where / name
        if not await asyncio.to_thread(_touch, path):
            return False
        ok = await self._action(inst, slot, "restore", name)
        if ok:
            self.restored += 1
            log.info("instance %s: restored conversation %s into slot %d", inst.id,
                     affinity, slot)
        return ok

    async def save(self, inst: Instance) -> None:
        """Save the slots that hold conversations (the instance has drained)."""
        recent = list(self._served.get(inst.id, ()))
        where = save_dir(inst)
        if not recent or where is None or not inst.base_url:
            return
        try:
            async with self._session.get(
                inst.base_url + "/slots", timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
                slots = await resp.json(content_type=None) if resp.status == 200 else []
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            self.failed += 1
            log.info("instance %s: cannot list slots to save them: %s", inst.id, e)
            return
        pairs = pair_slots(slots if isinstance(slots, list) else [], recent)
        started = time.monotonic()
        done = 0
        for slot, affinity in pairs:
            name = slot_file(affinity)
            if name is not None and await self._action(inst, slot, "save", name):
                done += 1
        self.saved += done
        if done:
            # The stop waits for this: the figure tells what the cache adds to a swap.
            log.info("instance %s: saved %d conversation slot(s) in %.0f ms", inst.id, done,
                     (time.monotonic() - started) * 1e3)
        if pairs:
            gone = await asyncio.to_thread(
                enforce_bound, self.root, self._cfg.scheduler.slot_cache_size)
            if gone:
                log.info("slot cache: dropped %d least recently used file(s)", len(gone))

    def forget(self, instance_id: str) -> None:
        self._served.pop(instance_id, None)

    async def _action(self, inst: Instance, slot: int, action: str, name: str) -> bool:
        url = f"{inst.base_url}/slots/{slot}?action={action}"
        try:
            async with self._session.post(
                url, json={"filename": name},
                timeout=aiohttp.ClientTimeout(total=ACTION_TIMEOUT),
            ) as resp:
                if resp.status == 200:
                    return True
                detail = (await resp.text())[:200]
        except (aiohttp.ClientError, TimeoutError) as e:
            detail = str(e) or type(e).__name__
        self.failed += 1
        log.info("instance %s: slot %d %s of %s failed (only the cache is lost): %s",
                 inst.id, slot, action, name, detail)
        return False


def _touch(path: Path) -> bool:
    """Blocking: whether the file exists; marks it recently used (LRU by mtime)."""
    try:
        os.utime(path)
    except OSError:
        return False
    return True
