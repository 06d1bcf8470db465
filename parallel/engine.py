"""The engine: validated requests in, a step loop of schedule -> run -> update -> detokenize, outputs out.

Synchronous and single-threaded by design; ``async_engine.AsyncEngine`` drives it from a thread for servers
and ``llm.LLM`` drives it in a loop for offline batches.
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
from parallel.executor import make_executor
from parallel.inputs import encode_prompt
from parallel.model_runner import kv_bytes_per_block
from parallel.models.llama import LlamaArgs
from parallel.models.loader import check_model_folder, checkpoint_dtype, read_json, weight_files
from parallel.outputs import CompletionOutput, RequestOutput, cumulative_logprob
from parallel.request import Request, RequestStatus
from parallel.sampling_params import SamplingParams
from parallel.scheduler import Scheduler
from parallel.speculative import Proposer
from parallel.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_CPU_KV_BYTES = 1 << 30
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for routers and autoscalers."""

    num_waiting: int
    num_running: int
    kv_blocks_used: int
    kv_blocks_total: int
    kv_usage: float
    prefix_hit_rate: float
    tokens_per_s: float  # generated tokens per second over the last ``window_s``
    num_preemptions: int
    num_aborted: int = 0  # requests stopped before finishing (client disconnects, explicit aborts)
    spec_acceptance_rate: float = 0.0  # accepted / proposed draft tokens
    spec_mean_tokens_per_step: float = 0.0  # tokens emitted per verification step (accepted + 1)
    window_s: float = 10.0


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


class LLMEngine:
    """Continuous-batching inference over a paged KV cache.

    Example:
        >>> engine = LLMEngine(EngineConfig.from_options("models/tiny-code-llama"))
        >>> engine.add_request("r1", "def fibonacci(n):", SamplingParams(max_tokens=16, temperature=0))
        >>> while engine.has_unfinished():
        ...     outputs = engine.step()
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
        self.num_blocks = self._num_blocks()
        cc = config.cache
        self.block_manager = BlockManager(self.num_blocks, cc.block_size, cc.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.max_model_len,
                                   num_lookahead=config.speculative.num_speculative_tokens)
        self.executor = make_executor(config, self.device, self.dtype, self.num_blocks, self.max_model_len, proposer)
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._logprobs: dict[str, list[dict[int, float]]] = {}
        self._token_times: collections.deque[tuple[float, int]] = collections.deque()
        self.num_aborted = 0
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
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Validate and tokenize a prompt; raises ValueError saying what is wrong."""
        return encode_prompt(prompt, self.tokenizer, self.vocab_size, self.max_model_len)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        ids = self.encode_prompt(prompt)
        if request_id in self.scheduler.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        needed = min(len(ids) + params.max_tokens, self.max_model_len)
        capacity = self.num_blocks * self.config.cache.block_size
        if needed > capacity:
            raise ValueError(f"request needs {needed} tokens of KV cache but the cache holds {capacity}")
        request = Request(request_id, ids, params, self.eos_token_ids, prompt if isinstance(prompt, str) else None)
        self.scheduler.add(request)
        if self.tokenizer is not None:
            self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, ids, params)
        if params.logprobs is not None:
            self._logprobs[request_id] = []

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its KV blocks at once; unknown ids are ignored."""
        request = self.scheduler.finish(request_id, RequestStatus.FINISHED_ABORTED)
        if request is None:
            return None
        self.num_aborted += 1
        return self._output(request, [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def check_health(self) -> None:
        """Raises when a model rank is gone (tensor parallelism); cheap for one in-process rank."""
        self.executor.check_health()

    def shutdown(self) -> None:
        self.executor.shutdown()

    # ---- the step ---------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched_out = self.scheduler.schedule()
        result = self.executor.execute(sched_out)
        changed = self.scheduler.update(sched_out, result)
        outputs = []
        now = time.monotonic()
        new_tokens = 0
        for request, appended in changed:
            rid = request.request_id
            fresh = request.output_token_ids[-appended:]
            new_tokens += appended
            if result.logprobs and rid in result.logprobs and rid in self._logprobs:
                self._logprobs[rid].extend(result.logprobs[rid][: len(fresh)])
            detok = self._detok.get(rid)
            if detok is not None:
                detok.push(fresh)
                if detok.stop_reason is not None and not request.status.finished:
                    self.scheduler.finish(rid, RequestStatus.FINISHED_STOPPED)
            outputs.append(self._output(request, fresh))
        if new_tokens:
            self._token_times.append((now, new_tokens))
        return outputs

    def _output(self, request: Request, fresh: list[int]) -> RequestOutput:
        rid = request.request_id
        finished = request.status.finished
        detok = self._detok.get(rid)
        stop_reason: str | int | None = None
        if detok is not None:
            delta, text = detok.take_delta(finished), detok.text
            stop_reason = detok.stop_reason
        else:
            delta, text = "", ""
        if stop_reason is None and request.status == RequestStatus.FINISHED_STOPPED:
            last = request.output_token_ids[-1]
            stop_reason = last if last in request.params.stop_token_ids else None
        lps = self._logprobs.get(rid)
        if finished:
            self._detok.pop(rid, None)
            self._logprobs.pop(rid, None)
        completion = CompletionOutput(
            index=0, text=text, token_ids=tuple(request.output_token_ids),
            finish_reason=request.status.value if finished else None,
            delta_text=delta, delta_token_ids=tuple(fresh),
            logprobs=tuple(lps) if lps is not None else None,
            cumulative_logprob=cumulative_logprob(lps, request.output_token_ids),
            stop_reason=stop_reason)
        return RequestOutput(rid, request.prompt, tuple(request.prompt_token_ids), (completion,), finished,
                             request.num_cached_tokens)

    # ---- stats ------------------------------------------------------------------------------------------
    def stats(self, window_s: float = 10.0) -> EngineStats:
        now = time.monotonic()
        while self._token_times and self._token_times[0][0] < now - window_s:
            self._token_times.popleft()
        bm, sched = self.block_manager, self.scheduler
        return EngineStats(
            num_waiting=len(self.scheduler.waiting), num_running=len(self.scheduler.running),
            kv_blocks_used=bm.num_used_blocks, kv_blocks_total=bm.num_blocks, kv_usage=bm.usage,
            prefix_hit_rate=bm.prefix_hit_rate, tokens_per_s=sum(n for _, n in self._token_times) / window_s,
            num_preemptions=self.scheduler.num_preemptions, num_aborted=self.num_aborted,
            spec_acceptance_rate=sched.num_accepted_tokens / sched.num_draft_tokens if sched.num_draft_tokens else 0.0,
            spec_mean_tokens_per_step=(1 + sched.num_accepted_tokens / sched.num_verify_steps
                                       if sched.num_verify_steps else 0.0),
            window_s=window_s)
