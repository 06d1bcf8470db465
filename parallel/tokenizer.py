"""The tokenizer of a Hugging Face folder, read with `tokenizers` (fast, no transformers import needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from parallel.models.loader import read_json

# Pieces of a tokenizer pipeline that never shrink the text (each input character survives as >= 1 character
# in what the model splits into tokens). Anything else (NFC/NFKC composition, Strip, a whitespace-splitting
# pre-tokenizer that drops spaces, WordPiece's whole-word [UNK]) voids the length bound below.
_SAFE_NORMALIZERS = {"Prepend", "Lowercase", "NFD", "NFKD"}
_SAFE_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts"}


def _token_str(value: object) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


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


class Tokenizer:
    """Encode/decode plus what a server needs: special ids, the chat template, a token-count lower bound.

    Example:
        >>> tok = Tokenizer.from_folder("models/tiny-code-llama")
        >>> tok.decode(tok.encode("def f():"), skip_special_tokens=True)
        'def f():'
        >>> tok.min_tokens("x" * 10_000_000) > 100_000   # a bound, computed without tokenizing
        True
    """

    def __init__(self, tokenizer: _HFTokenizer, config: dict, eos_token_ids: tuple[int, ...]) -> None:
        self._tok = tokenizer
        self.chat_template: str | None = config.get("chat_template")
        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        self.bos_token_id = tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        eos = tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        self.eos_token_ids = tuple(dict.fromkeys([*eos_token_ids, *([eos] if eos is not None else [])]))
        self.vocab_size = tokenizer.get_vocab_size()
        # Once per tokenizer (immutable afterwards, so reading it from many threads is safe).
        self.max_token_chars = max_token_chars(json.loads(tokenizer.to_str()))

    @classmethod
    def from_folder(cls, folder: str | Path, eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer.json not found in {str(folder)!r}; pass token-id prompts with skip_tokenizer_init=True")
        config = read_json(folder, "tokenizer_config.json", required=False)
        if not config.get("chat_template") and (Path(folder) / "chat_template.jinja").is_file():
            config["chat_template"] = (Path(folder) / "chat_template.jinja").read_text()
        return cls(_HFTokenizer.from_file(str(path)), config, eos_token_ids)

    def min_tokens(self, text: str) -> int:
        """A lower bound on ``len(self.encode(text))`` in O(1): ceil(len / max_token_chars), 0 without one."""
        if not self.max_token_chars:
            return 0
        return -(-len(text) // self.max_token_chars)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
