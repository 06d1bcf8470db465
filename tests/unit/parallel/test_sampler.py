from __future__ import annotations

import torch

from parallel.sampler import Sampler, apply_top_k_top_p
from parallel.sampling_params import SamplingParams


def test_top_k_top_p_masks():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    out = apply_top_k_top_p(logits, torch.tensor([2, 0]), torch.tensor([1.0, 0.7]))
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]
    assert torch.isfinite(out[1]).tolist() == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    sampler = Sampler(torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=1.0)] * 4000
    tokens, _ = sampler(probs.log().expand(4000, 3), params, [None] * 4000)
    freq = torch.bincount(torch.tensor(tokens), minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_low_temperature_is_near_greedy_and_greedy_is_argmax():
    logits = torch.tensor([[0.0, 1.0, 0.5]] * 200)
    sampler = Sampler(torch.Generator().manual_seed(0))
    cold, _ = sampler(logits, [SamplingParams(temperature=0.01)] * 200, [None] * 200)
    greedy, _ = sampler(logits, [SamplingParams(temperature=0)] * 200, [None] * 200)
    assert set(cold) == {1} and set(greedy) == {1}


def test_seeded_rows_use_their_own_generator():
    logits = torch.zeros(3, 50)
    p = SamplingParams(temperature=1.0, seed=3)
    a, _ = Sampler()(logits, [p, p, p], [torch.Generator().manual_seed(3) for _ in range(3)])
    assert a[0] == a[1] == a[2]
