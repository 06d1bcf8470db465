"""Prompt validation: typed errors naming the field, and the O(1) length bound that refuses a huge text
without tokenizing it."""

from __future__ import annotations

import pickle

import pytest

from parallel.engine_messages import AddRequest, Msg, Rejected
from parallel.errors import (
    ContextLengthError,
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    RequestFailedError,
)
from parallel.inputs import encode_prompt
from parallel.sampling_params import SamplingParams
from parallel.tokenizer import Tokenizer, max_token_chars
from tests.conftest import REPO

MODEL = REPO / "models" / "tiny-code-llama"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_folder(MODEL)


def test_a_10_mib_prompt_is_refused_by_the_bound(tok, monkeypatch):
    def never(*_a, **_k):
        raise AssertionError("tokenized a prompt the bound already refused")

    monkeypatch.setattr(tok, "encode", never)
    with pytest.raises(ContextLengthError) as e:
        encode_prompt("x" * (10 << 20), tok, tok.vocab_size, 2048, param="messages")
    assert (e.value.param, e.value.code) == ("messages", "context_length_exceeded")


def test_the_bound_is_a_true_lower_bound(tok):
    assert tok.max_token_chars and tok.max_token_chars >= 1
    for text in ["def fibonacci(n):\n    return n", "a" * 5000, " " * 3000, "héllo wörld 日本語 🙂" * 50,
                 "".join(chr(c) for c in range(32, 3000))]:
        assert tok.min_tokens(text) <= len(tok.encode(text, add_special_tokens=False))


def test_just_under_the_bound_is_tokenized_and_checked_exactly(tok):
    with pytest.raises(ContextLengthError, match=r"has \d+ tokens"):  # an exact count, not "at least"
        encode_prompt("def f(): return 1\n" * 100, tok, tok.vocab_size, 64)
    assert encode_prompt("def f():", tok, tok.vocab_size, 64) == tok.encode("def f():")


@pytest.mark.parametrize("spec", [
    {"model": {"type": "WordPiece", "vocab": {"a": 0}}},  # a whole unknown word is one [UNK]
    {"model": {"type": "BPE", "vocab": {"a": 0}, "unk_token": "<unk>", "fuse_unk": True}},
    {"model": {"type": "BPE", "vocab": {"a": 0}}, "normalizer": {"type": "NFKC"}},  # may shrink the text
    {"model": {"type": "BPE", "vocab": {"a": 0}}, "pre_tokenizer": {"type": "Whitespace"}},  # drops spaces
    {"model": {"type": "BPE", "vocab": {"a": 0}},
     "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, {"type": "Strip"}]}},
])
def test_no_bound_where_it_is_not_provable(spec):
    assert max_token_chars({"added_tokens": [], **spec}) is None


def test_safe_pipelines_give_a_bound():
    spec = {"model": {"type": "BPE", "vocab": {"▁ab": 0, "c": 1}}, "added_tokens": [{"content": "<|endoftext|>"}],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
            "pre_tokenizer": {"type": "ByteLevel"}}
    assert max_token_chars(spec) == len("<|endoftext|>")


@pytest.mark.parametrize("prompt, param, error", [
    ([], "prompt", InvalidRequestError), ("", "prompt", InvalidRequestError),
    ([1, 999], "prompt", InvalidRequestError), ([1, True], "prompt", InvalidRequestError),
    ([1, -1], "input", InvalidRequestError), ([1] * 64, "prompt", ContextLengthError),
    (42, "prompt", InvalidRequestError),
])
def test_bad_prompts_name_the_field(prompt, param, error):
    with pytest.raises(error) as e:
        encode_prompt(prompt, None, 512, 64, param=param)
    assert e.value.param == param


def test_a_huge_id_list_is_refused_before_its_ids_are_read():
    with pytest.raises(ContextLengthError):
        encode_prompt([None] * 1_000_000, None, 512, 2048)  # type: ignore[list-item]


def test_errors_and_messages_survive_the_pipe():
    errors = [InvalidRequestError("bad", param="seed"), ContextLengthError("long", param="prompt"),
              RequestFailedError("failed"), EngineDeadError("dead"), EngineOverloadedError("busy", 2.5)]
    for err in errors:
        back = pickle.loads(pickle.dumps((Msg.REJECTED, Rejected("r1", err))))
        assert back[0] is Msg.REJECTED and type(back[1].error) is type(err)
        assert back[1].error.__dict__ == err.__dict__ and str(back[1].error) == str(err)
    assert pickle.loads(pickle.dumps(EngineOverloadedError("busy", 2.5))).retry_after_s == 2.5
    add = AddRequest("r1", [1, 2], SamplingParams(seed=3))
    assert pickle.loads(pickle.dumps((Msg.ADD, add))) == (Msg.ADD, add)
