"""What crosses from the scheduler to the model runner and back each step: immutable values only, so the
runner (in this process or on a tensor-parallel rank) never imports or touches the scheduler.

Example:
    >>> out = SchedulerOutput(scheduled=(), finished_request_ids=frozenset())
    >>> out.num_tokens
    0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from parallel.sampling_params import SamplingParams


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step: compute KV for ``token_ids`` at positions ``start_pos...``."""

    request_id: str
    token_ids: tuple[int, ...]
    start_pos: int
    block_table: tuple[int, ...]
    sample: bool  # the chunk reaches the last known token, so the step samples the next one
    params: SamplingParams
    num_draft: int = 0  # the last num_draft token ids are speculative proposals for the target to verify
    resumed: bool = False  # first step since (re)admission: per-request device state starts over here
    num_prompt_tokens: int = 0  # the request's prompt length (its penalties tell prompt from output tokens)


@dataclass(frozen=True)
class GrammarMask:
    """Allowed next tokens of the constrained requests sampling this step (``parallel/structured.py``):
    ``bitmask`` [len(request_ids), ceil(vocab / 32)] int32, xgrammar's layout (bit set: allowed)."""

    request_ids: tuple[str, ...]
    bitmask: Any  # a CPU torch.Tensor (typed loosely: this module stays free of torch)


@dataclass(frozen=True)
class SchedulerOutput:
    """What runs this step. Immutable: the runner reads it and never touches the scheduler's state."""

    scheduled: tuple[ScheduledRequest, ...]
    finished_request_ids: frozenset[str]  # finished since the last step: the runner may drop their state
    num_preempted: int = 0
    grammar: GrammarMask | None = None  # structured output: the token masks of constrained rows

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)


@dataclass(frozen=True)
class StepResult:
    """What the runner produced: the sampled token ids (and optional logprobs) per sampled request."""

    sampled: dict[str, tuple[int, ...]]
    logprobs: dict[str, tuple[dict[int, float], ...]] | None = None
    drafts: dict[str, tuple[int, ...]] | None = None  # next step's proposals, per request
    num_accepted: dict[str, int] | None = None  # proposals accepted this step, per verified request
    failed: dict[str, str] | None = None  # requests whose own sampling raised (the reason): they end alone
    # prompt logprobs computed this step, per request: (position of the first token they score, one entry
    # per prompt token from there: its logprob and the top alternatives)
    prompt_logprobs: dict[str, tuple[int, tuple[dict[int, float], ...]]] | None = None
