from __future__ import annotations

import json
import shutil

import pytest

from parallel import LLM
from parallel.config import EngineConfig


def test_missing_folder_config_and_weights(tmp_path, llama_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        LLM(str(tmp_path))
    shutil.copy(llama_path / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        LLM(str(tmp_path))


def test_unsupported_architecture(tmp_path, llama_path):
    shutil.copytree(llama_path, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported architecture.*GPT2LMHeadModel"):
        LLM(str(tmp_path / "m"), skip_tokenizer_init=True)


def test_sharded_checkpoint_with_index(tmp_path, llama_path, llama_llm):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_path)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    llm = LLM(str(tmp_path / "sharded"), skip_tokenizer_init=True, dtype="float32")
    prompt = [[1, 2, 3, 4]]
    assert llm.generate(prompt)[0].token_ids is not None
    import torch

    assert torch.equal(llm.engine.executor.prompt_logits(prompt[0]), llama_llm.engine.executor.prompt_logits(prompt[0]))


def test_missing_tokenizer_is_a_clear_error(llama_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json not found"):
        LLM(str(llama_path))


def test_config_validation():
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig.from_options("m", block_size=12)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig.from_options("m", tensor_parallel_size=0)
    with pytest.raises(ValueError, match="placement_strategy"):
        EngineConfig.from_options("m", tensor_parallel_size=2, placement_strategy="RANDOM")
    with pytest.raises(TypeError, match="unknown engine option 'bogus'"):
        EngineConfig.from_options("m", bogus=1)
    assert EngineConfig.from_options("m", kv_cache_memory_bytes=1 << 20).cache.kv_cache_memory_bytes == 1 << 20
    for alias in ("kv_cache_memory", "num_gpu_blocks_override", "speculative_model", "draft"):
        with pytest.raises(TypeError, match="unknown engine option"):  # one vocabulary: the field names
            EngineConfig.from_options("m", **{alias: 1})
    assert EngineConfig.from_options("m").scheduler.max_num_seqs == 32  # the one stated default


def test_tensor_parallel_size_must_divide_the_heads(llama_path):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide num_attention_heads=4, "
                                         r"intermediate_size=160, num_key_value_heads=2"):
        LLM(str(llama_path), skip_tokenizer_init=True, tensor_parallel_size=3)
