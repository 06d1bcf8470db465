"""Continuous-batching scheduler that thinks in token counts (after vLLM v1 and nano-vllm).

Every request has ``num_tokens`` (wanted: prompt + outputs so far) and ``num_computed_tokens`` (in the KV
cache). Each step gives every scheduled request ``min(num_tokens - num_computed_tokens, budget)`` new tokens
under one per-step token budget: a fresh prompt, a chunk of a long prompt (chunked prefill), the recompute of a
preempted request and one decode token are the same operation. Prefix-cache hits simply start a request with
``num_computed_tokens > 0``.

Policy: running requests first (FCFS), then waiting ones while the budget, ``max_num_seqs`` and free blocks
allow. When a running request cannot get a block, the most recently arrived running request is preempted:
its blocks are freed and it goes back to the head of the queue to be recomputed later (preemption by
recompute; outputs already produced are kept, so the answer does not change).
"""

from __future__ import annotations

import time
from collections import deque

from parallel.block_manager import BlockManager
from parallel.config import SchedulerConfig
from parallel.errors import InvalidRequestError
from parallel.request import Request, RequestStatus
from parallel.step_messages import ScheduledRequest, SchedulerOutput, StepResult


class Scheduler:
    """Decides, each step, which requests run and how many of their tokens.

    Example:
        >>> from parallel.step_messages import ScheduledRequest, SchedulerOutput, StepResult
        >>> s = Scheduler(SchedulerConfig(max_num_batched_tokens=8), BlockManager(16, 4), max_model_len=64)
        >>> s.add(Request("a", list(range(12)), SamplingParams()))
        >>> [len(x.token_ids) for x in s.schedule().scheduled]  # chunked prefill: 8 of the 12 tokens
        [8]
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int,
                 num_lookahead: int = 0) -> None:
        self.config = config
        self.num_lookahead = num_lookahead  # slots reserved beyond the scheduled tokens for draft proposals
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: set[str] = set()
        self.num_preemptions = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_verify_steps = 0
        self.num_prompt_computed_tokens = 0
        self.accepted_per_pos: list[int] = [0] * num_lookahead  # accepted tokens by draft position

    # ---- queue ------------------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request (stop string, abort): free its blocks now. Unknown or finished ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        self.block_manager.free(request)
        self._finished_ids.add(request_id)
        return request

    def restore_finished(self, request_ids: frozenset[str]) -> None:
        """Hand these finished ids to the next step again (a failed step may not have delivered them to the
        runner, which must drop their per-request state)."""
        self._finished_ids |= request_ids

    # ---- one step ---------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chosen: list[tuple[Request, int]] = []
        admitted: set[Request] = set()
        preempted = 0

        # 1. Running requests, oldest first; preempt from the back when blocks run out.
        idx = 0
        while idx < len(self.running) and budget > 0:
            request = self.running[idx]
            if request.num_tokens - request.num_computed_tokens + len(request.spec_token_ids) > budget:
                request.spec_token_ids = []  # no room to verify them this step
            num_new = min(request.num_tokens - request.num_computed_tokens + len(request.spec_token_ids), budget)
            while not self.block_manager.allocate_slots(request, self._with_lookahead(request, num_new)):
                victim = self.running.pop()
                self._preempt(victim)
                preempted += 1
                if victim is request:
                    break
            else:
                chosen.append((request, num_new))
                budget -= num_new
                idx += 1
                continue
            break

        # 2. Waiting requests, unless this step had to preempt (then memory is the bottleneck).
        while (self.waiting and budget > 0 and not preempted
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting[0]
            cached = self.block_manager.get_computed_blocks(request)
            num_cached = len(cached) * self.block_manager.block_size
            num_new = request.num_tokens - num_cached
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if not self.block_manager.allocate_slots(request, self._with_lookahead(request, num_new, num_cached),
                                                     cached):
                break
            self.waiting.popleft()
            self.block_manager.record_prefix_lookup(request.num_tokens, num_cached)
            request.num_computed_tokens = num_cached
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached
                request.scheduled_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            admitted.add(request)
            chosen.append((request, num_new))
            budget -= num_new

        scheduled = tuple(self._scheduled(r, n, r in admitted) for r, n in chosen)
        finished, self._finished_ids = frozenset(self._finished_ids), set()
        return SchedulerOutput(scheduled, finished, preempted)

    def _with_lookahead(self, request: Request, num_new: int, num_cached: int = 0) -> int:
        total = request.num_computed_tokens + num_cached + num_new
        return num_new + max(0, min(self.num_lookahead, self.max_model_len - total))

    def _scheduled(self, r: Request, n: int, resumed: bool) -> ScheduledRequest:
        real = min(n, r.num_tokens - r.num_computed_tokens)
        drafts = tuple(r.spec_token_ids[: n - real])
        self.num_draft_tokens += len(drafts)
        return ScheduledRequest(
            request_id=r.request_id,
            token_ids=tuple(r.all_token_ids[r.num_computed_tokens:r.num_computed_tokens + real]) + drafts,
            start_pos=r.num_computed_tokens, block_table=tuple(r.block_table),
            sample=r.num_computed_tokens + real == r.num_tokens, params=r.params,
            num_draft=len(drafts), resumed=resumed, num_prompt_tokens=r.num_prompt_tokens)

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        request.spec_token_ids = []
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update(self, output: SchedulerOutput, result: StepResult) -> list[tuple[Request, int]]:
        """Advance computed counts, append sampled tokens, finish what stopped.

        Returns each request that got tokens, with how many were appended (fewer than sampled after a stop).
        """
        changed: list[tuple[Request, int]] = []
        for s in output.scheduled:
            request = self.requests.get(s.request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            if result.failed and s.request_id in result.failed:
                continue  # its own sampling raised: the engine ends it alone
            prompt_end = min(s.start_pos + len(s.token_ids) - s.num_draft, request.num_prompt_tokens)
            self.num_prompt_computed_tokens += max(0, prompt_end - s.start_pos)
            request.num_computed_tokens += len(s.token_ids)
            if not s.sample:
                self.block_manager.cache_computed_blocks(request)
                continue
            appended = 0
            for token_id in result.sampled[s.request_id]:
                request.append_output_token(token_id)
                appended += 1
                status = request.check_stop(self.max_model_len)
                if status is not None:
                    self.finish(request.request_id, status)
                    break
            # Rejected proposals' KV is stale: only the prefix before the newest token counts as computed.
            request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
            if s.num_draft and result.num_accepted is not None:
                self.num_verify_steps += 1
                accepted = result.num_accepted.get(s.request_id, 0)
                self.num_accepted_tokens += accepted
                for pos in range(min(accepted, len(self.accepted_per_pos))):
                    self.accepted_per_pos[pos] += 1
            if request.status == RequestStatus.RUNNING:
                self.block_manager.cache_computed_blocks(request)
                request.spec_token_ids = list((result.drafts or {}).get(s.request_id, ()))
            changed.append((request, appended))
        return changed
