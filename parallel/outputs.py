"""What the engine returns, shaped like vLLM's outputs (``out.outputs[0].text``) with shortcuts (``out.text``)."""

from __future__ import annotations

from dataclasses import dataclass


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
