"""Our model and engine against Hugging Face transformers on the same weights (float32)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from parallel import LLM, SamplingParams
from parallel.config import EngineConfig
from parallel.engine import LLMEngine

PROMPTS = [
    [1, 17, 300, 42, 9],
    [1, 5],
    [1, *range(20, 80)],
    [1, 400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411],
]


def _hf(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["llama-gqa-llama3rope", "llama-tied-linearrope", "mistral-gqa", "qwen2-bias-tied"])
def test_logits_match_transformers(random_models, name):
    path = random_models[name]
    engine = LLMEngine(EngineConfig.from_options(str(path), skip_tokenizer_init=True, dtype="float32"))
    hf = _hf(path)
    for prompt in PROMPTS:
        ours = engine.executor.prompt_logits(prompt)
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0].float()
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= 1e-4, name


@pytest.mark.parametrize("name", ["llama-gqa-llama3rope", "qwen2-bias-tied"])
def test_greedy_single_prompt_matches_transformers(random_models, name):
    path = random_models[name]
    llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32")
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == _hf_greedy(_hf(path), PROMPTS[0], 24)
    assert out.finish_reason == "length"


@pytest.mark.parametrize("name", ["llama-gqa-llama3rope", "mistral-gqa"])
def test_greedy_batch_of_mixed_lengths_matches_transformers(random_models, name):
    path = random_models[name]
    # A small token budget forces chunked prefill of the long prompt alongside other requests' decodes.
    llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", max_num_batched_tokens=32, block_size=8)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    hf = _hf(path)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == _hf_greedy(hf, prompt, 20)


def test_bfloat16_runs_and_mostly_agrees(llama_path, llama_llm):
    llm16 = LLM(str(llama_path), skip_tokenizer_init=True, dtype="bfloat16")
    a = llm16.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    b = llama_llm.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert len(a.token_ids) == 8
    assert a.token_ids[0] == b.token_ids[0]
