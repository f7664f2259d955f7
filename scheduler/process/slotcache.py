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
* a call with a chain of prefixes (scheduler/scheduling/prefixes.py) is given a slot
  of its instance by Corral, not by llama-server: the free slot holding the longest
  prefix of the call (``id_slot`` in the body), so Corral knows exactly which
  conversation each slot holds, with any ``parallel``;
* before an instance that is stopped for a reason in ``SAVE_REASONS`` terminates
  (it has drained: no call runs), each slot that holds tokens is saved on its own
  (``POST /slots/{id}?action=save``) as ``<hash of its chain's last link>.bin``,
  beside a ``.chain`` file listing its links; a saved file whose whole chain is a
  prefix of the new one is deleted (the new one holds it all);
* a slot whose conversation a call would cut short (it keeps what they share, a
  system prompt or nothing, and drops the rest) is saved the same way before the call
  is sent: llama-server's RAM prompt cache keeps nothing a restore overwrites or a
  stop ends;
* saved slots are indexed by their links: when a call's slot holds less of it than a
  saved file, ``action=restore`` loads the file with the longest prefix of the call
  into that slot before the call is sent, another session's included (a shared
  system prompt), and llama-server re-processes only the rest (``timings.cache_n``);
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
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp

from scheduler.config.root import CorralConfig, ModelConfig
from scheduler.process.instance import Instance, LaunchSpec
from scheduler.scheduling.prefixes import Chain

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
# Bytes of prompt (about 64 tokens) a restore must add to what the call's slot holds
# to be worth reading a file that holds the whole saved slot.
MIN_GAIN = 256
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


def file_of(chain: Chain) -> str:
    """The file a slot holding ``chain`` is saved as: its last link's hash in hex."""
    return f"{chain[-1][0]:016x}.bin"


def save_dir(inst: Instance) -> Path | None:
    """The directory an instance was launched with (None: launched without one)."""
    argv = list(inst.spec.argv) if inst.spec is not None else []
    for flag, value in itertools.pairwise(argv):
        if flag == FLAG:
            return Path(value)
    return None


class Held:
    """Which conversation each slot of one instance holds, and which slots a call runs
    in now. Corral assigns every slot (``id_slot``), so this is exact."""

    __slots__ = ("_clock", "busy", "chains", "filled", "used")

    def __init__(self, slots: int) -> None:
        self.chains: list[Chain] = [()] * slots
        self.busy = [False] * slots
        self.used = [0] * slots
        self._clock = 0
        # Slots from this index on were never assigned (empty, free, never used): of
        # them only the first can win, so a call looks at the slots in use and that one
        # instead of every slot (64 in the benchmark's model, on every call).
        self.filled = 0

    def assign(self, chain: Chain) -> tuple[int, int, Chain] | None:
        """(slot, bytes of ``chain`` it already holds, the chain it held) for a call,
        marked busy. Among
        free slots: one whose conversation the call continues; else a fresh one (a
        new conversation does not push another out of its slot for a shared system
        prompt: the restore or the prompt cache gives that back); else the one that
        holds the longest prefix, the least recently used first. None when every slot
        is busy (a call without a chain took one)."""
        # common(held, chain) per slot, with the call's links hashed once.
        links = dict(chain)
        busy, used, chains = self.busy, self.used, self.chains
        best: tuple[int, int, int, int] | None = None
        for k in range(self.filled):
            if busy[k]:
                continue
            held = chains[k]
            if not held:
                rank = (1, 0, -used[k], -k)
            else:
                n = 0
                for h, size in reversed(held):
                    if links.get(h) == size:
                        n = size
                        break
                rank = (2 if n == held[-1][1] else 0, n, -used[k], -k)
            if best is None or rank > best:
                best = rank
        if self.filled < len(chains):
            rank = (1, 0, 0, -self.filled)
            if best is None or rank > best:
                best = rank
        if best is None:
            return None
        slot = -best[3]
        displaced = chains[slot]
        self._clock += 1
        busy[slot] = True
        chains[slot] = chain
        used[slot] = self._clock
        self.filled = max(self.filled, slot + 1)
        return slot, best[1], displaced

    def release(self, slot: int) -> None:
        if 0 <= slot < len(self.busy):
            self.busy[slot] = False


