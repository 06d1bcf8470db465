"""One request's state as the scheduler owns it.

Invariant: ``num_computed_tokens <= num_tokens``; the KV of ``all_token_ids[:num_computed_tokens]`` sits in the
blocks of ``block_table``. A request in decode has exactly one uncomputed token: the last one sampled.
"""

from __future__ import annotations

import enum
import time

from parallel.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


class Request:
    """Mutable per-request state, touched only by the scheduler and the engine's output step.

    Example:
        >>> r = Request("r1", [1, 5, 9], SamplingParams(max_tokens=4))
        >>> (r.num_tokens, r.num_computed_tokens, r.status.value)
        (3, 0, 'waiting')
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: tuple[int, ...] = (), prompt: str | None = None) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache on first schedule
        self.block_table: list[int] = []
        self.spec_token_ids: list[int] = []  # draft proposals waiting to be verified next step
        self.status = RequestStatus.WAITING
        self.arrival_time = time.monotonic()
        self.scheduled_time: float | None = None  # first admitted to the running batch (queue time ends)
        self.num_preemptions = 0
        # prompt logprobs (when asked for), by position: filled in by prefill steps; position 0 has none
        self.prompt_logprobs: list[dict[int, float] | None] = (
            [None] * len(self.prompt_token_ids) if params.prompt_logprobs is not None else [])

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> RequestStatus | None:
        """The finish status implied by the last appended token, or None to keep going."""
        n_out = self.num_output_tokens
        last = self.output_token_ids[-1]
        if n_out >= self.params.min_tokens:
            if not self.params.ignore_eos and last in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if last in self.params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if n_out >= self.params.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
