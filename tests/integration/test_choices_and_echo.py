"""n, best_of, several prompts, echo with prompt logprobs and bad_words, with the official openai client, on
both engines, unary and streamed (issue 16). References: the same engine's single requests (vLLM's seed + j
rule for sample j), transformers' log-probabilities on the same weights, vLLM's greedy output."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.integration.conftest import TARGET

ENGINES = ["native", "vllm"]
CODE = "def fibonacci(n):"
OTHER = "class Stack:\n    def"


@pytest.fixture()
def oai(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf_model():
    return AutoModelForCausalLM.from_pretrained(TARGET, dtype=torch.float32).eval()


def tokenize(oai: openai.OpenAI, engine: str, prompt: str) -> list[int]:
    root = str(oai.base_url).removesuffix("/").removesuffix("/v1")
    return httpx.post(f"{root}/tokenize", json={"model": engine, "prompt": prompt}, timeout=60).json()["tokens"]


def one(oai: openai.OpenAI, engine: str, prompt, seed: int, **kw) -> str:
    return oai.completions.create(model=engine, prompt=prompt, max_tokens=8, temperature=0.9, seed=seed,
                                  **kw).choices[0].text


@pytest.mark.parametrize("engine", ENGINES)
def test_n_samples_of_several_prompts_are_indexed_and_counted(oai, engine):
    r = oai.completions.create(model=engine, prompt=[CODE, OTHER], n=2, max_tokens=8, temperature=0.9, seed=11)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    by = {c.index: c.text for c in r.choices}
    # prompt i, sample j -> index i * n + j; sample j is a request with seed + j (vLLM's rule)
    assert by[0] == one(oai, engine, CODE, 11) and by[1] == one(oai, engine, CODE, 12)
    assert by[2] == one(oai, engine, OTHER, 11) and by[3] == one(oai, engine, OTHER, 12)
    assert by[0] != by[1]
    singles = [oai.completions.create(model=engine, prompt=p, max_tokens=8, temperature=0.9, seed=11).usage
               for p in (CODE, OTHER)]
    assert r.usage.prompt_tokens == sum(u.prompt_tokens for u in singles)  # each prompt counted once
    assert r.usage.completion_tokens == 4 * 8


@pytest.mark.parametrize("engine", ENGINES)
def test_streamed_choices_equal_the_unary_ones(oai, engine):
    kw = {"model": engine, "prompt": [CODE, OTHER], "n": 2, "max_tokens": 8, "temperature": 0.9, "seed": 5}
    unary = oai.completions.create(**kw)
    texts: dict[int, str] = {}
    finished, usage = set(), None
    for event in oai.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        for c in event.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason is not None:
                finished.add(c.index)
        if event.usage is not None and not event.choices:
            usage = event.usage
    assert texts == {c.index: c.text for c in unary.choices} and finished == {0, 1, 2, 3}
    assert usage is not None and usage.completion_tokens == unary.usage.completion_tokens == 32
    assert usage.prompt_tokens == unary.usage.prompt_tokens


@pytest.mark.parametrize("engine", ENGINES)
def test_chat_n_streamed_and_unary(oai, engine):
    kw = {"model": engine, "messages": [{"role": "user", "content": "hi"}], "n": 3, "max_tokens": 6,
          "temperature": 1.0, "seed": 3}
    unary = oai.chat.completions.create(**kw)
    assert [c.index for c in unary.choices] == [0, 1, 2] and unary.usage.completion_tokens == 18
    texts: dict[int, str] = {}
    roles = set()
    for event in oai.chat.completions.create(**kw, stream=True):
        for c in event.choices:
            roles |= {c.index} if c.delta.role == "assistant" else set()
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert roles == {0, 1, 2} and texts == {c.index: c.message.content for c in unary.choices}


@pytest.mark.parametrize("engine", ENGINES)
def test_best_of_returns_the_candidates_with_the_highest_mean_logprob(oai, engine):
    kw = {"model": engine, "prompt": CODE, "max_tokens": 6, "temperature": 1.0, "seed": 21}
    candidates = oai.completions.create(**kw, n=4, logprobs=0).choices
    mean = {c.text: sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in candidates}
    best = oai.completions.create(**kw, n=2, best_of=4)
    assert [c.text for c in best.choices] == sorted(mean, key=lambda t: -mean[t])[:2]
    assert best.choices[0].logprobs is None  # not asked for: the ranking's logprobs are not returned
    assert best.usage.completion_tokens == 4 * 6  # every candidate's tokens were generated
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(**kw, n=1, best_of=2, stream=True)


@pytest.mark.parametrize("engine", ENGINES)
def test_echo_scores_the_prompt_as_transformers_does(oai, engine, hf_model):
    prompt = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)"
    r = oai.completions.create(model=engine, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    c = r.choices[0]
    assert c.text == prompt and r.usage.completion_tokens == 0
    lp = c.logprobs
    assert len(lp.tokens) == r.usage.prompt_tokens and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ids = tokenize(oai, engine, prompt)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    expected = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], expected, strict=True)) < 1e-3
    for tok_lp, top, i in zip(lp.token_logprobs[1:], lp.top_logprobs[1:], range(1, len(ids)), strict=True):
        assert math.isclose(max(top.values()), ref[i - 1].max().item(), abs_tol=1e-3)  # top-1 alternative
        assert tok_lp <= max(top.values()) + 1e-6


@pytest.mark.parametrize("engine", ENGINES)
def test_echo_of_token_prompts_with_generation_unary_and_streamed(oai, engine):
    ids = tokenize(oai, engine, CODE)
    kw = {"model": engine, "prompt": [ids, ids[:3]], "max_tokens": 5, "echo": True, "logprobs": 0,
          "temperature": 0}
    r = oai.completions.create(**kw)
    plain = oai.completions.create(model=engine, prompt=ids, max_tokens=5, temperature=0).choices[0].text
    first = r.choices[0]
    assert first.text.endswith(plain) and CODE in first.text
    assert len(first.logprobs.tokens) == len(ids) + 5 and first.logprobs.token_logprobs[0] is None
    streamed: dict[int, str] = {}
    lps: dict[int, list] = {}
    for event in oai.completions.create(**kw, stream=True):
        for c in event.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
            lps.setdefault(c.index, []).extend(c.logprobs.token_logprobs if c.logprobs else [])
    assert streamed == {c.index: c.text for c in r.choices}
    unary_lps = first.logprobs.token_logprobs
    assert lps[0][0] is None and unary_lps[0] is None  # (batch shapes differ between runs: float rounding)
    assert max(abs(a - b) for a, b in zip(lps[0][1:], unary_lps[1:], strict=True)) < 1e-4


def test_bad_words_match_vllm_and_remove_the_word(oai):
    plain = oai.completions.create(model="native", prompt=CODE, max_tokens=16, temperature=0).choices[0].text
    word = plain.split()[0]
    texts = [oai.completions.create(model=e, prompt=CODE, max_tokens=16, temperature=0,
                                    extra_body={"bad_words": [word]}).choices[0].text for e in ENGINES]
    assert texts[0] == texts[1] and texts[0] != plain
    assert not texts[0].lstrip().startswith(word)
