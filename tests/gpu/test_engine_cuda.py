"""The native engine on CUDA: same logits as transformers on the GPU, same greedy tokens as on the CPU."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from parallel import LLM, SamplingParams

PROMPTS = [[1, 17, 300, 42, 9], [1, *range(20, 80)], [1, 5]]


def test_cuda_float32_logits_match_transformers(llama_path):
    llm = LLM(str(llama_path), skip_tokenizer_init=True, dtype="float32", device="cuda")
    hf = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32).cuda().eval()
    for prompt in PROMPTS:
        ours = llm.engine.executor.prompt_logits(prompt)
        with torch.no_grad():
            ref = hf(torch.tensor([prompt], device="cuda")).logits[0].float()
        assert (ours - ref).abs().max().item() <= 1e-3


def test_cuda_greedy_equals_cpu(llama_path, llama_llm):
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    gpu = LLM(str(llama_path), skip_tokenizer_init=True, dtype="float32", device="cuda")
    cpu = llama_llm.generate(PROMPTS, params)
    assert [o.token_ids for o in gpu.generate(PROMPTS, params)] == [o.token_ids for o in cpu]


def test_cuda_bfloat16_serves(llama_path):
    llm = LLM(str(llama_path), skip_tokenizer_init=True, dtype="bfloat16", device="cuda")
    out = llm.generate(PROMPTS, SamplingParams(max_tokens=8, ignore_eos=True))
    assert all(len(o.token_ids) == 8 for o in out)
