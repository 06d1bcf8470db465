"""Per-request sampling from a batch of logits: greedy, temperature, top-k, top-p, seeds, logprobs.

Sampling uses the exponential-race form of the Gumbel-max trick: argmax_i p_i / E_i with E_i ~ Exp(1) draws
i with probability p_i. Each seeded request draws its E from its own generator, one vector per token, so its
samples are the same whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from parallel.sampling_params import SamplingParams


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what falls outside each row's top-k and nucleus top-p (Holtzman et al. 2020).

    top_k [B] (0: off), top_p [B] (1.0: off). The most likely token always survives.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device).expand_as(sorted_logits)
    drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly more likely tokens
    drop = mass_before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class Sampler:
    """Turns [B, V] logits into one token per row under that row's SamplingParams.

    Example:
        >>> tokens, _ = Sampler()(torch.tensor([[0.0, 5.0, 1.0]]), [SamplingParams(temperature=0)], [None])
        >>> tokens
        [1]
    """

    def __init__(self, default_generator: torch.Generator | None = None) -> None:
        self.default_generator = default_generator

    def __call__(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                 generators: Sequence[torch.Generator | None]) -> tuple[list[int], list[dict[int, float] | None]]:
        logits = logits.float()
        want_lp = [p.logprobs is not None for p in params]
        raw_logprobs = logits.log_softmax(dim=-1) if any(want_lp) else None
        tokens = logits.argmax(dim=-1)
        sample_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sample_rows:
            rows = torch.tensor(sample_rows, device=logits.device)
            sub = logits[rows]
            sub = sub / torch.tensor([params[i].temperature for i in sample_rows], device=sub.device)[:, None]
            top_k = torch.tensor([params[i].effective_top_k for i in sample_rows], device=sub.device)
            top_p = torch.tensor([params[i].top_p for i in sample_rows], device=sub.device, dtype=sub.dtype)
            if bool((top_k > 0).any()) or bool((top_p < 1.0).any()):
                sub = apply_top_k_top_p(sub, top_k, top_p)
            probs = sub.softmax(dim=-1)
            race = torch.empty_like(probs)
            unseeded = [j for j, i in enumerate(sample_rows) if generators[i] is None]
            if unseeded:
                race[unseeded] = torch.empty(len(unseeded), probs.shape[-1], device=probs.device).exponential_(
                    generator=self.default_generator)
            for j, i in enumerate(sample_rows):
                if generators[i] is not None:
                    race[j].exponential_(generator=generators[i])
            tokens[rows] = (probs / race).argmax(dim=-1)
        token_list = tokens.tolist()
        logprobs: list[dict[int, float] | None] = [None] * len(params)
        if raw_logprobs is not None:
            for i, p in enumerate(params):
                if p.logprobs is None:
                    continue
                row = raw_logprobs[i]
                entry = {token_list[i]: float(row[token_list[i]])}
                if p.logprobs:
                    values, ids = row.topk(p.logprobs)
                    entry.update({int(t): float(v) for t, v in zip(ids.tolist(), values.tolist(), strict=True)})
                logprobs[i] = entry
        return token_list, logprobs
