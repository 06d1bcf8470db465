"""Turns a SchedulerOutput into tensors, runs the model, samples; returns an immutable StepResult.

The runner owns the device state — KV cache tensors, per-request sampling generators — and never the
scheduler's: it reads the SchedulerOutput and hands back tokens.
"""

from __future__ import annotations

import logging

import torch

from parallel.compiled import ModelForward
from parallel.layers.attention import AttentionMetadata, PrefillSeq
from parallel.models.llama import LlamaArgs, LlamaForCausalLM
from parallel.penalties import History
from parallel.sampler import Sampler, logprob_entry
from parallel.sampling_params import SamplingParams
from parallel.speculative import DraftWork, Proposer, verify
from parallel.step_messages import ScheduledRequest, SchedulerOutput, StepResult
from parallel.structured import apply_mask

logger = logging.getLogger(__name__)


def kv_bytes_per_block(args: LlamaArgs, tp_size: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block on one rank (KV heads are split over ranks, replicated when fewer than ranks)."""
    kv_heads = max(1, args.num_kv_heads // tp_size)
    per_token = 2 * args.num_layers * kv_heads * args.head_dim
    return per_token * block_size * torch.tensor([], dtype=dtype).element_size()


class ModelRunner:
    """Runs one step of the model over the scheduled tokens of many requests.

    Example:
        >>> runner = ModelRunner(model, num_blocks=256, block_size=16, seed=0)
        >>> result = runner.execute(scheduler.schedule())
    """

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, seed: int = 0,
                 sample: bool = True, proposer: Proposer | None = None, compile: bool = False) -> None:
        self.model = model
        self.forward = ModelForward(model, block_size, compile)  # compiled uniform steps only when asked
        self.proposer = proposer
        self.sample = sample  # tensor-parallel ranks > 0 run the layers (for the collectives) but never sample
        self.block_size = block_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.kv_caches = []
        for attn in model.attention_layers():
            shape = (num_blocks * block_size, attn.num_kv_heads, attn.head_dim)
            attn.kv_cache = (torch.zeros(shape, dtype=self.dtype, device=self.device),
                             torch.zeros(shape, dtype=self.dtype, device=self.device))
            self.kv_caches.append(attn.kv_cache)
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(seed))
        self._generators: dict[str, torch.Generator] = {}
        self._histories: dict[str, History] = {}  # requests with penalties: their tokens so far
        self._pending_rows: dict[str, torch.Tensor] = {}  # prompt logprobs: a chunk's last row, for the next chunk

    def add_request(self, request_id: str, params: SamplingParams) -> None:
        """Create the request's own resources now, at admission, so whatever can fail (a seed torch refuses)
        fails before the request joins a batch."""
        if params.seed is not None:
            self._generators[request_id] = torch.Generator(device=self.device).manual_seed(params.seed)

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        gen = self._generators.get(request_id)
        if gen is None:
            gen = self._generators[request_id] = torch.Generator(device=self.device).manual_seed(seed)
        return gen

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        for request_id in out.finished_request_ids:
            self._generators.pop(request_id, None)
            self._histories.pop(request_id, None)
            self._pending_rows.pop(request_id, None)
            if self.proposer is not None:
                self.proposer.forget(request_id)
        if not out.scheduled:
            if self.proposer is not None and out.finished_request_ids:
                self.proposer.step([], {}, self.sampler)  # a remote draft frees those sequences now, not later
            return StepResult({})
        ids: list[int] = []
        rows: list[int] = []  # logits rows: the last 1 + num_draft positions of each sampled request
        starts: list[int] = []  # each request's first row in the step's hidden states
        for s in out.scheduled:
            starts.append(len(ids))
            ids.extend(s.token_ids)
            if s.params.needs_history:  # (never with drafts: the engine refuses penalties with speculation)
                self._histories.setdefault(s.request_id, History()).update(s.start_pos, s.token_ids,
                                                                           s.num_prompt_tokens)
            if s.sample:
                rows.extend(range(len(ids) - 1 - s.num_draft, len(ids)))
        hidden = self.forward(ids, [(s.start_pos, len(s.token_ids), s.block_table) for s in out.scheduled])
        sampled = [s for s in out.scheduled if s.sample]
        if not self.sample:
            return StepResult({})
        prompt_lps = self._prompt_logprobs(out.scheduled, starts, hidden) or None
        gens = {s.request_id: self._generator(s.request_id, s.params.seed) for s in sampled}
        if not sampled:  # prefill chunks only; the draft still has to keep pace with them
            drafts = self._propose(out, {}, {}, gens) if self.proposer is not None else None
            return StepResult({}, None, drafts, prompt_logprobs=prompt_lps)
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        if out.grammar is not None:  # structured output: disallowed tokens to -inf (never with drafts)
            logits = apply_mask(logits, [s.request_id for s in sampled], out.grammar)
        failed: dict[str, str] = {}
        if any(s.num_draft for s in sampled):
            emitted, logprobs, accepted = self._verify(sampled, logits, gens, failed)
        else:
            emitted, logprobs = self._sample(sampled, logits, gens, failed)
            accepted = None
        drafts = self._propose(out, emitted, accepted or {}, gens) if self.proposer is not None else None
        return StepResult(emitted, logprobs or None, drafts, accepted, failed or None, prompt_lps)

    def _prompt_logprobs(self, scheduled: tuple[ScheduledRequest, ...], starts: list[int], hidden: torch.Tensor
                         ) -> dict[str, tuple[int, tuple[dict[int, float], ...]]]:
        """vLLM's prompt_logprobs, computed in prefill: the logits at position p score prompt token p + 1. A
        chunk's last prompt row scores the next chunk's first token, so it waits for it (``_pending_rows``).
        Requests asking for them skip the prefix cache, so every prompt position is computed here."""
        found = {}
        for s, start in zip(scheduled, starts, strict=True):
            k, n = s.params.prompt_logprobs, s.num_prompt_tokens
            if k is None or s.start_pos >= n:
                continue
            end = min(s.start_pos + len(s.token_ids), n)  # prompt positions [start_pos, end) in this chunk
            lp = self.model.compute_logits(hidden[start:start + end - s.start_pos]).float().log_softmax(dim=-1)
            pending = self._pending_rows.pop(s.request_id, None) if s.start_pos > 0 else None
            if pending is not None:
                lp = torch.cat([pending[None], lp])
            first = s.start_pos if pending is not None else s.start_pos + 1  # the first token scored
            entries = tuple(logprob_entry(lp[q - first], s.token_ids[q - s.start_pos], k)
                            for q in range(first, end))
            if end < n:
                self._pending_rows[s.request_id] = lp[-1].clone()  # (a view would keep the chunk's [T, V] alive)
            if entries:
                found[s.request_id] = (first, entries)
        return found

    def _sample(self, sampled: list[ScheduledRequest], logits: torch.Tensor, gens: dict[str, torch.Generator | None],
                failed: dict[str, str]) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[dict[int, float], ...]]]:
        """One batched draw; if it raises, the rows are drawn one by one so that only the request whose own
        draw raises fails (into ``failed``). Seeded generators are rewound first, so every other request
        gets exactly the token the batched draw would have given it."""
        params = [s.params for s in sampled]
        seeded = {rid: g.get_state() for rid, g in gens.items() if g is not None}
        histories = [self._histories.get(s.request_id) for s in sampled] if self._histories else None
        try:
            tokens, lps = self.sampler(logits, params, [gens[s.request_id] for s in sampled], histories)
        except Exception as batch_err:
            logger.exception("batched sampling of %d requests failed: sampling them one by one", len(sampled))
            for rid, state in seeded.items():
                gens[rid].set_state(state)  # type: ignore[union-attr]
            tokens, lps = [], []
            for i, s in enumerate(sampled):
                try:
                    (t,), (e,) = self.sampler(logits[i:i + 1], [s.params], [gens[s.request_id]],
                                              [self._histories.get(s.request_id)])
                except Exception as err:
                    logger.exception("sampling request %s failed", s.request_id)
                    failed[s.request_id] = f"sampling failed: {type(err).__name__}: {err}"
                    t, e = -1, None
                tokens.append(t)
                lps.append(e)
            if len(sampled) > 1 and len(failed) == len(sampled):  # no one request's fault: the step failed
                failed.clear()
                raise batch_err
        emitted = {s.request_id: (t,) for s, t in zip(sampled, tokens, strict=True) if s.request_id not in failed}
        logprobs = {s.request_id: (e,) for s, e in zip(sampled, lps, strict=True)
                    if e is not None and s.request_id not in failed}
        return emitted, logprobs

    def _verify(self, sampled: list[ScheduledRequest], logits: torch.Tensor, gens: dict[str, torch.Generator | None],
                failed: dict[str, str]
                ) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[dict[int, float], ...]], dict[str, int]]:
        """Speculative verification of each request's proposals against the target's k+1 distributions.
        Per request: one whose verification raises goes into ``failed``, the others are unaffected."""
        assert self.proposer is not None
        emitted, logprobs, accepted = {}, {}, {}
        offset = 0
        raw = logits.float().log_softmax(dim=-1) if any(s.params.logprobs is not None for s in sampled) else None
        for s in sampled:
            n = 1 + s.num_draft
            block = logits[offset:offset + n]
            drafts = s.token_ids[len(s.token_ids) - s.num_draft:]
            q = self.proposer.pending_q(s.request_id)
            try:
                # greedy verification compares argmaxes: the raw logits serve, no softmax needed
                p = block if s.params.greedy else self.sampler.probs(block, [s.params] * n)
                tokens, j = verify(p, q[: s.num_draft] if q is not None else None, drafts, s.params, self.sampler,
                                   gens[s.request_id])
                if raw is not None and s.params.logprobs is not None:
                    logprobs[s.request_id] = tuple(logprob_entry(raw[offset + i], t, s.params.logprobs)
                                                   for i, t in enumerate(tokens))
                emitted[s.request_id], accepted[s.request_id] = tuple(tokens), j
            except Exception as err:
                logger.exception("verifying request %s failed", s.request_id)
                failed[s.request_id] = f"sampling failed: {type(err).__name__}: {err}"
            offset += n
        return emitted, logprobs, accepted

    def _propose(self, out: SchedulerOutput, emitted: dict[str, tuple[int, ...]], accepted: dict[str, int],
                 gens: dict[str, torch.Generator | None]) -> dict[str, tuple[int, ...]]:
        assert self.proposer is not None
        works = []
        for s in out.scheduled:
            real = len(s.token_ids) - s.num_draft
            j = accepted.get(s.request_id, 0)
            known = s.token_ids[:real] + emitted.get(s.request_id, ())
            state = self.proposer.state.get(s.request_id)
            valid = s.start_pos if s.resumed or state is None else min(state.computed, s.start_pos + real + j)
            works.append(DraftWork(s.request_id, known, s.start_pos, valid, s.block_table,
                                   s.request_id in emitted, s.params))
        for s in out.scheduled:  # seeded requests need a generator for their draft draws too
            gens.setdefault(s.request_id, self._generator(s.request_id, s.params.seed))
        return self.proposer.step(works, gens, self.sampler)

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [T, V] of every prompt position, without touching the KV cache (scoring, tests)."""
        meta = AttentionMetadata(None, (PrefillSeq(0, len(token_ids), None, None),), None, self.block_size)
        positions = torch.arange(len(token_ids), device=self.device)
        hidden = self.model(torch.tensor(token_ids, device=self.device), positions, meta)
        return self.model.compute_logits(hidden).float()
