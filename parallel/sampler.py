"""Per-request sampling from a batch of logits: logit_bias and penalties (``penalties.py``), greedy,
temperature, min-p, top-k, top-p, seeds, logprobs (of the raw logits, as vLLM v1 returns them by default).

Sampling uses the exponential-race form of the Gumbel-max trick: argmax_i p_i / E_i with E_i ~ Exp(1) draws
i with probability p_i. Each seeded request draws its E from its own generator, one vector per token, so its
samples are the same whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from parallel.penalties import History, apply_min_p, process
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

    @staticmethod
    def probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """The distribution each row samples from: softmax(logits / T) restricted to top-k / top-p.

        Rows of greedy requests are left at temperature 1 (their token is the argmax either way).
        """
        logits = logits.float()
        temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=logits.device)
        logits = logits / temps[:, None]
        if any(p.min_p > 0 for p in params):
            logits = apply_min_p(logits, torch.tensor([p.min_p for p in params], device=logits.device))
        top_k = torch.tensor([p.effective_top_k for p in params], device=logits.device)
        top_p = torch.tensor([p.top_p for p in params], device=logits.device, dtype=logits.dtype)
        if bool((top_k > 0).any()) or bool((top_p < 1.0).any()):
            logits = apply_top_k_top_p(logits, top_k, top_p)
        return logits.softmax(dim=-1)

    def race(self, n: int, vocab: int, generators: Sequence[torch.Generator | None],
             device: torch.device) -> torch.Tensor:
        """E ~ Exp(1) noise, one row per request; seeded requests draw from their own generator."""
        noise = torch.empty(n, vocab, device=device)
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), vocab, device=device).exponential_(
                generator=self.default_generator)
        for i, g in enumerate(generators):
            if g is not None:
                noise[i].exponential_(generator=g)
        return noise

    def sample_from(self, probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
        """One draw per row of ``probs`` (argmax_i p_i / E_i)."""
        return (probs / self.race(probs.shape[0], probs.shape[1], generators, probs.device)).argmax(dim=-1)

    def __call__(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                 generators: Sequence[torch.Generator | None], histories: Sequence[History | None] | None = None
                 ) -> tuple[list[int], list[dict[int, float] | None]]:
        """``histories``: each row's tokens so far, for its penalties (None: no row has any)."""
        logits = logits.float()
        want_lp = [p.logprobs is not None for p in params]
        raw_logprobs = logits.log_softmax(dim=-1) if any(want_lp) else None
        logits = process(logits, params, histories or [None] * len(params))
        tokens = logits.argmax(dim=-1)
        sample_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sample_rows:
            rows = torch.tensor(sample_rows, device=logits.device)
            probs = self.probs(logits[rows], [params[i] for i in sample_rows])
            tokens[rows] = self.sample_from(probs, [generators[i] for i in sample_rows])
        token_list = tokens.tolist()
        logprobs: list[dict[int, float] | None] = [None] * len(params)
        if raw_logprobs is not None:
            for i, p in enumerate(params):
                if p.logprobs is not None:
                    logprobs[i] = logprob_entry(raw_logprobs[i], token_list[i], p.logprobs)
        return token_list, logprobs


def logprob_entry(row: torch.Tensor, token: int, top_n: int) -> dict[int, float]:
    """The chosen token's log-probability and the top_n alternatives (raw model log-probs, as vLLM v1)."""
    entry = {token: float(row[token])}
    if top_n:
        values, ids = row.topk(top_n)
        entry.update({int(t): float(v) for t, v in zip(ids.tolist(), values.tolist(), strict=True)})
    return entry
