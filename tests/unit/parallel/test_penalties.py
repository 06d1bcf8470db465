"""Logits processing against the reference formulas, row by row in plain Python (OpenAI's penalties, CTRL's
repetition penalty as vLLM applies it, logit_bias, min-p); batching never changes a row; histories follow
chunks and preemption; a request with penalties through the offline engine."""

from __future__ import annotations

import doctest
import random

import pytest
import torch

from parallel import penalties
from parallel.penalties import History, apply_min_p, process
from parallel.sampler import Sampler
from parallel.sampling_params import SamplingParams


def reference(row: list[float], p: SamplingParams, prompt: list[int], output: list[int]) -> list[float]:
    """vLLM v1's order: logit_bias, then repetition, then frequency and presence, one token at a time."""
    out = list(row)
    for t, b in p.logit_bias:
        out[t] += b
    for v in range(len(out)):
        if v in prompt or v in output:
            out[v] = out[v] / p.repetition_penalty if out[v] > 0 else out[v] * p.repetition_penalty
        c = output.count(v)
        out[v] -= c * p.frequency_penalty + (c > 0) * p.presence_penalty
    return out


def test_doctests():
    assert doctest.testmod(penalties).failed == 0


def test_a_mixed_batch_matches_the_reference_row_by_row():
    rng = random.Random(3)
    vocab, rows = 50, []
    for i in range(12):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 8))]
        output = [rng.randrange(vocab) for _ in range(rng.randrange(0, 12))]
        p = SamplingParams(temperature=0, presence_penalty=rng.choice([0, 0.5, -1.5]),
                           frequency_penalty=rng.choice([0, 0.3, 2]), repetition_penalty=rng.choice([1, 1.3, 0.7]),
                           logit_bias={rng.randrange(vocab): rng.uniform(-100, 100)} if i % 3 == 0 else {})
        rows.append((p, prompt, output))
    logits = torch.randn(len(rows), vocab)
    hist = [History(prompt + output, len(prompt)) for _, prompt, output in rows]
    got = process(logits, [p for p, _, _ in rows], hist)
    for i, (p, prompt, output) in enumerate(rows):
        want = reference(logits[i].tolist(), p, prompt, output)
        assert got[i].tolist() == pytest.approx(want, abs=1e-5), i
    untouched = [i for i, (p, _, _) in enumerate(rows) if not p.processed]
    assert torch.equal(got[untouched], logits[untouched])  # rows without processing are bit-identical


def test_history_follows_chunks_and_starts_over_after_preemption():
    h = History()
    h.update(0, [1, 2, 3], num_prompt_tokens=5)
    h.update(3, [4, 5], num_prompt_tokens=5)  # the prompt's second chunk
    h.update(5, [9], num_prompt_tokens=5)  # a decode step: the token sampled last
    assert (h.tokens, h.tokens[h.num_prompt_tokens:]) == ([1, 2, 3, 4, 5, 9], [9])
    h.update(0, [1, 2, 3, 4, 5, 9], num_prompt_tokens=5)  # preempted and recomputed from the start
    assert h.tokens == [1, 2, 3, 4, 5, 9]


def test_min_p_keeps_tokens_within_the_ratio_of_the_top_one():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = apply_min_p(logits, torch.tensor([0.2]))  # threshold 0.1: drops 0.05
    assert torch.isinf(kept[0, 3]) and torch.isfinite(kept[0, :3]).all()
    assert torch.equal(apply_min_p(logits, torch.tensor([0.0])), logits)


def test_greedy_follows_the_processed_logits_and_logprobs_stay_raw():
    logits = torch.tensor([[0.0, 5.0, 4.0]])
    biased = SamplingParams(temperature=0, logit_bias={2: 2.0}, logprobs=1)
    tokens, lps = Sampler()(logits, [biased], [None], [None])
    assert tokens == [2]
    assert lps[0][2] == pytest.approx(float(logits.log_softmax(-1)[0, 2]))  # vLLM v1 returns raw logprobs
    presence = SamplingParams(temperature=0, presence_penalty=2.0)
    assert Sampler()(logits, [presence], [None], [History([1], 0)])[0] == [2]  # 5 - 2 < 4


def test_sampled_rows_never_draw_a_masked_token():
    gen = torch.Generator().manual_seed(0)
    p = SamplingParams(temperature=1.0, logit_bias={0: -100.0}, min_p=0.5)
    logits = torch.tensor([[3.0, 2.0, 2.0, -5.0]])
    draws = {Sampler(gen)(logits, [p], [None], [None])[0][0] for _ in range(200)}
    assert draws == {1, 2}  # 0 biased away, 3 below min_p: each of the rest is drawn


def test_the_offline_engine_applies_penalties_and_refuses_bad_ids():
    from parallel import LLM
    from tests.conftest import REPO

    llm = LLM(str(REPO / "models" / "tiny-code-llama"), dtype="float32", max_num_seqs=4)
    prompt = "def f(x):\n    return x"
    plain = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0))[0]
    rep = SamplingParams(max_tokens=24, temperature=0, frequency_penalty=2.0, presence_penalty=2.0)
    penalized = llm.generate([prompt], rep)[0]
    counts = {t: penalized.token_ids.count(t) for t in penalized.token_ids}
    assert penalized.token_ids != plain.token_ids
    assert max(counts.values()) <= max(plain.token_ids.count(t) for t in plain.token_ids)
    banned = plain.token_ids[0]
    biased = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, logit_bias={banned: -100}))[0]
    assert banned not in biased.token_ids
    both = llm.generate([prompt, prompt], [rep, SamplingParams(max_tokens=24, temperature=0)])
    assert [o.token_ids for o in both] == [penalized.token_ids, plain.token_ids]  # batching changes nothing
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate([prompt], SamplingParams(max_tokens=2, logit_bias={10**9: 1.0}))
