"""Turns a SchedulerOutput into tensors, runs the model, samples; returns an immutable StepResult.

The runner owns the device state — KV cache tensors, per-request sampling generators — and never the
scheduler's: it reads the SchedulerOutput and hands back tokens.
"""

from __future__ import annotations

import torch

from parallel.layers.attention import AttentionMetadata, PrefillSeq, build_attention_metadata
from parallel.models.llama import LlamaArgs, LlamaForCausalLM
from parallel.sampler import Sampler
from parallel.scheduler import SchedulerOutput, StepResult


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
                 sample: bool = True) -> None:
        self.model = model
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
        if not out.scheduled:
            return StepResult({})
        ids: list[int] = []
        positions: list[int] = []
        sample_index: list[int] = []
        for s in out.scheduled:
            ids.extend(s.token_ids)
            positions.extend(range(s.start_pos, s.start_pos + len(s.token_ids)))
            if s.sample:
                sample_index.append(len(ids) - 1)
        meta = build_attention_metadata(
            [(s.start_pos, len(s.token_ids), s.block_table) for s in out.scheduled], self.block_size, self.device)
        hidden = self.model(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device), meta)
        sampled = [s for s in out.scheduled if s.sample]
        if not sampled or not self.sample:
            return StepResult({})
        logits = self.model.compute_logits(hidden[torch.tensor(sample_index, device=self.device)])
        tokens, logprobs = self.sampler(logits, [s.params for s in sampled],
                                        [self._generator(s.request_id, s.params.seed) for s in sampled])
        result = {s.request_id: (t,) for s, t in zip(sampled, tokens, strict=True)}
        lp = {s.request_id: (e,) for s, e in zip(sampled, logprobs, strict=True) if e is not None}
        return StepResult(result, lp or None)

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [T, V] of every prompt position, without touching the KV cache (scoring, tests)."""
        meta = AttentionMetadata(None, (PrefillSeq(0, len(token_ids), None, None),), None)
        positions = torch.arange(len(token_ids), device=self.device)
        hidden = self.model(torch.tensor(token_ids, device=self.device), positions, meta)
        return self.model.compute_logits(hidden).float()
