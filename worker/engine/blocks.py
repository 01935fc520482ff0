"""The KV block pool and its prefix index: fixed-size blocks of key/value slots, handed to rows as they grow.

Every row of the running batch owns a *block table*: the ids of the blocks holding its keys and values, in
order (token ``p`` of the row lives in block ``table[p // block_size]`` at offset ``p % block_size``). A row
takes a block when it needs room for its next token and gives its blocks back when it ends; nothing of
another row is copied when a row joins or leaves, and admission counts the blocks a row really needs.

Full blocks are also *cached* under the hash of their tokens chained with the hash of every block before
them (so a hash names the whole prefix, not just one block's tokens). BLOOM's ALiBi bias depends only on a
key's position, never on what follows it, so a block computed for one prompt holds exactly the keys and
values any prompt starting with the same tokens would compute: a new row reuses the longest cached chain
and computes only the rest. A cached block nobody uses stays in the index until the pool needs room, then
the least recently used one is taken first.

Pure bookkeeping (no tensors): the storage itself is ``worker.engine.paged.PagedKV``.
"""

from __future__ import annotations

import collections
import hashlib
from array import array
from collections.abc import Iterable, Sequence


class NoRoom(RuntimeError):
    """More blocks were asked for than are free or evictable."""


def chain_hashes(tokens: Sequence[int], block_size: int, parent: bytes = b"") -> list[bytes]:
    """The chain hash of each *full* block of ``tokens``: block ``i``'s hash covers its own tokens and,
    through ``parent`` and the hashes before it, every token before them. A partial last block has none."""
    hashes = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        digest = hashlib.blake2b(parent, digest_size=16)
        digest.update(array("q", tokens[start : start + block_size]).tobytes())
        parent = digest.digest()
        hashes.append(parent)
    return hashes


class BlockPool:
    """``num_blocks`` blocks of ``block_size`` slots: who holds each, and which full blocks are cached.

    A block is in exactly one of three states: *free* (no holder, no cached content), *held* (one or more
    rows hold it: ``refs > 0``; it may also be cached), or *idle cached* (no holder, content kept in the
    prefix index, evictable, oldest use first).
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a block pool needs at least one block of one slot (got {num_blocks}×{block_size})")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A stack: the block given back last is taken first (warm in caches; on the CPU, the pages of blocks
        # never used are never touched, so the process grows only as far as the load needs).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}  # cached block -> its chain hash
        self._by_hash: dict[bytes, int] = {}  # chain hash -> the block holding that prefix
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # idle cached, oldest first
        self.evictions = 0

    # -- what is there -----------------------------------------------------------------------------

    @property
    def available(self) -> int:
        """Blocks that ``take`` can hand out now: free ones and idle cached ones (evicted on the way)."""
        return len(self._free) + len(self._idle)

    @property
    def held(self) -> int:
        """Blocks some row holds."""
        return self.num_blocks - self.available

    @property
    def cached(self) -> int:
        """Blocks whose content is in the prefix index (held or idle)."""
        return len(self._hash_of)

    def refs(self, block: int) -> int:
        """How many rows hold ``block``."""
        return self._refs[block]

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold ``tokens`` slots."""
        return -(-tokens // self.block_size)

    # -- taking and giving back --------------------------------------------------------------------

    def take(self, count: int) -> list[int]:
        """``count`` blocks for one holder, free ones first, then the least recently used idle cached ones
        (forgotten by the index). All or none: ``NoRoom`` when there are not enough."""
        if count > self.available:
            raise NoRoom(f"{count} KV blocks asked for, {self.available} of {self.num_blocks} available")
        taken = []
        for _ in range(count):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._idle.popitem(last=False)
                del self._by_hash[self._hash_of.pop(block)]
                self.evictions += 1
            self._refs[block] = 1
            taken.append(block)
        return taken

    def share(self, blocks: Iterable[int]) -> None:
        """One more holder for each of ``blocks`` (cached blocks a new row reuses)."""
        for block in blocks:
            if self._refs[block] == 0:
                if block not in self._idle:
                    raise ValueError(f"block {block} is free: there is nothing in it to share")
                del self._idle[block]
            self._refs[block] += 1

    def give_back(self, blocks: Iterable[int]) -> None:
        """One holder fewer for each of ``blocks``; a block nobody holds becomes free, or idle if cached
        (then it is the most recently used)."""
        for block in blocks:
            if self._refs[block] <= 0:
                raise ValueError(f"block {block} is given back but nobody holds it")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._idle[block] = None
                else:
                    self._free.append(block)

    def discard(self, blocks: Iterable[int]) -> list[int]:
        """Of ``blocks`` (a failed row's), those nobody else holds, dropped from the prefix index: what they
        hold is not to be read again (the caller clears them, then gives them back, and they come back free)."""
        alone = [block for block in blocks if self._refs[block] == 1]
        for block in alone:
            digest = self._hash_of.pop(block, None)
            if digest is not None:
                del self._by_hash[digest]
        return alone

    # -- the prefix index --------------------------------------------------------------------------

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest chain ``hashes`` starts with (their ids, in order)."""
        found = []
        for digest in hashes:
            block = self._by_hash.get(digest)
            if block is None:
                break
            found.append(block)
        return found

    def cache(self, block: int, digest: bytes) -> bool:
        """Index a held, now full ``block`` under ``digest``; False when another block already holds that
        prefix (then this one stays unindexed and is freed when given back)."""
        if self._refs[block] <= 0:
            raise ValueError(f"block {block} is not held: only a holder can say what is in it")
        if digest in self._by_hash or block in self._hash_of:
            return False
        self._by_hash[digest] = block
        self._hash_of[block] = digest
        return True
