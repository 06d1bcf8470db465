"""Paged attention over a block-structured KV cache (Kwon et al. 2023, PagedAttention).

The cache of one layer is two tensors ``[num_blocks * block_size, num_kv_heads, head_dim]``; token t of a
request lives at slot ``block_table[t // block_size] * block_size + t % block_size``. Each step first writes the
new tokens' k/v at their slots, then gathers each request's context block by block (whole contiguous blocks,
not token by token: B x W copies of block_size rows instead of B x L single rows) and attends, the causal mask
hiding the tail of the last block:
- requests with few new tokens (decode, or a handful of speculative ones) in one padded, masked batch;
- requests with many new tokens (prefill chunks) one at a time, reading their earlier context from the cache.
Grouped-query attention is native (``enable_gqa``): the cache holds only the KV heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SMALL_QUERY = 8  # requests with at most this many new tokens go to the batched path


@dataclass(frozen=True)
class PrefillSeq:
    """One request's long chunk: flat token range, and its context's blocks (None: no earlier context)."""

    start: int
    end: int
    block_table: torch.Tensor | None  # [W]
    mask: torch.Tensor | None  # [q_len, W * block_size], True = may attend


@dataclass(frozen=True)
class BatchedQueries:
    """Requests with few new tokens, padded to [B, Q] queries over [B, W] context blocks."""

    token_index: torch.Tensor  # [B, Q] flat token index of each query (padding repeats a valid one)
    valid: torch.Tensor | None  # [B, Q] bool, None when nothing is padded
    block_tables: torch.Tensor  # [B, W] (padding repeats block 0, masked)
    mask: torch.Tensor  # [B, 1, Q, W * block_size]
    uniform: bool = False  # every request has Q queries, request-major, and no prefills: token i * Q + j is
    # request i's query j, so queries are a view and outputs a reshape (no gather/scatter)


@dataclass(frozen=True)
class AttentionMetadata:
    """Everything attention needs for one step, built once and shared by all layers."""

    slot_mapping: torch.Tensor | None  # [T] cache slot of each new token; None: do not write the cache
    prefills: tuple[PrefillSeq, ...]
    batched: BatchedQueries | None
    block_size: int = 16


def _tables(chunks: Sequence[tuple[int, int, Sequence[int]]]) -> torch.Tensor:
    width = max(len(c[2]) for c in chunks)
    return torch.tensor([list(c[2]) + [0] * (width - len(c[2])) for c in chunks], dtype=torch.long).view(-1, width)


def uniform_inputs(chunks: Sequence[tuple[int, int, Sequence[int]]]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(positions [B, Q], block tables [B, W]) when every chunk (start_pos, num_new, block_table) has the same
    small number of new tokens; None otherwise (prefill chunks, mixed batches)."""
    n = chunks[0][1]
    if n > SMALL_QUERY or any(c[1] != n for c in chunks):
        return None
    tables = _tables(chunks)
    starts = torch.tensor([c[0] for c in chunks])
    return starts[:, None] + torch.arange(n)[None, :], tables


