"""Prompt validation shared by every engine, so bad input gets the same typed error everywhere."""

from __future__ import annotations

from parallel.errors import ContextLengthError, InvalidRequestError
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
