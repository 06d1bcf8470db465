"""A ``torch.compile``d model step for uniform batches: every request brings Q new tokens (Q <= SMALL_QUERY).

Decode steps (Q = 1), speculative verification (Q = k + 1) and the draft's proposal passes are uniform; at
small sizes their cost is per-op dispatch, not arithmetic (the shipped 5.5M target spends ~3 ms per eager
decode pass on ~150 tiny ops). Inductor fuses the elementwise work and runs the graph without the Python
dispatcher, as vLLM's compiled / CUDA-graph decode does; prefill chunks and mixed batches stay eager (their
shapes vary and their cost is arithmetic).

The traced function builds the attention metadata itself (``uniform_metadata``), so the graph depends only
on (token ids [B*Q], positions [B, Q], block tables [B, W]); shapes are dynamic, so a handful of graphs
(B = 1 or more, Q = 1 or more: inductor specialises sizes 0 and 1) serve every step. The KV cache is written
in place inside the graph, exactly as the eager path writes it.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

from parallel.layers.attention import build_attention_metadata, uniform_inputs, uniform_metadata
from parallel.models.llama import LlamaForCausalLM


def _own_code(method: Callable[..., Any], owner: object) -> Callable[..., Any]:
    """``method`` bound to ``owner`` through a copy of its code object. Dynamo keeps compiled graphs, their
    guards and its recompile limit (8) per code object: without a copy the target's and the draft's graphs
    would share one cache, fail each other's guards on every call and soon fall back to eager."""
    fn = method.__func__  # type: ignore[attr-defined]
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{id(owner):x}")  # a new code object; the name for logs
    return types.MethodType(types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__,
                                               fn.__closure__), owner)


class CompiledForward:
    """The model's forward on uniform batches, through ``torch.compile`` (inductor, dynamic shapes).

    The first call per graph compiles (~15 s on 2 CPU cores); later calls reuse it.

    Example:
        >>> step = CompiledForward(model, block_size=16)
        >>> hidden = step(torch.tensor([7]), torch.tensor([[12]]), torch.tensor([[0]]))  # [1, hidden]
    """

    def __init__(self, model: LlamaForCausalLM, block_size: int) -> None:
        self.model, self.block_size = model, block_size
        self.device = next(model.parameters()).device
        self._compiled = torch.compile(_own_code(self._forward, self), dynamic=True)
        self._proposals = None  # compiled on first use: only a draft model needs it

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        meta = uniform_metadata(positions, tables, self.block_size, positions.device)
        return self.model(input_ids, positions.flatten(), meta)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """[B*Q] ids at positions [B, Q] (request-major) over block tables [B, W] -> [B*Q, hidden]."""
        return self._compiled(input_ids.to(self.device), positions.to(self.device),
                              _two_columns(tables).to(self.device))

    def _greedy_proposals(self, input_ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor,
                          k: int) -> torch.Tensor:
        batch, n = positions.shape
        hidden = self._forward(input_ids, positions, tables).view(batch, n, -1)[:, -1]
        token = self.model.compute_logits(hidden).argmax(dim=-1)  # x_1
        drafts, position = [token], positions[:, -1]
        for _ in range(k - 1):  # unrolled in the graph: k is a compile-time constant
            position = position + 1
            hidden = self._forward(token, position[:, None], tables)
            token = self.model.compute_logits(hidden).argmax(dim=-1)
            drafts.append(token)
        return torch.stack(drafts, dim=1)

    def greedy_proposals(self, input_ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor,
                         k: int) -> torch.Tensor:
        """The draft's whole proposal loop in one graph: run the new tokens (positions [B, Q]), then k - 1
        one-token passes feeding each argmax back -> proposals [B, k]. No Python between the passes; the
        tables must already hold the k - 1 lookahead slots (the scheduler reserves them)."""
        if self._proposals is None:
            self._proposals = torch.compile(_own_code(self._greedy_proposals, self), dynamic=True)
        return self._proposals(input_ids.to(self.device), positions.to(self.device),
                               _two_columns(tables).to(self.device), k)


def _two_columns(tables: torch.Tensor) -> torch.Tensor:
    """Block tables at least two blocks wide (the padding block is masked: its keys lie beyond every query).
    Inductor specialises a size of 1, so one-block tables would cost graphs of their own."""
    return tables if tables.shape[1] > 1 else torch.cat([tables, torch.zeros_like(tables)], dim=1)


class ModelForward:
    """One model pass over a step's chunks: the compiled graph for uniform batches when ``compile`` is on,
    else (and for prefill or mixed batches) the eager model over ``build_attention_metadata``.

    Example:
        >>> forward = ModelForward(model, block_size=16, compile=True)
        >>> hidden = forward([5, 9, 2], [(0, 3, (0,))])  # one request, three new tokens at positions 0..2
    """

    def __init__(self, model: LlamaForCausalLM, block_size: int, compile: bool = False) -> None:
        self.model, self.block_size = model, block_size
        self.device = next(model.parameters()).device
        self.compiled = CompiledForward(model, block_size) if compile else None

    def __call__(self, ids: list[int], chunks: Sequence[tuple[int, int, Sequence[int]]]) -> torch.Tensor:
        """ids: the chunks' new tokens in flat order; chunks: (start_pos, num_new, block_table) -> [T, hidden]."""
        uniform = uniform_inputs(chunks)
        if uniform is not None:
            return self.uniform(torch.tensor(ids), *uniform)
        positions = [p for start, n, _ in chunks for p in range(start, start + n)]
        meta = build_attention_metadata(chunks, self.block_size, self.device)
        return self.model(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device), meta)

    def uniform(self, ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """[B*Q] ids at positions [B, Q] over tables [B, W] -> [B*Q, hidden]."""
        if self.compiled is not None:
            return self.compiled(ids, positions, tables)
        meta = uniform_metadata(positions, tables, self.block_size, self.device)
        return self.model(ids.to(self.device), positions.flatten().to(self.device), meta)
