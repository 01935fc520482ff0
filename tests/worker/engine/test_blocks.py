"""The KV block pool and prefix index: taking, giving back, sharing, eviction order, chain hashing."""

from __future__ import annotations

import random

import pytest

from worker.engine.blocks import BlockPool, NoRoom, chain_hashes


def test_blocks_are_taken_all_or_none_and_come_back_when_given_back():
    pool = BlockPool(4, 16)
    first = pool.take(3)
    assert len(set(first)) == 3 and pool.available == 1 and pool.held == 3
    with pytest.raises(NoRoom):
        pool.take(2)
    assert pool.available == 1  # a refused take takes nothing
    pool.give_back(first[:2])
    assert pool.available == 3
    again = pool.take(3)
    assert first[2] not in again  # a held block is never handed out


def test_giving_back_a_block_nobody_holds_is_an_error():
    pool = BlockPool(2, 4)
    [block] = pool.take(1)
    pool.give_back([block])
    with pytest.raises(ValueError):
        pool.give_back([block])
    with pytest.raises(ValueError):
        pool.share([block])  # free: nothing in it to share


def test_a_held_block_is_never_handed_out_under_random_use():
    rng = random.Random(7)
    pool = BlockPool(32, 4)
    holders: list[list[int]] = []
    for _ in range(2000):
        if holders and rng.random() < 0.45:
            pool.give_back(holders.pop(rng.randrange(len(holders))))
        elif rng.random() < 0.2 and holders:
            blocks = holders[rng.randrange(len(holders))]
            digest = rng.randbytes(4)
            pool.cache(blocks[0], digest)
        else:
            count = rng.randint(1, 4)
            if count <= pool.available:
                holders.append(pool.take(count))
            else:
                with pytest.raises(NoRoom):
                    pool.take(count)
        counts: dict[int, int] = {}
        for blocks in holders:
            for block in blocks:
                counts[block] = counts.get(block, 0) + 1
        assert all(pool.refs(block) == n for block, n in counts.items())
        assert pool.held == len(counts)


def test_same_chain_same_blocks_and_one_changed_token_ends_reuse_after_it():
    tokens = list(range(100, 140))  # 40 tokens: 2 full blocks of 16, and 8 more
    hashes = chain_hashes(tokens, 16)
    assert len(hashes) == 2 and hashes == chain_hashes(list(tokens), 16)
    changed = list(tokens)
    changed[20] = 7  # inside the second block
    other = chain_hashes(changed, 16)
    assert other[0] == hashes[0] and other[1] != hashes[1]
    changed_first = [999, *tokens[1:]]
    assert all(a != b for a, b in zip(chain_hashes(changed_first, 16), hashes, strict=True))  # a chain, not a block
    # The same block of tokens after a different prefix hashes differently.
    assert chain_hashes(tokens[16:32], 16)[0] != hashes[1]

    pool = BlockPool(8, 16)
    row = pool.take(3)
    for block, digest in zip(row, hashes, strict=False):
        assert pool.cache(block, digest)
    assert pool.match(hashes) == row[:2]
    assert pool.match(other) == row[:1]
    assert pool.match(chain_hashes(changed_first, 16)) == []


def test_reused_blocks_are_shared_and_idle_cached_blocks_are_evicted_least_recently_used_first():
    pool = BlockPool(4, 2)
    a, b = pool.take(1), pool.take(1)
    assert pool.cache(a[0], b"A") and pool.cache(b[0], b"B")
    assert not pool.cache(b[0], b"B2")  # one prefix per block
    pool.give_back(a)
    pool.give_back(b)
    assert pool.cached == 2 and pool.available == 4  # idle cached blocks still count as room
    reuse = pool.match([b"A"])
    pool.share(reuse)  # a new row reuses A: it is no longer idle
    pool.give_back(reuse)  # ... and leaves: A is now the most recently used
    taken = pool.take(3)  # 2 free blocks, then the least recently used idle one: B
    assert b[0] in taken and a[0] not in taken
    assert pool.match([b"B"]) == [] and pool.match([b"A"]) == a and pool.evictions == 1


def test_a_second_block_with_an_already_cached_prefix_is_not_indexed_and_is_freed():
    pool = BlockPool(3, 2)
    first, second = pool.take(1), pool.take(1)
    assert pool.cache(first[0], b"P")
    assert not pool.cache(second[0], b"P")
    pool.give_back(second)
    assert pool.cached == 1 and pool.match([b"P"]) == first
