"""Block manager: exact block ids for allocation, prefix hits, sharing, copy-on-write, eviction."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from llmcore.engine.block_manager import BlockManager


@dataclass
class Seq:
    token_ids: list[int]
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0
    num_computed_tokens: int = 0


def admit(bm: BlockManager, seq: Seq) -> int:
    cached = bm.match_prefix(seq.token_ids)
    assert bm.can_allocate_prompt(len(seq.token_ids), cached)
    n = bm.allocate_prompt(seq, cached)
    seq.num_computed_tokens = n
    bm.ensure_slots(seq, len(seq.token_ids))
    seq.num_computed_tokens = len(seq.token_ids)
    bm.commit_full_blocks(seq, seq.num_computed_tokens)
    return n


def test_allocation_takes_lowest_free_ids_in_order():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = Seq(list(range(10)))  # 3 blocks
    admit(bm, a)
    assert a.block_table == [0, 1, 2]
    b = Seq(list(range(100, 105)))  # 2 blocks
    admit(bm, b)
    assert b.block_table == [3, 4]
    assert bm.num_free_blocks == 3


def test_growth_one_block_at_a_time():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = Seq(list(range(4)))
    admit(bm, s)
    assert s.block_table == [0]
    s.token_ids.append(99)  # 5th token needs a second block
    assert bm.ensure_slots(s, 5) == []
    assert s.block_table == [0, 1]


def test_prefix_hit_shares_full_blocks_and_counts_tokens():
    bm = BlockManager(num_blocks=8, block_size=4)
    system = list(range(8))
    a = Seq(system + [50, 51])
    admit(bm, a)
    assert a.block_table == [0, 1, 2]
    b = Seq(system + [60])
    assert admit(bm, b) == 8  # both full blocks of the shared prefix reused
    assert b.block_table == [0, 1, 3]
    assert bm.blocks[0].ref_count == 2 and bm.blocks[1].ref_count == 2
    st = bm.stats()
    assert st.prefix_hits == 8


def test_last_token_is_never_served_from_cache():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = Seq(list(range(8)))
    admit(bm, a)
    # identical prompt: the second block holds the last token, which must be recomputed
    assert bm.match_prefix(list(range(8))) == [0]


def test_hash_collision_guard_compares_tokens():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = Seq([1, 2, 3])
    admit(bm, a)
    h = bm.blocks[0].hash
    bm.blocks[0].token_ids = (9, 9)  # simulate a colliding hash with other tokens
    assert bm._cached[h] == 0
    assert bm.match_prefix([1, 2, 3]) == []


def test_freed_blocks_are_evicted_lru_tail_first():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = Seq([1, 2, 3, 4, 5, 6, 7])  # blocks 0,1,2 full, 3 partial
    admit(bm, a)
    b = Seq([8, 9, 10])  # blocks 4, 5
    admit(bm, b)
    bm.free(a)  # released tail first: free list order 3, 2, 1, 0
    assert list(bm._free) == [3, 2, 1, 0]
    c = Seq([20, 21, 22])  # needs two fresh blocks: evicts the tail of a first
    admit(bm, c)
    assert c.block_table == [3, 2]
    # a's prefix (blocks 0, 1) survives and is still a hit
    assert bm.match_prefix([1, 2, 3, 4, 99]) == [0, 1]


def test_fork_shares_blocks_and_copy_on_write_on_partial_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = Seq(list(range(6)))  # blocks 0 (full), 1 (2 of 4 slots)
    admit(bm, parent)
    child = Seq(list(parent.token_ids), num_computed_tokens=6)
    bm.fork(parent, child)
    assert child.block_table == [0, 1]
    assert bm.blocks[1].ref_count == 2
    # each sample writes its own 7th token into the shared partial block -> copy
    parent.token_ids.append(7)
    child.token_ids.append(8)
    assert bm.blocks_to_grow(parent, 7) == 1
    assert bm.ensure_slots(parent, 7) == [(1, 2)]
    assert parent.block_table == [0, 2]
    assert bm.ensure_slots(child, 7) == []  # now the only owner of block 1
    assert child.block_table == [0, 1]
    assert bm.blocks[0].ref_count == 2


def test_free_everything_returns_all_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    seqs = [Seq(list(range(i, i + 7))) for i in (0, 100)]
    for s in seqs:
        admit(bm, s)
    for s in seqs:
        bm.free(s)
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_cannot_allocate_beyond_capacity():
    bm = BlockManager(num_blocks=2, block_size=4)
    assert not bm.can_allocate_prompt(9)
    assert bm.can_allocate_prompt(8)


def test_invalid_size():
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=4)
