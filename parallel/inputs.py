"""Prompt validation shared by every engine, so bad input gets the same clear ValueError everywhere."""

from __future__ import annotations

from parallel.tokenizer import Tokenizer


def encode_prompt(prompt: str | list[int], tokenizer: Tokenizer | None, vocab_size: int,
                  max_model_len: int) -> list[int]:
    """Token ids of a text or token-id prompt; raises ValueError saying what is wrong.

    Example:
        >>> encode_prompt([1, 2, 3], None, vocab_size=10, max_model_len=8)
        [1, 2, 3]
    """
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty")
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer (the engine was started with skip_tokenizer_init)")
        ids = tokenizer.encode(prompt)
    else:
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab_size}), got {bad[:5]}")
    if len(ids) >= max_model_len:
        raise ValueError(f"prompt has {len(ids)} tokens, but the model's context length (max_model_len) is "
                         f"{max_model_len}: at most {max_model_len - 1} prompt tokens")
    return ids