class SavedIndex:
    """The saved slots of one directory by the links of their chains: link hash ->
    (bytes, file name), the most recently saved file winning a shared link."""

    __slots__ = ("_links",)

    def __init__(self) -> None:
        self._links: dict[int, tuple[int, str]] = {}

    def add(self, chain: Chain, name: str) -> None:
        for h, size in chain:
            self._links[h] = (size, name)

    def drop(self, name: str) -> None:
        for h in [h for h, (_, n) in self._links.items() if n == name]:
            del self._links[h]

    def longest(self, chain: Chain) -> tuple[int, str | None]:
        """(bytes, file) of the saved slot holding the longest prefix of ``chain``."""
        for h, size in reversed(chain):
            got = self._links.get(h)
            if got is not None and got[0] == size:
                return got
        return 0, None


def load_index(where: Path) -> SavedIndex:
    """Blocking: the index of a directory's saved slots, from their ``.chain`` files
    (a slot file without one, or a malformed one, is left out)."""
    index = SavedIndex()
    try:
        files = sorted(where.glob("*.chain"), key=_mtime)
    except FileNotFoundError:
        # Not made yet, or removed meanwhile (a model's old slots are dropped when its
        # config changes): nothing saved.
        return index
    for f in files:
        try:
            links = json.loads(f.read_text())
            chain = tuple((int(h), int(n)) for h, n in links)
        except (OSError, ValueError, TypeError):
            continue
        if chain and (where / file_of(chain)).exists():
            index.add(chain, file_of(chain))
    return index


def _mtime(f: Path) -> float:
    try:
        return f.stat().st_mtime
    except OSError:
        return 0.0


def _write_chain(where: Path, chain: Chain, subsumed: list[str]) -> None:
    """Blocking: the ``.chain`` file beside a saved slot; the files it subsumes go."""
    (where / file_of(chain)).with_suffix(".chain").write_text(json.dumps(chain))
    for name in subsumed:
        _unlink(where / name)


