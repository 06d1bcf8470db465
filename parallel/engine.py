"""The engine: validated requests in, a step loop of schedule -> run -> update -> detokenize, deltas out.

Synchronous and single-threaded by design; ``async_engine.AsyncEngine`` drives it from a thread or a child
process for servers and ``llm.LLM`` drives it in a loop for offline batches.

Each step returns one ``OutputDelta`` per request that changed: only what is new (token ids, text,
logprobs), so a step costs the same whatever the outputs' lengths. A failure while handling one request
(detokenizing, stop strings, logprobs, building its delta) finishes that request alone with a
``RequestFailedError`` in its final delta; a failed model step fails the requests it ran. The engine goes on.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

import torch

from parallel.block_manager import BlockManager
from parallel.config import EngineConfig
from parallel.detokenizer import IncrementalDetokenizer
from parallel.draft_service import ServiceProposer
from parallel.engine_stats import EngineStats
from parallel.errors import ContextLengthError, EngineDeadError, InvalidRequestError, RequestFailedError
from parallel.executor import make_executor
from parallel.faults import FaultPlan
from parallel.inputs import encode_prompt, with_bad_words
from parallel.model_runner import kv_bytes_per_block
from parallel.models.llama import LlamaArgs
from parallel.models.loader import check_model_folder, checkpoint_dtype, read_json, weight_files
from parallel.outputs import OutputDelta
from parallel.request import Request, RequestStatus
from parallel.sampling_params import SamplingParams
from parallel.scheduler import Scheduler
from parallel.speculative import Proposer
from parallel.step_messages import StepResult
from parallel.structured import GrammarBackend
from parallel.tokenizer import Tokenizer

__all__ = ["EngineStats", "LLMEngine"]

logger = logging.getLogger(__name__)

_CPU_KV_BYTES = 1 << 30
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Consecutive failed model steps after which the engine calls itself unhealthy: one bad step is a request's
# problem, several in a row (with different requests) are the device's or the model's.
MAX_FAILED_STEPS = 3


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, folder: str) -> torch.dtype:
    if name != "auto":
        dtype = _DTYPES[name]
        if dtype == torch.float16 and device.type == "cpu":
            raise ValueError("float16 is supported on CUDA only; use bfloat16 or float32 on CPU")
        return dtype
    if device.type == "cpu":
        return torch.float32  # CPU matmuls are fastest and exact in float32 on most hosts
    dtype = _DTYPES.get(checkpoint_dtype(folder), torch.bfloat16)
    return torch.bfloat16 if dtype == torch.float32 else dtype


def _eos_ids(folder: str) -> tuple[int, ...]:
    for name in ("generation_config.json", "config.json"):
        eos = read_json(folder, name, required=False).get("eos_token_id")
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (eos,)
    return ()


@dataclass
class _Live:
    """A request that has not had its final delta yet, with its output state."""

    request: Request
    detok: IncrementalDetokenizer | None


class LLMEngine:
    """Continuous-batching inference over a paged KV cache.

    Example:
        >>> engine = LLMEngine(EngineConfig.from_options("models/tiny-code-llama"))
        >>> engine.add_request("r1", "def fibonacci(n):", SamplingParams(max_tokens=16, temperature=0))
        >>> text = ""
        >>> while engine.has_unfinished():
        ...     text += "".join(d.text for d in engine.step())
    """

    def __init__(self, config: EngineConfig, proposer: Proposer | None = None) -> None:
        self.config = config
        mc = config.model
        self.device = resolve_device(mc.device)
        self.dtype = resolve_dtype(mc.dtype, self.device, mc.path)
        torch.manual_seed(mc.seed)
        args = self.args = LlamaArgs.from_hf(read_json(check_model_folder(mc.path), "config.json"))
        args.check_tensor_parallel(config.parallel.tensor_parallel_size)
        weight_files(mc.path)  # a missing checkpoint fails here, before any worker starts
        self.max_model_len = min(mc.max_model_len or args.max_position_embeddings, args.max_position_embeddings)
        if args.sliding_window:  # no sliding-window attention yet: stay inside the window, where it is exact
            self.max_model_len = min(self.max_model_len, args.sliding_window)
        self.vocab_size = args.vocab_size
        eos = _eos_ids(mc.path)
        self.tokenizer = None if mc.skip_tokenizer_init else Tokenizer.from_folder(mc.path, eos)
        self.eos_token_ids = self.tokenizer.eos_token_ids if self.tokenizer else eos
        # structured output: grammars compiled off the step loop, one matcher per constrained request
        self.grammar = GrammarBackend(mc.path, self.vocab_size, self.eos_token_ids) if self.tokenizer else None
        self.num_blocks = self._num_blocks()
        cc = config.cache
        self.block_manager = BlockManager(self.num_blocks, cc.block_size, cc.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.max_model_len,
                                   num_lookahead=config.speculative.num_speculative_tokens)
        self.executor = make_executor(config, self.device, self.dtype, self.num_blocks, self.max_model_len, proposer)
        self._remote_draft = proposer if isinstance(proposer, ServiceProposer) else None
        self._live: dict[str, _Live] = {}
        self._token_times: collections.deque[tuple[float, int]] = collections.deque()
        self._failed_steps = 0  # consecutive
        self._dead: EngineDeadError | None = None  # set when the executor lost a rank: no recovery in place
        self._fault = FaultPlan.from_env()  # test-only; None outside fault-injection tests
        self.num_aborted = 0
        self.num_failed = 0
        self.num_generated_tokens = 0
        logger.info("engine ready: %s on %s/%s, %d KV blocks of %d tokens, max_model_len %d", mc.path,
                    self.device, self.dtype, self.num_blocks, cc.block_size, self.max_model_len)

    def _num_blocks(self) -> int:
        cc = self.config.cache
        if cc.num_blocks is not None:
            return cc.num_blocks
        per_block = kv_bytes_per_block(self.args, self.config.parallel.tensor_parallel_size, cc.block_size, self.dtype)
        if self.config.speculative.draft_path is not None:  # a colocated draft's cache uses the same blocks
            draft = LlamaArgs.from_hf(read_json(check_model_folder(self.config.speculative.draft_path), "config.json"))
            per_block += kv_bytes_per_block(draft, 1, cc.block_size, self.dtype)
        if cc.kv_cache_memory_bytes is not None:
            budget = cc.kv_cache_memory_bytes
        elif self.device.type == "cuda":
            # Weights load after the cache is sized: subtract this rank's share of them, and 1 GiB of activations.
            free, total = torch.cuda.mem_get_info(self.device)
            weights = self.args.num_parameters * torch.tensor([], dtype=self.dtype).element_size()
            weights //= self.config.parallel.tensor_parallel_size
            budget = int(free - (1 - cc.gpu_memory_utilization) * total) - weights - (1 << 30)
        else:
            budget = _CPU_KV_BYTES
        # More than every sequence at full length cannot be used at once; the rest only feeds the prefix cache.
        useful = 2 * self.config.scheduler.max_num_seqs * -(-self.max_model_len // cc.block_size)
        num_blocks = min(budget // per_block, useful)
        if num_blocks * cc.block_size < self.max_model_len:
            raise ValueError(f"KV cache budget holds {num_blocks * cc.block_size} tokens, fewer than "
                             f"max_model_len={self.max_model_len}: raise kv_cache_memory_bytes or lower max_model_len")
        return num_blocks

    # ---- requests ---------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        """Validate and tokenize a prompt; raises InvalidRequestError / ContextLengthError naming ``param``."""
        return encode_prompt(prompt, self.tokenizer, self.vocab_size, self.max_model_len, param)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Admit a request, or raise ``InvalidRequestError`` before it touches the batch. Everything per
        request that can fail (its seeded generator) is created here, not inside a step."""
        ids = self.encode_prompt(prompt)
        if params.n != 1 or params.best_of is not None:
            raise InvalidRequestError("an engine request is one sequence: n and best_of are fanned out above the "
                                      "engine (LLM.generate, the model replica)", param="n")
        params = with_bad_words(params, self.tokenizer, self.vocab_size)
        if request_id in self._live:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise InvalidRequestError(f"stop_token_ids must be in [0, {self.vocab_size}), got {bad[:5]}",
                                      param="stop_token_ids")
        bad = [t for t, _ in params.logit_bias if t >= self.vocab_size]
        if bad:
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {self.vocab_size}), got {bad[:5]}",
                                      param="logit_bias")
        if params.processed and self.config.speculative.enabled:
            raise InvalidRequestError("logit_bias, bad_words and the presence, frequency and repetition penalties "
                                      "are not available with speculative decoding", param="logit_bias" if
                                      params.logit_bias else "bad_words" if params.bad_words else "presence_penalty",
                                      code="unsupported_parameter")
        needed = min(len(ids) + params.max_tokens, self.max_model_len)
        capacity = self.num_blocks * self.config.cache.block_size
        if needed > capacity:
            raise ContextLengthError(f"request needs {needed} tokens of KV cache but the cache holds {capacity}: "
                                     f"lower max_tokens", param="max_tokens")
        try:
            self.executor.add_request(request_id, params)
        except (RuntimeError, ValueError, OverflowError) as err:  # e.g. a seed torch refuses
            raise InvalidRequestError(f"cannot admit request: {err}", param="seed" if params.seed is not None
                                      else None) from err
        spec = params.structured
        if spec is not None and (self.grammar is None or self.config.speculative.enabled):
            # (with drafts the matcher would have to follow every proposed position: not done here)
            raise InvalidRequestError(f"{spec.param}: structured output needs the model's tokenizer and is not "
                                      "available with speculative decoding", param=spec.param,
                                      code="unsupported_parameter")
        ready = spec is None or self.grammar.admit(spec, request_id)  # type: ignore[union-attr]
        request = Request(request_id, ids, params, self.eos_token_ids, prompt if isinstance(prompt, str) else None)
        if ready:  # else it joins the scheduler once its grammar is compiled (step)
            self.scheduler.add(request)
        detok = IncrementalDetokenizer(self.tokenizer, ids, params) if self.tokenizer is not None else None
        self._live[request_id] = _Live(request, detok)

    def abort(self, request_id: str) -> OutputDelta | None:
        """Stop a request and free its KV blocks at once; its final delta (None for unknown ids)."""
        live = self._live.pop(request_id, None)
        if live is None:
            return None
        self.scheduler.finish(request_id, RequestStatus.FINISHED_ABORTED)
        self.num_aborted += 1
        r = live.request
        text = live.detok.take_delta(True) if live.detok is not None else ""
        return OutputDelta(request_id, (), text, True, "abort", None, None, r.num_prompt_tokens,
                           r.num_output_tokens, r.num_cached_tokens)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.grammar and self.grammar.num_waiting)

    @property
    def dead(self) -> EngineDeadError | None:
        """Set once the executor lost a rank: this engine cannot step again (its replica must be replaced)."""
        return self._dead

    @property
    def healthy(self) -> bool:
        """False after MAX_FAILED_STEPS model steps failed in a row: the device or model is broken."""
        return self._failed_steps < MAX_FAILED_STEPS

    def check_health(self) -> None:
        """Raises when a model rank is gone (tensor parallelism) or steps keep failing; cheap otherwise."""
        if self._dead is not None:
            raise self._dead
        if not self.healthy:
            raise EngineDeadError(f"the last {self._failed_steps} model steps all failed")
        self.executor.check_health()

    def process_ids(self) -> list[int]:
        """Tensor-parallel ranks' process ids (empty for one in-process rank)."""
        return self.executor.worker_pids()

    def shutdown(self) -> None:
        self.executor.shutdown()

    # ---- the step ---------------------------------------------------------------------------------------
    def step(self) -> list[OutputDelta]:
        """One step: the new deltas. Never raises for a request's sake (failures become error deltas)."""
        early = self._grammars_ready() if self.grammar is not None and self.grammar.num_waiting else []
        try:
            sched_out = self.scheduler.schedule()
        except Exception as err:  # a scheduler bug: its state is suspect, so every request ends here
            logger.exception("scheduling failed: failing all %d requests", len(self._live))
            return early + self.fail_all(err)
        if self.grammar is not None:  # the allowed tokens of this step's constrained rows
            sched_out, bad = self.grammar.with_mask(sched_out)
            early += [d for rid, err in bad.items() for d in self._fail([rid], err)]
        try:
            result = self.executor.execute(sched_out)
            changed = self.scheduler.update(sched_out, result)
        except EngineDeadError as err:  # the executor lost a rank: every request in flight ends, typed as dead
            self._dead = err
            logger.error("engine dead: %s: failing all %d requests", err, len(self._live))
            return early + self._fail(list(self._live), err, dead=True)
        except Exception as err:  # the model step (or its bookkeeping) failed: only its requests end
            self._failed_steps += 1
            logger.exception("model step failed: failing its %d requests", len(sched_out.scheduled))
            self.scheduler.restore_finished(sched_out.finished_request_ids)  # the runner may not have seen them
            return early + self._fail([s.request_id for s in sched_out.scheduled], err)
        self._failed_steps = 0
        for rid, (first, entries) in (result.prompt_logprobs or {}).items():
            live = self._live.get(rid)
            if live is not None:  # by position: a preempted request's recomputed prefill overwrites its own
                live.request.prompt_logprobs[first:first + len(entries)] = entries
        deltas = early
        for rid, reason in (result.failed or {}).items():  # its own sampling raised: this request alone
            deltas.extend(self._fail([rid], RuntimeError(reason)))
        new_tokens = 0
        for request, appended in changed:
            new_tokens += appended
            try:
                if (self.grammar is not None and self.grammar.advance(request.request_id, request.output_token_ids[
                        len(request.output_token_ids) - appended:]) and not request.status.finished):
                    self.scheduler.finish(request.request_id, RequestStatus.FINISHED_STOPPED)  # grammar complete
                deltas.append(self._emit(request, appended, result))
            except Exception as err:  # this request alone: the rest of the batch goes on
                logger.exception("request %s failed", request.request_id)
                deltas.extend(self._fail([request.request_id], err))
        if new_tokens:
            self._token_times.append((time.monotonic(), new_tokens))
            self.num_generated_tokens += new_tokens
        return deltas

    def _emit(self, request: Request, appended: int, result: StepResult) -> OutputDelta:
        """Per-request output work of a step: detokenize, match stop strings, take logprobs, build the delta."""
        rid = request.request_id
        live = self._live[rid]
        fresh = request.output_token_ids[-appended:]
        if self._fault is not None:
            self._fault.check(rid, request.num_output_tokens)
        lps = None
        if request.params.logprobs is not None:
            lps = tuple((result.logprobs or {})[rid][:appended])  # missing ones are a bug: fail this request
        text, stop_reason = "", None
        if live.detok is not None:
            live.detok.push(fresh)
            if live.detok.stop_reason is not None and not request.status.finished:
                self.scheduler.finish(rid, RequestStatus.FINISHED_STOPPED)
            text, stop_reason = live.detok.take_delta(request.status.finished), live.detok.stop_reason
        finished = request.status.finished
        if stop_reason is None and request.status == RequestStatus.FINISHED_STOPPED:
            last = request.output_token_ids[-1]
            stop_reason = last if last in request.params.stop_token_ids else None
        if finished:
            del self._live[rid]
        first = request.num_output_tokens == appended  # the request's first delta carries its schedule time
        prompt_lps = tuple(request.prompt_logprobs) if first and request.params.prompt_logprobs is not None else None
        return OutputDelta(rid, tuple(fresh), text, finished, request.status.value if finished else None,
                           stop_reason, lps, request.num_prompt_tokens, request.num_output_tokens,
                           request.num_cached_tokens, None, request.scheduled_time if first else None, prompt_lps)

    def _grammars_ready(self) -> list[OutputDelta]:
        """Schedule the requests whose grammar compiled; fail (400) those whose grammar cannot be compiled."""
        assert self.grammar is not None
        if not self.scheduler.has_unfinished():
            self.grammar.wait(0.05)  # nothing else to run: wait for a compilation rather than spin
        ready, failed = self.grammar.take_ready()
        for rid in ready:  # (one aborted while it waited is forgotten)
            self.scheduler.add(self._live[rid].request) if rid in self._live else self.grammar.forget(rid)
        return [d for rid, err in failed.items() for d in self._fail([rid], err)]

    def fail_all(self, err: Exception) -> list[OutputDelta]:
        """Finish every request in flight with a RequestFailedError (a bug outside any one request's work)."""
        return self._fail(list(self._live), err)

    def _fail(self, request_ids: list[str], err: Exception, dead: bool = False) -> list[OutputDelta]:
        """Finish these requests (blocks freed) with a RequestFailedError (EngineDeadError when ``dead``) in
        their final deltas."""
        deltas = []
        for rid in request_ids:
            live = self._live.pop(rid, None)
            if live is None:
                continue  # already given its final delta (or aborted)
            self.scheduler.finish(rid, RequestStatus.FINISHED_ABORTED)
            self.num_failed += 1
            r = live.request
            error = err if dead or isinstance(err, InvalidRequestError) else RequestFailedError(
                f"request {rid!r} failed inside the engine: {type(err).__name__}: {err}")
            deltas.append(OutputDelta(rid, (), "", True, "abort", None, None, r.num_prompt_tokens,
                                      r.num_output_tokens, r.num_cached_tokens, error))
        return deltas

    # ---- stats ------------------------------------------------------------------------------------------
    def stats(self, window_s: float = 10.0) -> EngineStats:
        now = time.monotonic()
        while self._token_times and self._token_times[0][0] < now - window_s:
            self._token_times.popleft()
        bm, sched = self.block_manager, self.scheduler
        draft = self._remote_draft
        return EngineStats(
            num_waiting=len(self.scheduler.waiting), num_running=len(self.scheduler.running),
            kv_blocks_used=bm.num_used_blocks, kv_blocks_total=bm.num_blocks, kv_usage=bm.usage,
            prefix_hit_rate=bm.prefix_hit_rate, tokens_per_s=sum(n for _, n in self._token_times) / window_s,
            num_preemptions=self.scheduler.num_preemptions, num_aborted=self.num_aborted, num_failed=self.num_failed,
            spec_acceptance_rate=sched.num_accepted_tokens / sched.num_draft_tokens if sched.num_draft_tokens else 0.0,
            spec_mean_tokens_per_step=(1 + sched.num_accepted_tokens / sched.num_verify_steps
                                       if sched.num_verify_steps else 0.0),
            draft_calls=draft.calls if draft is not None else 0,
            draft_call_ms=1e3 * draft.call_seconds / max(draft.calls, 1) if draft is not None else 0.0,
            window_s=window_s, prefix_queried_tokens=bm.prefix_queried_tokens, prefix_hit_tokens=bm.prefix_hit_tokens,
            prompt_computed_tokens=sched.num_prompt_computed_tokens, generated_tokens=self.num_generated_tokens,
            spec_num_drafts=sched.num_verify_steps,
            spec_num_draft_tokens=sched.num_draft_tokens, spec_num_accepted_tokens=sched.num_accepted_tokens,
            spec_accepted_per_pos=tuple(sched.accepted_per_pos))
