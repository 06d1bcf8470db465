"""Engine logprobs ({token id: logprob}) as the token strings an OpenAI response shows.

Example:
    >>> from parallel.tokenizer import Tokenizer
    >>> tok = Tokenizer.from_folder("models/tiny-code-llama")
    >>> ids = tok.encode("def f():", add_special_tokens=False)
    >>> Render(tok).entry({ids[0]: -0.5}, ids[0]).logprob
    -0.5
"""

from __future__ import annotations

from dataclasses import dataclass

from deployments.messages import TokenLogprob
from parallel.tokenizer import Tokenizer


@dataclass(frozen=True)
class Render:
    """Renders one replica's logprobs with its tokenizer (token ids as strings without one)."""

    tokenizer: Tokenizer | None

    def piece(self, t: int) -> str:
        return self.tokenizer.decode([t], skip_special_tokens=False) if self.tokenizer else str(t)

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if self.tokenizer else ""

    def entry(self, e: dict[int, float], t: int) -> TokenLogprob:
        """Token ``t``'s logprob and the alternatives, most likely first."""
        return TokenLogprob(self.piece(t), e.get(t, float("-inf")),
                            tuple((self.piece(a), lp) for a, lp in sorted(e.items(), key=lambda kv: -kv[1])))

    def tokens(self, entries: tuple[dict[int, float], ...], ids: tuple[int, ...]) -> tuple[TokenLogprob, ...]:
        return tuple(self.entry(e, t) for e, t in zip(entries, ids, strict=False))

    def prompt(self, ids: list[int], entries: tuple[dict[int, float] | None, ...]) -> tuple[TokenLogprob, ...]:
        """The first prompt token has no logprob (nothing precedes it): NaN here, null in the response."""
        return tuple(TokenLogprob(self.piece(t), float("nan")) if e is None else self.entry(e, t)
                     for e, t in zip(entries, ids, strict=False))
