"""Conversations as chains of prefixes, and what each upstream has served of them.

llama-server reuses the longest common prefix of a prompt and what a slot (or its RAM
prompt cache) holds, so what a call can reuse is a *prefix* of it, not a key. A call's
prompt is cut at its natural boundaries: after the tools and system prompt, after
each message (a raw prompt: every ``BLOCK`` bytes). Its ``Chain`` holds one link per
boundary: a hash of everything up to there, and how many bytes that is (an estimate of
its tokens, about four bytes each). Two calls share a prefix up to a boundary exactly
when their links there are equal, so:

* turn 2 of a chat without a system message, ``[user, assistant, user]``, shares the
  link after ``user`` with turn 1, whatever its key would have been;
* sessions that send the same tools and system prompt share the first link;
* an agent's growing tool transcript shares every link of its previous call.

Each upstream keeps a ``PrefixIndex`` of the links it served (bounded LRU), which
answers "how many bytes of this call does it hold" for the policy; the slot cache
files saved slots by the same links (scheduler/process/slotcache.py).

Pure: no I/O, no clocks. Hashes are 64-bit blake2b, kept as ints (JSON-safe for the
worker frames); a collision costs only a cache miss, never a wrong answer.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable

# (hash of blocks 0..i, their size in bytes), one per boundary, shortest first.
Link = tuple[int, int]
Chain = tuple[Link, ...]

# Bytes of a raw prompt per block: finer costs more links, coarser loses up to a block.
BLOCK = 1024
# Links kept per chain: the first few (tools, system prompt, first turns: what other
# sessions share) and the last ones (what the same conversation's next call shares).
# A 500-message transcript costs no more per call than a 128-message one.
HEAD_LINKS = 8
MAX_LINKS = 128
# A message past this many bytes (an image, a pasted file) is hashed by its first and
# last halves of this and its length: hashing megabytes of base64 per call buys nothing
# a collision would cost (a cache miss).
BIG_PART = 32 << 10
# Matches shorter than this (about 250 tokens) do not steer a call away from a less
# busy upstream: re-processing them costs less than waiting.
MIN_MATCH = 1024
# Links remembered per upstream (its last conversations); about 100 bytes each.
INDEX_LINKS = 8192


def _mask(digest: bytes) -> int:
    # 63 bits: a signed 64-bit int everywhere (msgspec, JSON, llama-server file names).
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


class ChainBuilder:
    """Hashes blocks in order, one link per ``cut()``: each block is hashed once."""

    __slots__ = ("_h", "_links", "_size")

    def __init__(self) -> None:
        self._h = hashlib.blake2b(digest_size=8)
        self._size = 0
        self._links: list[Link] = []

    def add(self, data: bytes | bytearray | memoryview) -> None:
        """Adds bytes to the current block (several parts make one block)."""
        n = len(data)
        if n > 2 * BIG_PART:
            view = memoryview(data)
            self._h.update(view[:BIG_PART])
            self._h.update(view[-BIG_PART:])
            self._h.update(n.to_bytes(8, "big"))
        else:
            self._h.update(data)
        self._size += n

    def cut(self) -> None:
        """Ends a block: the link of everything added so far."""
        if self._size and (not self._links or self._links[-1][1] != self._size):
            self._links.append((_mask(self._h.copy().digest()), self._size))

    def chain(self) -> Chain:
        return capped(self._links)


def capped(links: list[Link] | Chain) -> Chain:
    if len(links) <= MAX_LINKS:
        return tuple(links)
    return (*links[:HEAD_LINKS], *links[len(links) - (MAX_LINKS - HEAD_LINKS):])


def chain_of(blocks: Iterable[bytes | bytearray | memoryview]) -> Chain:
    """The chain of a prompt given as blocks (a leading system part, then messages)."""
    b = ChainBuilder()
    for block in blocks:
        b.add(block)
        b.cut()
    return b.chain()


def prompt_chain(raw: bytes | bytearray | memoryview) -> Chain:
    """The chain of a raw prompt: a link every ``BLOCK`` bytes and one at its end, so
    a prompt that grows by appending shares every whole block with its past."""
    b = ChainBuilder()
    view = memoryview(raw)
    n = len(view)
    for start in range(0, n, BLOCK):
        b.add(view[start:start + BLOCK])
        b.cut()
    return b.chain()


def common(a: Chain, b: Chain) -> int:
    """Bytes of the longest prefix two chains share (0: none)."""
    have = dict(a)
    for h, size in reversed(b):
        if have.get(h) == size:
            return size
    return 0


class PrefixIndex:
    """The links one upstream has served, least recently used dropped first."""

    __slots__ = ("_links", "limit")

    def __init__(self, limit: int = INDEX_LINKS) -> None:
        self._links: OrderedDict[int, int] = OrderedDict()
        self.limit = limit

    def __len__(self) -> int:
        return len(self._links)

    def add(self, chain: Chain) -> None:
        links = self._links
        for h, size in chain:
            links[h] = size
            links.move_to_end(h)
        while len(links) > self.limit:
            links.popitem(last=False)

    def match(self, chain: Chain) -> int:
        """Bytes of the longest prefix of ``chain`` this upstream has served."""
        links = self._links
        for h, size in reversed(chain):
            if links.get(h) == size:
                return size
        return 0


def matches(indexes: dict[str, PrefixIndex], chain: Chain) -> dict[str, int]:
    """Per upstream id, bytes of ``chain`` it holds; upstreams holding none left out."""
    if not chain:
        return {}
    out: dict[str, int] = {}
    for iid, index in indexes.items():
        if n := index.match(chain):
            out[iid] = n
    return out
