"""SamplingParams are bounded to what the engine can hold: out of range -> InvalidRequestError naming the
field; extreme but valid values run."""

from __future__ import annotations

import math

import pytest

from parallel import SamplingParams
from parallel.errors import InvalidRequestError

BAD = [
    ("seed", 2**64), ("seed", 1180591620717411303424), ("seed", -(2**63) - 1), ("seed", 1.5), ("seed", True),
    ("top_k", 2**63), ("top_k", 2**31), ("top_k", -2), ("top_k", 3.0),
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -0.5), ("temperature", 1e5),
    ("temperature", "1"),
    ("top_p", math.nan), ("top_p", 0.0), ("top_p", 1.5), ("top_p", -math.inf),
    ("max_tokens", 0), ("max_tokens", 2**31), ("max_tokens", 2**64), ("max_tokens", 3.0),
    ("logprobs", 21), ("logprobs", -1), ("logprobs", 2**70),
    ("min_tokens", -1), ("min_tokens", 17),
    ("stop", [""]), ("stop", [3]), ("stop", 5),
    ("stop_token_ids", [-1]), ("stop_token_ids", [2**63]), ("stop_token_ids", ["a"]), ("stop_token_ids", 7),
    ("n", 0), ("n", 129), ("best_of", 0), ("prompt_logprobs", 21), ("bad_words", [""]), ("ignore_eos", "yes"),
]


@pytest.mark.parametrize("field, value", BAD, ids=[f"{f}={v!r}"[:40] for f, v in BAD])
def test_out_of_range_names_the_field(field, value):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field and isinstance(e.value, ValueError)


def test_bounds_admit_the_extremes():
    for seed in (2**63 - 1, -(2**63), 0):
        assert SamplingParams(seed=seed).seed == seed
    SamplingParams(top_k=2**31 - 1, max_tokens=2**31 - 1, temperature=1e4, logprobs=20, stop="x",
                   stop_token_ids=[2**31 - 1])


def test_extreme_seeds_and_top_k_run_in_the_engine(llama_llm):
    """What used to kill the engine process inside a step: a seed torch refuses, a top_k beyond int64."""
    prompt = [[1, 7, 9]]
    runs = {}
    for seed in (2**63 - 1, -(2**63)):
        p = SamplingParams(max_tokens=6, temperature=1.0, seed=seed, top_k=2**31 - 1, ignore_eos=True)
        runs[seed] = llama_llm.generate(prompt, p)[0].token_ids
        assert runs[seed] == llama_llm.generate(prompt, p)[0].token_ids  # seeded: reproducible
        assert len(runs[seed]) == 6
    # top_k above the vocabulary is "off": the same draws as no top_k at all
    off = SamplingParams(max_tokens=6, temperature=1.0, seed=5, ignore_eos=True)
    big = SamplingParams(max_tokens=6, temperature=1.0, seed=5, top_k=10_000, ignore_eos=True)
    assert llama_llm.generate(prompt, off)[0].token_ids == llama_llm.generate(prompt, big)[0].token_ids
