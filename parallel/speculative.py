"""Speculative decoding: a small draft model proposes, the target verifies all proposals in one pass.

Notation of Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative Decoding", Alg. 1) and
Chen et al. 2023 ("Accelerating LLM Decoding with Speculative Sampling"): the draft M_q proposes
x_1..x_k with distributions q_1..q_k; the target M_p scores the k+1 positions at once, giving p_1..p_{k+1}.
For i = 1..k, x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection the token
is resampled from norm(max(0, p_i - q_i)) and the rest is dropped; if all k are accepted a bonus token is
drawn from p_{k+1}. Every emitted token then follows p exactly. Greedy requests accept x_i iff it is the
argmax of p_i (and emit that argmax otherwise), so their output equals greedy decoding without a draft.

The draft keeps its own paged KV cache, indexed by the same slots as the target's (the block manager
allocates once for both), and its own count of computed positions per request: after verification only the
accepted prefix of its KV stays valid, and the next proposal first recomputes what it has not seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from parallel.compiled import ModelForward
from parallel.layers.attention import uniform_inputs
from parallel.models.llama import LlamaForCausalLM
from parallel.sampler import Sampler
from parallel.sampling_params import SamplingParams


def _uniform(generator: torch.Generator | None, default: torch.Generator | None, device: torch.device) -> float:
    return float(torch.rand((), generator=generator or default, device=device))


def verify(p: torch.Tensor, q: torch.Tensor | None, drafts: Sequence[int], params: SamplingParams,
           sampler: Sampler, generator: torch.Generator | None) -> tuple[list[int], int]:
    """The acceptance rule for one request. p: [k+1, V] target distributions (processed like sampling),
    q: [k, V] draft distributions (None for greedy). Returns (emitted tokens, number of drafts accepted)."""
    k = len(drafts)
    if params.greedy:
        best = p.argmax(dim=-1).tolist()
        for i in range(k):
            if drafts[i] != best[i]:
                return [*drafts[:i], best[i]], i
        return [*drafts, best[k]], k
    assert q is not None
    for i, x in enumerate(drafts):
        if _uniform(generator, sampler.default_generator, p.device) * float(q[i, x]) < float(p[i, x]):
            continue  # accepted: u < p(x) / q(x), written without the division (q(x) > 0: x was drawn from q)
        residual = (p[i] - q[i]).clamp(min=0)
        total = float(residual.sum())
        dist = residual / total if total > 0 else p[i]  # p == q exactly: any draw from p is right
        return [*drafts[:i], int(sampler.sample_from(dist[None], [generator])[0])], i
    return [*drafts, int(sampler.sample_from(p[k][None], [generator])[0])], k


def _widen(chunks: list[tuple[list[int], int, tuple[int, ...]]], owners: list[DraftWork]
           ) -> list[tuple[list[int], int, tuple[int, ...]]]:
    """Chunks padded at the front to one common length, re-feeding tokens the draft has already seen (their
    KV is rewritten with the values it holds), so that a batch after verification — 1 new token where a
    draft was rejected, 2 where all were accepted — is uniform. Unchanged where a chunk cannot reach back."""
    n = max(len(tokens) for tokens, _, _ in chunks)
    out = []
    for (tokens, begin, table), w in zip(chunks, owners, strict=True):
        extra = n - len(tokens)
        if extra and begin - extra < w.start:
            return chunks
        out.append((list(w.known[begin - extra - w.start:begin - w.start]) + tokens, begin - extra, table))
    return out


@dataclass
class DraftState:
    computed: int  # positions [0, computed) of the draft KV are filled (proposals included until verified)
    q: torch.Tensor | None = None  # [k, V] distributions of the pending proposals (None: greedy)


@dataclass(frozen=True)
class DraftWork:
    """What the draft must do for one request after this step's verification."""

    request_id: str
    known: tuple[int, ...]  # tokens from position ``start`` on that are now part of the sequence
    start: int
    valid: int  # draft KV positions known to be right (a prefix)
    block_table: tuple[int, ...]
    propose: bool  # the request sampled this step, so it gets k new proposals
    params: SamplingParams


class Proposer(Protocol):
    """What the model runner needs from a draft, local (DraftProposer) or remote (a draft deployment)."""

    state: dict[str, DraftState]

    def forget(self, request_id: str) -> None: ...

    def pending_q(self, request_id: str) -> torch.Tensor | None: ...

    def step(self, works: list[DraftWork], generators: dict[str, torch.Generator | None],
             sampler: Sampler) -> dict[str, tuple[int, ...]]: ...


