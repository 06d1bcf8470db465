"""Parallel sampling above the engine (n, best_of), prompt logprobs computed in prefill, and bad words, on the
offline LLM API against references: transformers' log-probabilities on the same weights, the engine's own
single requests (vLLM's seed + j rule), vLLM's bad-word tokenisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from parallel.errors import InvalidRequestError
from parallel.inputs import with_bad_words
from parallel.llm import LLM
from parallel.penalties import History, banned_tokens
from parallel.sampling_params import SamplingParams
from parallel.tokenizer import Tokenizer

MODEL = str(Path(__file__).resolve().parents[3] / "models" / "tiny-code-llama")
PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(MODEL, dtype="float32", enable_prefix_caching=True, max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    """transformers' log-softmax over every position of PROMPT (fp32)."""
    hf = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    ids = Tokenizer.from_folder(MODEL).encode(PROMPT)
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_prompt_logprobs_equal_transformers_across_prefill_chunks(llm, reference):
    ids = llm.get_tokenizer().encode(PROMPT)
    assert len(ids) > 2 * 16  # several prefill chunks of 16 tokens: the pending-row hand-over is exercised
    for _ in range(2):  # the second run would hit the prefix cache: prompt logprobs must bypass it
        out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3))[0]
        pl = out.prompt_logprobs
        assert pl is not None and len(pl) == len(ids) and pl[0] is None
        for i in range(1, len(ids)):
            assert abs(pl[i][ids[i]] - reference[i - 1, ids[i]].item()) < 1e-4
            top = reference[i - 1].topk(3)
            for lp, t in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                assert abs(pl[i][t] - lp) < 1e-4  # the top alternatives, as vLLM returns them
            assert len(pl[i]) in (3, 4)  # top 3, plus the prompt token where it is not among them


def test_n_samples_follow_the_seed_plus_j_rule(llm):
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=123, n=3)
    out = llm.generate(["import os"], params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for j, c in enumerate(out.outputs):
        single = llm.generate(["import os"], SamplingParams(max_tokens=10, temperature=1.0, seed=123 + j))[0]
        assert c.token_ids == single.outputs[0].token_ids
    assert len({c.token_ids for c in out.outputs}) > 1


def test_best_of_keeps_the_highest_mean_logprob(llm):
    kw = {"max_tokens": 8, "temperature": 1.0, "seed": 9}
    every = llm.generate(["x = "], SamplingParams(**kw, n=5, logprobs=0))[0].outputs
    mean = [c.cumulative_logprob / len(c.token_ids) for c in every]
    best = llm.generate(["x = "], SamplingParams(**kw, n=2, best_of=5))[0].outputs
    want = sorted(range(5), key=lambda k: -mean[k])[:2]
    assert [c.token_ids for c in best] == [every[k].token_ids for k in want]
    assert best[0].logprobs is None  # not asked for


def test_an_engine_request_is_one_sequence():
    from parallel.config import EngineConfig
    from parallel.engine import LLMEngine

    engine = LLMEngine(EngineConfig.from_options(MODEL, dtype="float32"))
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request("r", "x", SamplingParams(n=2))
    assert e.value.param == "n"


@pytest.mark.parametrize("words", [["fibonacci"], [" return"], ["def f", "os.path"], ["   return x"]])
def test_bad_words_tokenise_as_vllm_does(words):
    from vllm import SamplingParams as VllmParams
    from vllm.tokenizers.registry import get_tokenizer

    ours = with_bad_words(SamplingParams(bad_words=tuple(words)), Tokenizer.from_folder(MODEL), 10**6)
    theirs = VllmParams(bad_words=words)
    theirs.update_from_tokenizer(get_tokenizer(MODEL))
    assert [list(w) for w in ours.bad_words_token_ids] == theirs._bad_words_token_ids


def test_banned_tokens_follow_the_output_so_far():
    h = History([7, 8, 1, 2], num_prompt_tokens=2)  # prompt 7 8, output 1 2
    assert banned_tokens(((5,),), h) == [5]  # one token: always
    assert banned_tokens(((2, 9), (3, 9), (1, 2, 4)), h) == [9, 4]  # the rest of the word ends the output
    assert banned_tokens(((8, 1, 9),), h) == []  # the prompt does not count (vLLM: output tokens only)


def test_a_bad_word_of_nothing_is_refused():
    with pytest.raises(InvalidRequestError) as e:
        with_bad_words(SamplingParams(bad_words=("\n   ",)), Tokenizer.from_folder(MODEL), 10**6)
    assert e.value.param == "bad_words"


def test_bad_words_never_appear_greedy(llm):
    plain = llm.generate(["def f():"], SamplingParams(max_tokens=16, temperature=0))[0]
    word = llm.get_tokenizer().decode(list(plain.token_ids[1:3]))
    out = llm.generate(["def f():"], SamplingParams(max_tokens=16, temperature=0, bad_words=(word,)))[0]
    banned = with_bad_words(SamplingParams(bad_words=(word,)), llm.get_tokenizer(), 10**6).bad_words_token_ids
    assert out.token_ids != plain.token_ids
    for w in banned:
        n = len(w)
        assert all(tuple(out.token_ids[i:i + n]) != w for i in range(len(out.token_ids) - n + 1))
