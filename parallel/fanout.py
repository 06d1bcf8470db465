"""Parallel sampling above the engine: ``n`` samples (or ``best_of`` candidates) of one prompt are that many
engine requests, one sequence each, as vLLM v1 does (``vllm/v1/engine/parallel_sampling.py``: a parent
request fans out into child requests). The prompt's KV is shared through the prefix cache where it is on.

- child j of a seeded request gets seed ``seed + j`` (vLLM's rule, so both engines draw the same samples);
- ``best_of``: every candidate is drawn with its sampled token's logprob, and the ``n`` with the highest
  mean log-probability per token are returned (OpenAI: "the one with the highest log probability per
  token"), best first.

Example:
    >>> p = SamplingParams(n=2, seed=7, temperature=0.8)
    >>> [(c.n, c.seed) for c in (child_params(p, 0), child_params(p, 1))]
    [(1, 7), (1, 8)]
    >>> best_of_order([[-1.0, -1.0], [-0.1], [-3.0, -0.5]], n=2)
    [1, 0]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from parallel.sampling_params import SEED_MAX, SEED_MIN, SamplingParams


def child_params(params: SamplingParams, j: int) -> SamplingParams:
    """The engine parameters of sample ``j`` (one sequence; logprobs on for a best_of candidate)."""
    seed = params.seed
    if seed is not None:  # wrap inside the signed 64-bit range a generator takes
        seed = (seed + j - SEED_MIN) % (SEED_MAX - SEED_MIN + 1) + SEED_MIN
    logprobs = params.logprobs
    if params.best_of is not None and logprobs is None:
        logprobs = 0  # the ranking needs each sampled token's logprob (stripped again before returning)
    return dataclasses.replace(params, n=1, best_of=None, seed=seed, logprobs=logprobs)


def best_of_order(token_logprobs: Sequence[Sequence[float]], n: int) -> list[int]:
    """Indices of the ``n`` candidates with the highest mean token logprob, best first (an empty
    candidate ranks last; ties keep candidate order)."""
    def mean(lps: Sequence[float]) -> float:
        return sum(lps) / len(lps) if lps else float("-inf")

    return sorted(range(len(token_logprobs)), key=lambda i: -mean(token_logprobs[i]))[:n]
