"""What the engine returns, shaped like vLLM's outputs (``out.outputs[0].text``) with shortcuts (``out.text``)."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class CompletionOutput:
    """The generated continuation so far. ``delta_*`` hold what is new since the previous output."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    delta_text: str = ""
    delta_token_ids: tuple[int, ...] = ()
    logprobs: tuple[dict[int, float], ...] | None = None  # per generated token: {token id: logprob}
    cumulative_logprob: float | None = None
    stop_reason: str | int | None = None  # the stop string or stop token that ended it


@dataclass(frozen=True)
class RequestOutput:
    """One request's output.

    Example:
        >>> out = LLM("models/tiny-code-llama").generate(["def f():"], SamplingParams(max_tokens=8))[0]
        >>> out.text == out.outputs[0].text
        True
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    outputs: tuple[CompletionOutput, ...]
    finished: bool
    num_cached_tokens: int = 0

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return list(self.outputs[0].token_ids)

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


def merge_outputs(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One output equivalent to ``first`` then ``later`` of the same request: cumulative fields from ``later``,
    deltas concatenated. A consumer that fell behind takes everything queued as one item (as vLLM's output
    collector does), so a busy server sends fewer, larger chunks instead of falling further behind."""
    a, b = first.outputs[0], later.outputs[0]
    merged = replace(b, delta_text=a.delta_text + b.delta_text, delta_token_ids=a.delta_token_ids + b.delta_token_ids)
    return replace(later, outputs=(merged, *later.outputs[1:]))


def cumulative_logprob(logprobs: tuple[dict[int, float], ...] | list[dict[int, float]] | None,
                       token_ids: tuple[int, ...] | list[int]) -> float | None:
    """Sum of the chosen tokens' logprobs (None without logprobs)."""
    return sum(e[t] for e, t in zip(logprobs, token_ids, strict=False)) if logprobs else None
