"""The tokenizer of a Hugging Face folder, exactly as ``transformers.AutoTokenizer`` builds it.

vLLM tokenizes with AutoTokenizer, and transformers 5 does not always trust tokenizer.json: a tokenizer class
with its own ``__init__`` (``Qwen2Tokenizer``, ``LlamaTokenizer``, ...) keeps only the vocabulary, merges and
post-processor from the file and rebuilds the normalizer, pre-tokenizer and decoder from the class
definition. Reading tokenizer.json directly therefore split text differently from vLLM (a Qwen2 folder
whose tokenizer.json pre-tokenizer is not Qwen2's: digits grouped, no NFC). So the folder is loaded once
with AutoTokenizer (local files only) and its Rust backend is used per request: the same ids, at the speed
of ``tokenizers``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Pieces of a tokenizer pipeline that never shrink the text (each input character survives as >= 1 character
# in what the model splits into tokens). Anything else (NFC/NFKC composition, Strip, a whitespace-splitting
# pre-tokenizer that drops spaces, WordPiece's whole-word [UNK]) voids the length bound below.
_SAFE_NORMALIZERS = {"Prepend", "Lowercase", "NFD", "NFKD"}
_SAFE_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts"}


def _keeps_length(part: dict[str, Any] | None, safe: set[str]) -> bool:
    if part is None:
        return True
    kind = part.get("type")
    if kind == "Sequence":
        items = part.get("normalizers") or part.get("pretokenizers") or []
        return all(_keeps_length(p, safe) for p in items)
    if kind == "Replace":  # a literal pattern replaced by content at least as long
        pattern = part.get("pattern", {}).get("String")
        return pattern is not None and len(part.get("content", "")) >= len(pattern)
    if kind == "Split":
        return part.get("behavior") != "Removed"
    return kind in safe


def max_token_chars(spec: dict[str, Any]) -> int | None:
    """The most input characters one token can cover, or None when no such bound is provable.

    A BPE token is matched against the normalized, pre-tokenized text, where each input character is at least
    one character (one byte-level symbol per byte, "▁" per space); so a token covers at most as many input
    characters as its vocabulary string has, and added tokens match their content verbatim. Hence a text of
    n characters has at least ceil(n / L) tokens, which lets a huge prompt be refused without tokenizing it.

    Example:
        >>> max_token_chars({"model": {"type": "BPE", "vocab": {"a": 0, "abc": 1}}, "added_tokens": []})
        3
    """
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (model.get("unk_token") and model.get("fuse_unk")):
        return None  # fused unknowns (and WordPiece/Unigram unknown words) make one token of any length
    if not _keeps_length(spec.get("normalizer"), _SAFE_NORMALIZERS):
        return None
    if not _keeps_length(spec.get("pre_tokenizer"), _SAFE_PRE_TOKENIZERS):
        return None
    lengths = [len(s) for s in model.get("vocab", {})]
    lengths += [len(t.get("content", "")) for t in spec.get("added_tokens") or []]
    return max(lengths, default=0) or None


# Files AutoTokenizer builds a tokenizer from. Without one, transformers 5 would build an empty default
# tokenizer for some classes (Qwen2Tokenizer's vocabulary is then one token) instead of failing.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tekken.json", "vocab.json", "vocab.txt")
# What a transformers tokenizer class may override to tokenize or decode differently from its Rust backend
# (CodeLlama's infilling, CodeGen's decode truncation): such a class is called itself, not its backend.
_PER_CALL_METHODS = ("__call__", "encode", "_encode_plus", "tokenize", "decode", "_decode")


def _load_auto_tokenizer(folder: Path, trust_remote_code: bool) -> Any:
    # Imported here: transformers costs seconds to import, paid once by a process that loads a tokenizer.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code)


def _backend_of(hf: Any) -> Any | None:
    """The Rust ``tokenizers.Tokenizer`` that does all of ``hf``'s encoding and decoding, or None where the
    class adds Python behaviour of its own (or has no Rust backend at all)."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    if not isinstance(hf, TokenizersBackend):
        return None
    if any(getattr(type(hf), m) is not getattr(TokenizersBackend, m) for m in _PER_CALL_METHODS):
        return None
    return hf.backend_tokenizer


class Tokenizer:
    """Encode/decode plus what a server needs: special ids, the chat template, a token-count lower bound.

    Ids and text equal ``AutoTokenizer.from_pretrained(folder)``'s ``encode`` / ``decode`` (its defaults: no
    truncation, no padding, special-token strings in the text matched as special tokens).

    Example:
        >>> tok = Tokenizer.from_folder("models/tiny-code-llama")
        >>> tok.decode(tok.encode("def f():"), skip_special_tokens=True)
        'def f():'
        >>> tok.min_tokens("x" * 10_000_000) > 100_000   # a bound, computed without tokenizing
        True
    """

    def __init__(self, hf: Any, eos_token_ids: tuple[int, ...] = ()) -> None:
        self._hf = hf
        self._tok = _backend_of(hf)
        if self._tok is not None:
            # AutoTokenizer's encode turns off truncation and padding a tokenizer.json may carry; once here,
            # so the backend is never mutated per call (it is shared by the replica's threads).
            self._tok.no_truncation()
            self._tok.no_padding()
        template = hf.chat_template
        self.chat_template: str | None = template.get("default") if isinstance(template, dict) else template
        self.bos_token: str | None = hf.bos_token
        self.eos_token: str | None = hf.eos_token
        vocab = hf.get_vocab()  # not convert_tokens_to_ids: that answers the unknown token's id for a stranger
        self.bos_token_id = vocab.get(self.bos_token) if self.bos_token else None
        eos = vocab.get(self.eos_token) if self.eos_token else None
        self.eos_token_ids = tuple(dict.fromkeys([*eos_token_ids, *([eos] if eos is not None else [])]))
        self.vocab_size: int = self._tok.get_vocab_size() if self._tok is not None else len(hf)
        # transformers cleans decoded text up (spaces before punctuation) only when the folder asks for it
        # and the model is not BPE, where the clean-up corrupts text; the same rule here.
        self._clean_up = bool(getattr(hf, "clean_up_tokenization_spaces", False)) and self._tok is not None and (
            type(self._tok.model).__name__ != "BPE"
            or getattr(hf, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))
        # Once per tokenizer (immutable afterwards, so reading it from many threads is safe).
        self.max_token_chars = max_token_chars(json.loads(self._tok.to_str())) if self._tok is not None else None

    @classmethod
    def from_folder(cls, folder: str | Path, eos_token_ids: tuple[int, ...] = (),
                    trust_remote_code: bool = False) -> Tokenizer:
        """The folder's tokenizer as AutoTokenizer loads it, from local files only (never the Hub)."""
        path = Path(folder)
        if not any((path / name).is_file() for name in _TOKENIZER_FILES):
            raise FileNotFoundError(
                f"tokenizer.json not found in {str(folder)!r} (nor {', '.join(_TOKENIZER_FILES[1:])}); "
                "pass token-id prompts with skip_tokenizer_init=True")
        return cls(_load_auto_tokenizer(path, trust_remote_code), eos_token_ids)

    def min_tokens(self, text: str) -> int:
        """A lower bound on ``len(self.encode(text))`` in O(1): ceil(len / max_token_chars), 0 without one."""
        if not self.max_token_chars:
            return 0
        return -(-len(text) // self.max_token_chars)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._tok is None:
            return self._hf.encode(text, add_special_tokens=add_special_tokens)
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._tok is None:
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._hf.clean_up_tokenization(text) if self._clean_up else text