def _unlink(slot: Path) -> None:
    for f in (slot, slot.with_suffix(".chain")):
        with contextlib.suppress(OSError):
            f.unlink()


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
        _unlink(f)
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
        # Instance id -> what its slots hold (exact: Corral assigns them).
        self._held: dict[str, Held] = {}
        # Slot directory -> its saved slots by link, loaded on first use.
        self._indexes: dict[Path, SavedIndex] = {}
        # Counts, for /admin and tests.
        self.saved = 0
        self.restored = 0
        self.failed = 0
        # Told (model, seconds) of each restore: part of what having a model back costs
        # (scheduler/scheduling/loadcost.py). Called on the event loop; must not raise.
        self.on_restore: Callable[[str, float], None] | None = None

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

    def assign(self, inst: Instance, chain: Chain) -> tuple[int, int, Chain] | None:
        """The slot a call of ``chain`` runs in on ``inst`` (sent as ``id_slot``), the
        bytes of the call it holds, and the chain it held; ``release`` it after."""
        held = self._held.get(inst.id)
        if held is None:
            held = self._held[inst.id] = Held(inst.slots)
        return held.assign(chain)

    def release(self, inst: Instance, slot: int) -> None:
        held = self._held.get(inst.id)
        if held is not None:
            held.release(slot)

    async def prepare(self, inst: Instance, slot: int, chain: Chain, have: int,
                      displaced: Chain) -> None:
        """Before a call of ``chain`` is sent to ``slot`` of ``inst``, which holds
        ``have`` bytes of it and the conversation ``displaced``:

        * save ``displaced`` first when the call would cut it short (by ``MIN_GAIN``
          or more), whatever the call shares with it: llama-server keeps only the
          shared part, so without this an agent whose replica served another agent in
          between, or one of three chats on two slots, re-processes its whole
          transcript;
        * then restore the saved slot holding the longest prefix of the call, if it
          holds ``MIN_GAIN`` more than the slot does (another session's too)."""
        # ``have`` is what the call shares with ``displaced``: llama-server keeps that
        # and drops the rest. Its RAM prompt cache, which takes a slot it keeps less
        # than half of, is no substitute: a restore into the slot overwrites it before
        # llama-server sees the call, and it dies with the process.
        cut = displaced[-1][1] - have if displaced else 0
        if cut < MIN_GAIN and (not chain or chain[-1][1] < have + MIN_GAIN):
            return  # nothing to save, and no saved slot can hold MIN_GAIN more of it
        where = save_dir(inst)
        if where is None:
            return
        index = await self._index(where)
        if (cut >= MIN_GAIN
                and await self._save_one(inst, where, index, slot, displaced)):
            self.saved += 1
            await self._bound()
        size, name = index.longest(chain)
        if name is None or size < have + MIN_GAIN:
            return
        if not await asyncio.to_thread(_touch, where / name):
            index.drop(name)
            return
        started = time.monotonic()
        if await self._action(inst, slot, "restore", name):
            self.restored += 1
            if self.on_restore is not None:
                self.on_restore(inst.model, time.monotonic() - started)
            log.info("instance %s: restored %s (%d bytes of the prompt) into slot %d",
                     inst.id, name, size, slot)

    async def save(self, inst: Instance) -> None:
        """Save each slot that holds a conversation, on its own (the instance has
        drained)."""
        held = self._held.get(inst.id)
        where = save_dir(inst)
        if held is None or where is None or not inst.base_url or not any(held.chains):
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
        filled = {s["id"] for s in slots if isinstance(s, dict) and isinstance(s.get("id"), int)
                  and int(s.get("n_prompt_tokens") or 0) > 0} if isinstance(slots, list) else set()
        index = await self._index(where)
        started = time.monotonic()
        done = 0
        for slot, chain in enumerate(held.chains):
            if chain and slot in filled and await self._save_one(inst, where, index, slot,
                                                                  chain):
                done += 1
        self.saved += done
        if done:
            # The stop waits for this: the figure tells what the cache adds to a swap.
            log.info("instance %s: saved %d slot(s) in %.0f ms", inst.id, done,
                     (time.monotonic() - started) * 1e3)
            await self._bound()

    async def _save_one(self, inst: Instance, where: Path, index: SavedIndex, slot: int,
                        chain: Chain) -> bool:
        """Saves ``slot``, which holds ``chain``, and files it in the index."""
        name = file_of(chain)
        if not await self._action(inst, slot, "save", name):
            return False
        # Older saves of this conversation (its earlier turns) are all in this one.
        subsumed = [n for h, _ in chain[:-1] if (n := f"{h:016x}.bin") != name]
        try:
            await asyncio.to_thread(_write_chain, where, chain, subsumed)
        except OSError as e:
            log.info("instance %s: cannot index saved slot %s: %s", inst.id, name, e)
            return False
        for n in subsumed:
            index.drop(n)
        index.add(chain, name)
        return True

    async def _bound(self) -> None:
        gone = await asyncio.to_thread(
            enforce_bound, self.root, self._cfg.scheduler.slot_cache_size)
        if gone:
            log.info("slot cache: dropped %d least recently used file(s)", len(gone))
            self._indexes.clear()  # rebuilt from what is left, on next use

    def forget(self, instance_id: str) -> None:
        self._held.pop(instance_id, None)

    async def _index(self, where: Path) -> SavedIndex:
        index = self._indexes.get(where)
        if index is None:
            index = await asyncio.to_thread(load_index, where)
            self._indexes.setdefault(where, index)
        return self._indexes[where]

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
