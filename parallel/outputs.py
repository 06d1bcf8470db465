"""What the engine returns: ``OutputDelta``s while it runs (the unit every boundary carries), and, for the
offline API, whole ``RequestOutput``s shaped like vLLM's (``out.outputs[0].text``, shortcut ``out.text``)
accumulated once from the deltas by ``RequestOutputBuilder``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CompletionOutput:
    """A finished continuation (offline API)."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    logprobs: tuple[dict[int, float], ...] | None = None  # per generated token: {token id: logprob}
    cumulative_logprob: float | None = None
    stop_reason: str | int | None = None  # the stop string or stop token that ended it


@dataclass(frozen=True)
class RequestOutput:
    """One request's whole output (offline API).

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
    prompt_logprobs: tuple[dict[int, float] | None, ...] | None = None  # per prompt token; the first is None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return list(self.outputs[0].token_ids)

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


@dataclass(frozen=True, slots=True)
class OutputDelta:
    """What the engine added to one request since its previous delta: the unit that crosses every boundary
    (engine -> engine process pipe -> replica -> router). Sizes do not grow with the output's length;
    ``num_output_tokens`` is the running count (an int, not a copy).

    ``error`` is set (and ``finished`` true) when this request alone failed inside the engine.

    Example:
        >>> d = OutputDelta("r1", (5, 9), "ab", finished=False, num_prompt_tokens=3, num_output_tokens=2)
        >>> merge_deltas(d, OutputDelta("r1", (7,), "c", True, "length", num_output_tokens=3)).text
        'abc'
    """

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finished: bool
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: str | int | None = None
    logprobs: tuple[dict[int, float], ...] | None = None  # one entry per token of ``token_ids``
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # generated so far, including these
    num_cached_tokens: int = 0
    error: Exception | None = None  # a parallel.errors.EngineError for this request alone
    scheduled_at: float | None = None  # time.monotonic() when first scheduled; set on the first delta only
    # on the first delta, when asked for: one entry per prompt token ({token id: logprob} with the top
    # alternatives), None for the first token (nothing precedes it), as vLLM's RequestOutput.prompt_logprobs
    prompt_logprobs: tuple[dict[int, float] | None, ...] | None = None


def merge_deltas(first: OutputDelta, later: OutputDelta) -> OutputDelta:
    """One delta equivalent to ``first`` then ``later`` of the same request (a lagging consumer takes what
    is queued as one item, as vLLM's output collector does)."""
    lps = None
    if first.logprobs is not None or later.logprobs is not None:
        lps = (first.logprobs or ()) + (later.logprobs or ())
    return OutputDelta(later.request_id, first.token_ids + later.token_ids, first.text + later.text,
                       later.finished, later.finish_reason, later.stop_reason, lps, later.num_prompt_tokens,
                       later.num_output_tokens, later.num_cached_tokens, later.error,
                       first.scheduled_at if first.scheduled_at is not None else later.scheduled_at,
                       first.prompt_logprobs if first.prompt_logprobs is not None else later.prompt_logprobs)


def cumulative_logprob(logprobs: tuple[dict[int, float], ...] | list[dict[int, float]] | None,
                       token_ids: tuple[int, ...] | list[int]) -> float | None:
    """Sum of the chosen tokens' logprobs (None without logprobs)."""
    return sum(e[t] for e, t in zip(logprobs, token_ids, strict=False)) if logprobs else None


@dataclass
class RequestOutputBuilder:
    """Accumulates one request's deltas, once, into its whole RequestOutput (offline API, tests).

    Example:
        >>> b = RequestOutputBuilder("r1", None, (1, 2))
        >>> b.add(OutputDelta("r1", (5,), "a", False)); b.add(OutputDelta("r1", (6,), "b", True, "length"))
        >>> b.build().text
        'ab'
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    last: OutputDelta | None = None
    prompt_logprobs: tuple[dict[int, float] | None, ...] | None = None

    def add(self, delta: OutputDelta) -> None:
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        self.text.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs)
        self.last = delta

    def completion(self, index: int = 0, keep_logprobs: bool = True) -> CompletionOutput:
        last = self.last
        lps = tuple(self.logprobs) if self.logprobs is not None else None
        return CompletionOutput(
            index=index, text="".join(self.text), token_ids=tuple(self.token_ids),
            finish_reason=last.finish_reason if last is not None else None, logprobs=lps if keep_logprobs else None,
            cumulative_logprob=cumulative_logprob(lps, self.token_ids) if keep_logprobs else None,
            stop_reason=last.stop_reason if last is not None else None)

    def build(self, outputs: tuple[CompletionOutput, ...] | None = None) -> RequestOutput:
        """The whole output (``outputs``: several samples of this prompt, built from their own builders)."""
        last = self.last
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs or (self.completion(),),
                             last.finished if last is not None else False,
                             last.num_cached_tokens if last is not None else 0, self.prompt_logprobs)
