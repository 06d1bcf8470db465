"""A draft model serving many target engines at once (speculative decoding with ``placement: separate``).

Each client (a target replica) calls ``propose`` once per step with, per request, only the tokens the draft
has not seen. The service keeps each sequence's draft KV in its own paged cache — its own block tables, since
it shares no memory with the targets — and returns k proposals with their draft distributions q.
Transport-free: the Serve deployment in deployments/draft.py wraps it.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch

from parallel.block_manager import BlockManager
from parallel.models.loader import load_model
from parallel.request import Request
from parallel.sampler import Sampler
from parallel.sampling_params import SamplingParams
from parallel.speculative import DraftProposer, DraftState, DraftWork

ProposeFn = Callable[[str, list[DraftWork], list[str]], dict[str, tuple[tuple[int, ...], torch.Tensor | None]]]


class DraftService:
    """Proposals for many clients' sequences from one draft model.

    Example:
        >>> svc = DraftService("models/tiny-code-llama-draft", k=4, max_model_len=1024, num_blocks=1024)
        >>> svc.propose("replica-a", [work], forgotten=[])  # {request id: (tokens, q)}
    """

    def __init__(self, path: str, k: int, max_model_len: int, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0, compile: bool = False) -> None:
        model = load_model(path, dtype, torch.device(device))
        self.k = k
        self.proposer = DraftProposer(model, num_blocks, block_size, k, max_model_len, compile=compile)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.sampler = Sampler(torch.Generator().manual_seed(seed))
        self.seqs: dict[str, Request] = {}
        self.generators: dict[str, torch.Generator] = {}

    def _drop(self, key: str) -> None:
        seq = self.seqs.pop(key, None)
        if seq is not None:
            self.blocks.free(seq)
        self.proposer.forget(key)
        self.generators.pop(key, None)

    def propose(self, client: str, works: list[DraftWork], forgotten: list[str]
                ) -> dict[str, tuple[tuple[int, ...], torch.Tensor | None]]:
        for rid in forgotten:
            self._drop(f"{client}/{rid}")
        mine: list[DraftWork] = []
        gens: dict[str, torch.Generator | None] = {}
        for w in works:
            key = f"{client}/{w.request_id}"
            seq = self.seqs.get(key)
            known_here = self.proposer.state[key].computed if key in self.proposer.state else 0
            valid = min(w.valid, known_here)
            if seq is None or valid < w.start:  # new, or resumed from a point we never saw: start over
                self._drop(key)
                if w.start > 0:
                    continue  # its earlier tokens never came here: no proposals for this sequence
                seq = self.seqs[key] = Request(key, [], SamplingParams())
                valid = 0
            if not self.blocks.allocate_slots(seq, w.start + len(w.known) + self.k):  # seq computes nothing itself
                self._drop(key)  # out of draft memory: this sequence goes on without proposals
                continue
            mine.append(dataclasses.replace(w, request_id=key, valid=valid, block_table=tuple(seq.block_table)))
            if w.params.seed is not None and key not in self.generators:
                self.generators[key] = torch.Generator().manual_seed(w.params.seed)
            gens[key] = self.generators.get(key)
        proposals = self.proposer.step(mine, gens, self.sampler)
        prefix = len(client) + 1
        return {key[prefix:]: (tokens, self.proposer.pending_q(key)) for key, tokens in proposals.items()}

    def stats(self) -> dict[str, Any]:
        return {"sequences": len(self.seqs), "blocks_used": self.blocks.num_used_blocks,
                "blocks_total": self.blocks.num_blocks}


class ServiceProposer:
    """The runner's proposer seam over a DraftService reached through ``propose`` (in process, or a remote call).

    It mirrors the draft's per-request state (positions computed, pending q) from what the service returns.

    Example:
        >>> proposer = ServiceProposer(DraftService("models/tiny-code-llama-draft", 4, 1024, 1024).propose)
    """

    def __init__(self, propose: ProposeFn) -> None:
        self._propose = propose
        self.client = uuid.uuid4().hex
        self.state: dict[str, DraftState] = {}
        self._forgotten: list[str] = []
        self.calls = 0
        self.call_seconds = 0.0

    def forget(self, request_id: str) -> None:
        if self.state.pop(request_id, None) is not None:
            self._forgotten.append(request_id)

    def pending_q(self, request_id: str) -> torch.Tensor | None:
        state = self.state.get(request_id)
        return None if state is None else state.q

    def step(self, works: list[DraftWork], generators: dict[str, torch.Generator | None],
             sampler: Sampler) -> dict[str, tuple[int, ...]]:
        forgotten, self._forgotten = self._forgotten, []
        start = time.perf_counter()
        result = self._propose(self.client, works, forgotten)
        self.calls += 1
        self.call_seconds += time.perf_counter() - start
        for w in works:
            tokens, q = result.get(w.request_id, ((), None))
            self.state[w.request_id] = DraftState(w.start + len(w.known) + max(len(tokens) - 1, 0), q)
        return {rid: tokens for rid, (tokens, _) in result.items()}

    def stats(self) -> dict[str, float]:
        return {"draft_calls": self.calls, "draft_call_ms": 1e3 * self.call_seconds / max(self.calls, 1)}
