"""Paged KV blocks: allocation, reference counts, prefix caching by hash-chained full blocks, LRU reuse.

Follows the design of vLLM's automatic prefix caching (Kwon et al. 2023, "Efficient Memory Management for
Large Language Model Serving with PagedAttention"; vLLM v1 KV cache manager):
- a *full* block is identified by ``hash((parent_hash, tokens_of_block))``, so equal hashes mean equal prefixes;
- a freed block keeps its hash and content until it is handed out again (lazy eviction);
- free blocks form one LRU queue: allocation pops the least recently freed block, evicting its hash.

Invariants: a block is in ``_free`` iff its ref count is 0; ``_cached[h] = b`` implies ``blocks[b].hash == h``;
only full blocks whose KV has been computed are hashed, so a hashed block is never written again.
No torch here: the block manager is plain bookkeeping.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from parallel.request import Request


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


class BlockManager:
    """Hands out KV blocks to requests.

    Example:
        >>> from parallel.sampling_params import SamplingParams
        >>> bm = BlockManager(num_blocks=8, block_size=4)
        >>> r = Request("a", list(range(10)), SamplingParams())
        >>> bm.allocate_slots(r, 10), len(r.block_table), bm.num_free_blocks
        (True, 3, 5)
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}
        self._hashes: dict[str, list[int]] = {}  # request id -> hashes of its full, computed blocks
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    # ---- read-only views -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -----------------------------------------------------------------------------------
    def _chain(self, token_ids: list[int], num_blocks: int, start: int = 0, parent: int | None = None):
        bs = self.block_size
        for i in range(start, num_blocks):
            parent = hash((parent, tuple(token_ids[i * bs:(i + 1) * bs])))
            yield parent

    def get_computed_blocks(self, request: Request) -> list[int]:
        """Cached blocks holding the longest known prefix of a request that owns no blocks yet.

        At least one token is always left to compute, because the step needs its logits.
        """
        if not self.enable_prefix_caching or request.params.prompt_logprobs is not None:
            return []  # (prompt logprobs need every prompt position's logits: nothing may be skipped, as vLLM)
        found: list[int] = []
        for h in self._chain(request.all_token_ids, (request.num_tokens - 1) // self.block_size):
            block_id = self._cached.get(h)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def record_prefix_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        """Count one admitted request's lookup (only admitted ones, so retries do not inflate the rate)."""
        if self.enable_prefix_caching:
            self.prefix_queried_tokens += queried_tokens
            self.prefix_hit_tokens += hit_tokens

    def cache_computed_blocks(self, request: Request) -> None:
        """Register the request's full blocks whose KV is now computed, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        hashes = self._hashes.setdefault(request.request_id, [])
        n_full = request.num_computed_tokens // self.block_size
        if n_full <= len(hashes):
            return
        parent = hashes[-1] if hashes else None
        for i, h in enumerate(self._chain(request.all_token_ids, n_full, len(hashes), parent), len(hashes)):
            hashes.append(h)
            block = self._blocks[request.block_table[i]]
            if block.block_hash is None and h not in self._cached:
                block.block_hash = h
                self._cached[h] = block.block_id

    # ---- allocation -------------------------------------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int, computed_blocks: list[int] | None = None) -> bool:
        """Make room for ``num_new_tokens`` more tokens after the computed (and newly found cached) ones.

        Returns False, changing nothing, when the free blocks do not suffice.
        """
        computed_blocks = computed_blocks or []
        total = request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        to_allocate = self.blocks_needed(total) - len(request.block_table) - len(computed_blocks)
        # Cached blocks that sit in the free queue stop being free once we take them.
        revived = sum(1 for b in computed_blocks if self._blocks[b].ref_count == 0)
        if to_allocate > len(self._free) - revived:
            return False
        for b in computed_blocks:
            block = self._blocks[b]
            if block.ref_count == 0:
                del self._free[b]
            block.ref_count += 1
            request.block_table.append(b)
        for _ in range(max(to_allocate, 0)):
            b, _ = self._free.popitem(last=False)
            block = self._blocks[b]
            if block.block_hash is not None:  # evict the least recently used cached block
                if self._cached.get(block.block_hash) == b:
                    del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            request.block_table.append(b)
        return True

    def free(self, request: Request) -> None:
        """Release the request's blocks. Tail blocks go to the queue first, so they are evicted first."""
        for b in reversed(request.block_table):
            block = self._blocks[b]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[b] = None
        request.block_table = []
        self._hashes.pop(request.request_id, None)

    def reset_prefix_cache(self) -> None:
        for h, b in list(self._cached.items()):
            if self._blocks[b].ref_count == 0:
                self._blocks[b].block_hash = None
                del self._cached[h]