class DraftProposer:
    """Runs the draft model: catch up on accepted tokens, then propose k tokens per request.

    Example:
        >>> proposer = DraftProposer(draft_model, num_blocks=256, block_size=16, k=4, max_model_len=1024)
        >>> proposals = proposer.step(works, generators, sampler)  # {request id: (x_1..x_k)}
    """

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, k: int, max_model_len: int,
                 compile: bool = False) -> None:
        self.model, self.k, self.max_model_len = model, k, max_model_len
        # the k proposal passes are tiny and sequential: per-op dispatch dominates them, compiling removes it
        self.forward = ModelForward(model, block_size, compile)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        for attn in model.attention_layers():
            shape = (num_blocks * block_size, attn.num_kv_heads, attn.head_dim)
            attn.kv_cache = (torch.zeros(shape, dtype=self.dtype, device=self.device),
                             torch.zeros(shape, dtype=self.dtype, device=self.device))
        self.state: dict[str, DraftState] = {}

    def forget(self, request_id: str) -> None:
        self.state.pop(request_id, None)

    def pending_q(self, request_id: str) -> torch.Tensor | None:
        state = self.state.get(request_id)
        return None if state is None else state.q

    def _forward(self, chunks: list[tuple[list[int], int, tuple[int, ...]]]) -> torch.Tensor:
        """Run the draft on (tokens, start position, block table) chunks; logits of each chunk's last token."""
        hidden = self.forward([t for tokens, _, _ in chunks for t in tokens],
                              [(start, len(tokens), table) for tokens, start, table in chunks])
        last = torch.tensor([len(c[0]) for c in chunks], device=self.device).cumsum(0) - 1
        return self.model.compute_logits(hidden[last]).float()

    def _decode(self, tokens: list[int], positions: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """One token per request (proposal passes 2..k): logits [B, V]; block tables built once for all k."""
        hidden = self.forward.uniform(torch.tensor(tokens), positions[:, None], tables)
        return self.model.compute_logits(hidden).float()

    @staticmethod
    def _draw(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
              sampler: Sampler) -> tuple[list[int], torch.Tensor | None]:
        """Draw x_i ~ q_i per request; q is None when every request is greedy (verification needs only x_i)."""
        if all(p.greedy for p in params):
            return logits.argmax(dim=-1).tolist(), None
        probs = sampler.probs(logits, params)
        greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        drawn = sampler.sample_from(probs, generators)
        return torch.where(greedy, logits.argmax(dim=-1), drawn).tolist(), probs

    @torch.inference_mode()
    def step(self, works: list[DraftWork], generators: dict[str, torch.Generator | None],
             sampler: Sampler) -> dict[str, tuple[int, ...]]:
        chunks, owners = [], []
        for w in works:
            begin = max(min(w.valid, w.start + len(w.known)), w.start)
            tokens = list(w.known[begin - w.start:])
            if tokens:
                chunks.append((tokens, begin, w.block_table))
                owners.append(w)
            self.state[w.request_id] = DraftState(computed=w.start + len(w.known))
        proposals: dict[str, list[int]] = {}
        qs: dict[str, list[torch.Tensor | None]] = {}
        if not chunks:
            return {}
        fused = self._fused(chunks, owners)
        if fused is not None:
            return fused
        logits = self._forward(chunks)
        live = [(i, w) for i, w in enumerate(owners) if w.propose and self._room(w) > 0]
        if not live:
            return {}
        rows = torch.tensor([i for i, _ in live], device=self.device)
        params = [w.params for _, w in live]
        gens = [generators.get(w.request_id) for _, w in live]
        tokens, probs = self._draw(logits[rows], params, gens, sampler)
        for n, ((_, w), t) in enumerate(zip(live, tokens, strict=True)):
            proposals[w.request_id], qs[w.request_id] = [t], [None if probs is None else probs[n]]
        if self.k > 1:
            # passes 2..k: one token per request; the block tables are the same for all of them (the scheduler
            # reserved lookahead slots for the proposals)
            width = max(len(w.block_table) for _, w in live)
            tables = torch.tensor([list(w.block_table) + [0] * (width - len(w.block_table)) for _, w in live])
            base = torch.tensor([w.start + len(w.known) for _, w in live])  # position of x_1
        for step in range(1, self.k):
            keep = [n for n, (_, w) in enumerate(live) if self._room(w) > step]
            if not keep:
                break
            if len(keep) < len(live):
                live, base, tables = [live[n] for n in keep], base[keep], tables[keep]
            logits = self._decode([proposals[w.request_id][-1] for _, w in live], base + (step - 1), tables)
            tokens, probs = self._draw(logits, [w.params for _, w in live],
                                       [generators.get(w.request_id) for _, w in live], sampler)
            for n, ((_, w), t) in enumerate(zip(live, tokens, strict=True)):
                proposals[w.request_id].append(t)
                qs[w.request_id].append(None if probs is None else probs[n])
        for rid, toks in proposals.items():
            state = self.state[rid]
            state.computed += len(toks) - 1  # x_1..x_{k-1} went through the draft; x_k did not
            q_rows = qs[rid]
            state.q = None if any(q is None for q in q_rows) else torch.stack(q_rows)  # None: greedy
        return {rid: tuple(t) for rid, t in proposals.items()}

    def _fused(self, chunks: list[tuple[list[int], int, tuple[int, ...]]], owners: list[DraftWork]
               ) -> dict[str, tuple[int, ...]] | None:
        """All k proposals from one compiled graph, when it applies: compiling is on, every request is greedy,
        proposes k tokens and brings the same number of new tokens. None: take the pass-by-pass path."""
        compiled = self.forward.compiled
        if compiled is None or not all(w.propose and w.params.greedy and self._room(w) >= self.k for w in owners):
            return None
        chunks = _widen(chunks, owners)
        uniform = uniform_inputs([(start, len(tokens), table) for tokens, start, table in chunks])
        if uniform is None:
            return None
        drafts = compiled.greedy_proposals(torch.tensor([t for tokens, _, _ in chunks for t in tokens]), *uniform,
                                           self.k).tolist()
        for w in owners:
            self.state[w.request_id].computed += self.k - 1  # x_1..x_{k-1} went through the draft; x_k did not
        return {w.request_id: tuple(row) for w, row in zip(owners, drafts, strict=True)}

    def _room(self, w: DraftWork) -> int:
        """Proposals must stay inside the context: at most max_model_len - known tokens - 1 of them."""
        return min(self.k, self.max_model_len - (w.start + len(w.known)) - 1)
