from __future__ import annotations

from parallel.detokenizer import IncrementalDetokenizer
from parallel.sampling_params import SamplingParams
from parallel.tokenizer import Tokenizer


def _stream(tok: Tokenizer, text: str, params: SamplingParams) -> tuple[list[str], IncrementalDetokenizer]:
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, tok.encode("x"), params)
    deltas = []
    for i in ids:
        d.push([i])
        deltas.append(d.take_delta(False))
        if d.stop_reason:
            break
    deltas.append(d.take_delta(True))
    return deltas, d


def test_never_emits_half_a_character(byte_tokenizer_folder):
    tok = Tokenizer.from_folder(byte_tokenizer_folder)
    text = "naïve 日本語 🙂 café"
    ids = tok.encode(text, add_special_tokens=False)
    # Byte-level BPE splits some of these characters across tokens: decoding them one by one breaks.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas, d = _stream(tok, text, SamplingParams())
    assert "".join(deltas) == d.text == text
    assert not any("\ufffd" in x for x in deltas)


def test_stop_string_truncates_and_is_held_back(byte_tokenizer_folder):
    tok = Tokenizer.from_folder(byte_tokenizer_folder)
    deltas, d = _stream(tok, "def fibonacci(n):\n    return n", SamplingParams(stop=["return"]))
    assert d.stop_reason == "return"
    assert d.text == "def fibonacci(n):\n    "
    assert "".join(deltas) == d.text
    _, kept = _stream(tok, "def fibonacci(n):\n    return n",
                      SamplingParams(stop=["return"], include_stop_str_in_output=True))
    assert kept.text == "def fibonacci(n):\n    return"


def test_tokenizer_special_ids_and_missing_file(byte_tokenizer_folder, tmp_path):
    tok = Tokenizer.from_folder(byte_tokenizer_folder)
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    assert tok.encode("a")[0] == 1
    import pytest

    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_folder(tmp_path)