def uniform_metadata(positions: torch.Tensor, tables: torch.Tensor, block_size: int,
                     device: torch.device) -> AttentionMetadata:
    """Q new tokens per request at ``positions`` [B, Q] over block tables [B, W] (W * block_size > positions).

    Decode (Q = 1) and speculative verification (Q = k + 1) in a handful of tensor ops and no Python loop;
    the draft reuses one table for its k passes, and ``CompiledForward`` traces exactly this function.
    """
    keys = torch.arange(tables.shape[1] * block_size, device=positions.device)
    mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, Q, W * block_size]
    slot_mapping = tables.gather(1, positions // block_size) * block_size + positions % block_size
    token_index = torch.arange(positions.numel(), device=positions.device).view(positions.shape)
    return AttentionMetadata(slot_mapping.flatten().to(device), (),
                             BatchedQueries(token_index.to(device), None, tables.to(device), mask.to(device),
                                            uniform=True), block_size)


def build_attention_metadata(chunks: Sequence[tuple[int, int, Sequence[int]]], block_size: int,
                             device: torch.device) -> AttentionMetadata:
    """chunks: per request (start_pos, num_new_tokens, block_table), in flat-token order.

    Vectorised over requests: one padded block-table tensor, then gathers, so the cost per step does not
    grow with a Python loop over every decoding request.
    """
    uniform = uniform_inputs(chunks)
    if uniform is not None:  # decode, or verification of k proposals each: the fast path
        return uniform_metadata(*uniform, block_size, device)
    tables = _tables(chunks)
    r = len(chunks)
    starts = torch.tensor([c[0] for c in chunks])
    lens = torch.tensor([c[1] for c in chunks])
    offsets = lens.cumsum(0) - lens
    owner = torch.repeat_interleave(torch.arange(r), lens)
    token_pos = torch.arange(int(lens.sum())) - offsets[owner] + starts[owner]
    slot_mapping = tables[owner, token_pos // block_size] * block_size + token_pos % block_size

    small = (lens <= SMALL_QUERY).nonzero().flatten()
    prefills = []
    for i in (lens > SMALL_QUERY).nonzero().flatten().tolist():
        off, n, st = int(offsets[i]), int(lens[i]), int(starts[i])
        if st == 0:
            prefills.append(PrefillSeq(off, off + n, None, None))
            continue
        used = -(-(st + n) // block_size)  # blocks holding positions [0, st + n)
        keys = torch.arange(used * block_size)
        mask = keys[None, :] <= torch.arange(st, st + n)[:, None]
        prefills.append(PrefillSeq(off, off + n, tables[i, :used].to(device), mask.to(device)))
    batched = None
    if len(small):
        s_lens, s_starts = lens[small], starts[small]
        q_max = int(s_lens.max())
        used = -(-int((s_starts + s_lens).max()) // block_size)
        q = torch.arange(q_max)[None, :]
        valid = q < s_lens[:, None]
        token_index = offsets[small][:, None] + torch.minimum(q, s_lens[:, None] - 1)
        keys = torch.arange(used * block_size)[None, :]
        q_pos = s_starts[:, None] + torch.minimum(q, s_lens[:, None] - 1)  # padded queries repeat the last one
        mask = (keys[:, None, :] <= q_pos[:, :, None]).unsqueeze(1)  # [B, 1, Q, used * block_size]
        batched = BatchedQueries(token_index.to(device), None if bool(valid.all()) else valid.to(device),
                                 tables[small, :used].to(device), mask.to(device))
    return AttentionMetadata(slot_mapping.to(device), tuple(prefills), batched, block_size)


def _gather(cache: torch.Tensor, tables: torch.Tensor, block_size: int) -> torch.Tensor:
    """Whole blocks of a flat cache [N * bs, Hkv, D] for tables [..., W] -> [..., W * bs, Hkv, D].

    ``index_select`` on the block dimension copies contiguous rows; measured 1.5x faster here than
    advanced indexing (``blocks[tables]``), which goes through the generic index kernel.
    """
    blocks = cache.view(-1, block_size, *cache.shape[1:])
    out = torch.index_select(blocks, 0, tables.flatten())
    return out.view(*tables.shape[:-1], tables.shape[-1] * block_size, *cache.shape[1:])


class PagedAttention(nn.Module):
    """Scaled dot-product attention reading and writing one layer's paged KV cache.

    The runner binds ``kv_cache`` (a (k, v) pair of flat slot tensors) before the first step.

    Example:
        >>> attn = PagedAttention(num_heads=4, num_kv_heads=2, head_dim=8)
        >>> attn.kv_cache = (torch.zeros(32, 2, 8), torch.zeros(32, 2, 8))
        >>> meta = build_attention_metadata([(0, 3, [0])], block_size=16, device=torch.device("cpu"))
        >>> attn(torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8), meta).shape
        torch.Size([3, 4, 8])
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] for the new tokens -> [T, H, D]."""
        assert self.kv_cache is not None, "kv_cache not bound"
        k_cache, v_cache = self.kv_cache
        if meta.slot_mapping is not None:
            k_cache.index_copy_(0, meta.slot_mapping, k)
            v_cache.index_copy_(0, meta.slot_mapping, v)
        b = meta.batched
        if b is not None and b.uniform:  # [B * Q, H, D] queries already in request-major order
            batch, n = b.token_index.shape
            kb = _gather(k_cache, b.block_tables, meta.block_size).transpose(1, 2)  # [B, Hkv, L, D]
            vb = _gather(v_cache, b.block_tables, meta.block_size).transpose(1, 2)
            qb = q.view(batch, n, *q.shape[1:]).transpose(1, 2)  # [B, H, Q, D]
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=b.mask, enable_gqa=True)
            return o.transpose(1, 2).reshape(q.shape)
        out = torch.empty_like(q)
        for p in meta.prefills:
            qs = q[p.start:p.end].transpose(0, 1).unsqueeze(0)
            if p.block_table is None:
                ks, vs = k[p.start:p.end], v[p.start:p.end]
            else:
                ks = _gather(k_cache, p.block_table, meta.block_size)
                vs = _gather(v_cache, p.block_table, meta.block_size)
            o = F.scaled_dot_product_attention(
                qs, ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0),
                attn_mask=p.mask, is_causal=p.mask is None, enable_gqa=True)
            out[p.start:p.end] = o[0].transpose(0, 1)
        if b is not None:
            qb = q[b.token_index].transpose(1, 2)  # [B, H, Q, D]
            kb = _gather(k_cache, b.block_tables, meta.block_size).transpose(1, 2)  # [B, Hkv, L, D]
            vb = _gather(v_cache, b.block_tables, meta.block_size).transpose(1, 2)
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=b.mask, enable_gqa=True).transpose(1, 2)
            if b.valid is None:
                out[b.token_index.flatten()] = o.flatten(0, 1)
            else:
                out[b.token_index[b.valid]] = o[b.valid]
        return out
