"""Prompt validation shared by every engine, so bad input gets the same typed error everywhere."""

from __future__ import annotations

import dataclasses

from parallel.errors import ContextLengthError, InvalidRequestError
from parallel.sampling_params import SamplingParams
from parallel.tokenizer import Tokenizer


def _too_long(n: int, max_model_len: int, param: str, at_least: bool = False) -> ContextLengthError:
    count = f"at least {n}" if at_least else str(n)
    return ContextLengthError(f"{param} has {count} tokens, but the model's context length (max_model_len) is "
                              f"{max_model_len}: at most {max_model_len - 1} prompt tokens", param=param)


def encode_prompt(prompt: str | list[int], tokenizer: Tokenizer | None, vocab_size: int,
                  max_model_len: int, param: str = "prompt") -> list[int]:
    """Token ids of a text or token-id prompt; raises ``InvalidRequestError`` / ``ContextLengthError`` naming
    ``param``. A text too long to fit whatever its tokens are is refused before tokenizing (O(1)), and a
    token-id list before its ids are read. Thread-safe: reads only immutable facts.

    Example:
        >>> encode_prompt([1, 2, 3], None, vocab_size=10, max_model_len=8)
        [1, 2, 3]
    """
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError(f"{param} is empty", param=param)
        if tokenizer is None:
            raise InvalidRequestError("text prompts need a tokenizer (the engine was started with "
                                      "skip_tokenizer_init): send token ids", param=param)
        bound = tokenizer.min_tokens(prompt)
        if bound >= max_model_len:
            raise _too_long(bound, max_model_len, param, at_least=True)
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list | tuple):
        if not prompt:
            raise InvalidRequestError(f"{param} is empty", param=param)
        if len(prompt) >= max_model_len:
            raise _too_long(len(prompt), max_model_len, param)
        ids = list(prompt)
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(f"{param} token ids must be integers in [0, {vocab_size}), got {bad[:5]}",
                                      param=param)
    else:
        raise InvalidRequestError(f"{param} must be a string or a list of token ids, got {type(prompt).__name__}",
                                  param=param)
    if len(ids) >= max_model_len:
        raise _too_long(len(ids), max_model_len, param)
    return ids


def with_bad_words(params: SamplingParams, tokenizer: Tokenizer | None, vocab_size: int) -> SamplingParams:
    """``params`` with ``bad_words`` tokenised as vLLM does (``SamplingParams.update_from_tokenizer``): each
    word without and with a leading space (a word at the start of the text and inside it tokenise
    differently), the spaced form kept only where it is a different word of the same length. Idempotent.

    Example:
        >>> with_bad_words(SamplingParams(), None, 10).bad_words_token_ids
        ()
    """
    if not params.bad_words or params.bad_words_token_ids:
        return params
    if tokenizer is None:
        raise InvalidRequestError("bad_words need a tokenizer (the engine was started without one)",
                                  param="bad_words")
    words: list[tuple[int, ...]] = []
    for word in params.bad_words:
        for spaced in (False, True):
            ids = tuple(tokenizer.encode((" " if spaced else "") + word.lstrip(), add_special_tokens=False))
            if not ids:
                if not spaced:
                    raise InvalidRequestError(f"bad_words entry {word[:32]!r} tokenises to nothing",
                                              param="bad_words")
                continue
            if not spaced or (ids[0] != words[-1][0] and len(ids) == len(words[-1])):
                words.append(ids)
    bad = [t for w in words for t in w if t >= vocab_size]
    if bad:
        raise InvalidRequestError(f"bad_words tokenise to ids outside the vocabulary: {bad[:5]}", param="bad_words")
    return dataclasses.replace(params, bad_words_token_ids=tuple(words))
