from __future__ import annotations

from parallel.block_manager import BlockManager
from parallel.request import Request
from parallel.sampling_params import SamplingParams


def _req(rid: str, n: int, start: int = 0) -> Request:
    return Request(rid, list(range(start, start + n)), SamplingParams())


def test_allocate_and_free_counts_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    r = _req("a", 10)
    assert bm.allocate_slots(r, 10)
    assert len(r.block_table) == 3 and bm.num_used_blocks == 3
    r.num_computed_tokens = 10
    assert bm.allocate_slots(r, 2)  # 12 tokens still fit in 3 blocks
    assert len(r.block_table) == 3
    assert bm.allocate_slots(r, 3)
    assert len(r.block_table) == 4
    bm.free(r)
    assert bm.num_used_blocks == 0 and r.block_table == []


def test_allocation_fails_without_side_effects():
    bm = BlockManager(num_blocks=2, block_size=4)
    r = _req("a", 12)
    assert not bm.allocate_slots(r, 12)
    assert r.block_table == [] and bm.num_free_blocks == 2


def test_prefix_blocks_are_shared_and_survive_free_until_evicted():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = _req("a", 10)
    assert bm.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    bm.cache_computed_blocks(a)  # 2 full blocks hashed
    b = _req("b", 11)
    hit = bm.get_computed_blocks(b)
    assert hit == a.block_table[:2]
    assert bm.allocate_slots(b, 3, hit)
    assert b.block_table[:2] == a.block_table[:2] and bm.num_used_blocks == 4
    bm.free(a)
    bm.free(b)
    c = _req("c", 9)
    assert bm.get_computed_blocks(c) == hit  # still cached after both freed
    # Exhaust the pool: the LRU order evicts tail blocks first, then the cached prefix.
    d = _req("d", 24, start=100)
    assert bm.allocate_slots(d, 24)
    assert bm.get_computed_blocks(c) == []


def test_at_least_one_token_is_left_to_compute():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = _req("a", 8)
    bm.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    bm.cache_computed_blocks(a)
    same = _req("b", 8)
    assert len(bm.get_computed_blocks(same)) == 1  # the full 8 are cached, but the last block is recomputed


def test_different_prefixes_do_not_collide():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _req("a", 9)
    bm.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    bm.cache_computed_blocks(a)
    other = Request("b", [0, 1, 2, 3, 99, 5, 6, 7, 8], SamplingParams())
    assert bm.get_computed_blocks(other) == a.block_table[:1]
