"""Fixtures shared by every test layer: small random-init Hugging Face models saved locally, a tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

_COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
               max_position_embeddings=256, initializer_range=0.1, bos_token_id=1, eos_token_id=2)

# name -> (transformers class names, config overrides): GQA, tied and untied, q/k/v bias, rope scaling.
RANDOM_MODELS = {
    "llama-gqa-llama3rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama-tied-linearrope": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0})),
    "mistral-gqa": ("MistralConfig", "MistralForCausalLM", dict(
        num_attention_heads=8, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False, sliding_window=None)),
    "qwen2-bias-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)),
}


def make_random_model(folder: Path, name: str, seed: int = 0) -> Path:
    import transformers

    config_cls, model_cls, extra = RANDOM_MODELS[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**_COMMON, **extra})
    model = getattr(transformers, model_cls)(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def random_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("random-models")
    return {name: make_random_model(root / name, name) for name in RANDOM_MODELS}


@pytest.fixture(scope="session")
def llama_path(random_models: dict[str, Path]) -> Path:
    return random_models["llama-gqa-llama3rope"]


@pytest.fixture(scope="session")
def hf_llama(llama_path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="session")
def llama_llm(llama_path: Path):
    from parallel import LLM

    return LLM(str(llama_path), skip_tokenizer_init=True, dtype="float32", max_num_batched_tokens=256)


@pytest.fixture(scope="session")
def byte_tokenizer_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer trained in a second on text with multi-byte characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder = tmp_path_factory.mktemp("tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["def fibonacci(n):\n    return n", "héllo wörld, naïve café", "日本語のテキスト", "emoji 🙂 ok"] * 50
    tok.train_from_iterator(text, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    return folder
