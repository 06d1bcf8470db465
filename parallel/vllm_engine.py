"""The ``engine_api.Engine`` interface over vLLM's AsyncLLM (vLLM v1), as ``async_engine.AsyncEngine`` has it.

Prompts are tokenized by our Tokenizer (the same tokenizer.json vLLM reads) and passed as token ids, so
validation and errors are identical across engines; vLLM detokenizes. Stats come from a stat logger that
keeps vLLM's latest SchedulerStats. Import this module only where vLLM is installed.
"""

from __future__ import annotations

import asyncio
import collections
import os
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

from parallel.engine_api import EngineInfo
from parallel.engine_stats import EngineStats
from parallel.errors import EngineDeadError, InvalidRequestError
from parallel.inputs import encode_prompt
from parallel.outputs import OutputDelta
from parallel.sampling_params import SamplingParams
from parallel.structured import parse
from parallel.structured_spec import StructuredSpec
from parallel.tokenizer import Tokenizer

# Our option name (EngineConfig.option_names(), the one vocabulary) -> vLLM AsyncEngineArgs name; None: it does
# not apply to vLLM (vLLM always runs its EngineCore in a process of its own and compiles by its own default).
# draft_path + num_speculative_tokens become vLLM's speculative_config (see _speculative_config).
_ENGINE_ARG_NAMES: dict[str, str | None] = {
    "dtype": "dtype", "max_model_len": "max_model_len", "max_num_seqs": "max_num_seqs",
    "max_num_batched_tokens": "max_num_batched_tokens", "block_size": "block_size",
    "kv_cache_memory_bytes": "kv_cache_memory_bytes", "num_blocks": "num_gpu_blocks_override",
    "enable_prefix_caching": "enable_prefix_caching", "enable_chunked_prefill": "enable_chunked_prefill",
    "seed": "seed", "tensor_parallel_size": "tensor_parallel_size",
    "gpu_memory_utilization": "gpu_memory_utilization", "stream_interval": "stream_interval",
    "draft_path": None, "num_speculative_tokens": None,
    "device": None, "engine_process": None, "compile": None, "compile_draft": None,
    "served_model_name": "served_model_name", "disable_log_stats": None,
}


def _private_dirs() -> None:
    """vLLM leaves sockets and caches in shared places; keep them per process, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = tempfile.mkdtemp(prefix="modelfleet-vllm-")
    os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(base, "cache"))
    os.environ.setdefault("VLLM_RPC_BASE_PATH", os.path.join(base, "rpc"))
    os.makedirs(os.environ["VLLM_RPC_BASE_PATH"], exist_ok=True)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_binding(ranks: int, cores: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND value splitting ``cores`` evenly over ``ranks`` ("0|1", "0-3|4-7")."""
    per = max(1, cores // ranks)
    spans = [(r * per % cores, min(r * per % cores + per, cores) - 1) for r in range(ranks)]
    return "|".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def to_vllm_params(params: SamplingParams, vocab_size: int) -> Any:
    from vllm import SamplingParams as VllmParams
    from vllm.sampling_params import RequestOutputKind

    top_k = params.effective_top_k if params.effective_top_k < vocab_size else 0  # above the vocab: off
    # vLLM reads seed -1 as "no seed" and its generators take [0, 2**64): map our signed 64-bit seeds there
    seed = params.seed % 2**64 if params.seed is not None else None
    return VllmParams(
        n=1, temperature=params.temperature, top_p=params.top_p, top_k=top_k,
        seed=seed, max_tokens=params.max_tokens, stop=list(params.stop) or None,
        stop_token_ids=list(params.stop_token_ids) or None, ignore_eos=params.ignore_eos,
        logprobs=params.logprobs, min_tokens=params.min_tokens, skip_special_tokens=params.skip_special_tokens,
        include_stop_str_in_output=params.include_stop_str_in_output, output_kind=RequestOutputKind.DELTA,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty, logit_bias=dict(params.logit_bias) or None, min_p=params.min_p,
        prompt_logprobs=params.prompt_logprobs, bad_words=list(params.bad_words) or None,
        structured_outputs=_structured_outputs(params.structured))


def _structured_outputs(spec: StructuredSpec | None) -> Any:
    """Our spec as vLLM's StructuredOutputsParams (one field of the same name per kind)."""
    if spec is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    value = {"json": spec.value, "json_object": True, "choice": list(spec.choices)}.get(spec.kind, spec.value)
    return StructuredOutputsParams(**{spec.kind: value})


def _speculative_config(options: dict[str, Any]) -> dict[str, Any] | None:
    draft, k = options.get("draft_path"), options.get("num_speculative_tokens")
    if draft is None:
        if k:
            raise ValueError("num_speculative_tokens needs a draft model (draft_path)")
        return None
    if not isinstance(k, int) or not 1 <= k <= 16:
        raise ValueError(f"num_speculative_tokens must be in [1, 16] with a draft_path, got {k!r}")
    return {"method": "draft_model", "model": draft, "num_speculative_tokens": k}


class _StatsKeeper:
    """A vLLM stat logger that remembers the latest scheduler stats and recent generated-token counts."""

    def __init__(self) -> None:
        self.scheduler: Any = None
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.preemptions = 0
        self.aborted = 0
        self.drafts = self.draft_tokens = self.accepted_tokens = 0
        self.tokens: collections.deque[tuple[float, int]] = collections.deque()

    def factory(self, vllm_config: Any, engine_index: int = 0) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        keeper = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                       engine_idx: int = 0) -> None:
                if scheduler_stats is not None:
                    keeper.scheduler = scheduler_stats
                    keeper.prefix_queries += scheduler_stats.prefix_cache_stats.queries
                    keeper.prefix_hits += scheduler_stats.prefix_cache_stats.hits
                    spec = scheduler_stats.spec_decoding_stats
                    if spec is not None:
                        keeper.drafts += spec.num_drafts
                        keeper.draft_tokens += spec.num_draft_tokens
                        keeper.accepted_tokens += spec.num_accepted_tokens
                if iteration_stats is not None:
                    keeper.preemptions += iteration_stats.num_preempted_reqs
                    if iteration_stats.num_generation_tokens:
                        keeper.tokens.append((time.monotonic(), iteration_stats.num_generation_tokens))

            def log_engine_initialized(self) -> None:
                pass

        return _Logger(vllm_config, engine_index)


def _silent_prometheus() -> type:
    """A PrometheusStatLogger that records nothing (vLLM adds its default one unless given one)."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    class Silent(PrometheusStatLogger):
        def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
            self.engine_indexes = engine_indexes or [0]

        def record(self, *args: Any, **kwargs: Any) -> None:
            pass

        def record_sleep_state(self, *args: Any, **kwargs: Any) -> None:
            pass

        def record_admission_rejection(self, reason: str) -> None:
            pass

        def log_engine_initialized(self) -> None:
            pass

    return Silent


class VllmEngine:
    """The ``engine_api.Engine`` interface over vLLM's AsyncLLM: same options, prompts, errors and deltas as
    the native engine.

    Example:
        >>> engine = VllmEngine("models/tiny-code-llama", dtype="float32", max_num_seqs=32)
        >>> ids = engine.encode_prompt("def f():")
        >>> async for delta in engine.generate("r1", ids, SamplingParams(max_tokens=8)):
        ...     print(delta.text, end="")
    """

    def __init__(self, path: str, **options: Any) -> None:
        _private_dirs()
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs: dict[str, Any] = {"model": path, "disable_log_stats": False, "enable_log_requests": False}
        for key, value in options.items():
            if key not in _ENGINE_ARG_NAMES:
                raise TypeError(f"engine option {key!r} is not supported by the vllm engine")
            name = _ENGINE_ARG_NAMES[key]
            if name is not None and value is not None:
                kwargs[name] = value
        spec = _speculative_config(options)
        self.speculative = spec is not None
        if spec is not None:
            kwargs["speculative_config"] = spec
        if kwargs.get("dtype") == "auto":
            kwargs.pop("dtype")
        tp = int(kwargs.get("tensor_parallel_size", 1))
        if tp == 1 and not _has_gpu():
            # On CPU vLLM would run the model in a worker process of its own beside the EngineCore, the two
            # busy-polling their shared-memory queues (sched_yield, and for 1 s after each step): two cores
            # at 100% whenever a request runs, which on a small machine starves this replica, the front
            # HAProxy and the clients for up to a second (whole streams then arrive at once). Run the model
            # in the EngineCore process itself: it blocks on its input queue when idle.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if tp > 1 and not _has_gpu():
            # vLLM's CPU workers bind OpenMP threads to cores: give each rank its own share, "0|1" for two.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_binding(tp, os.cpu_count() or 1))
            # Inside a Ray actor vLLM would pick its Ray executor, which its CPU platform does not support.
            kwargs.setdefault("distributed_executor_backend", "mp")
        # Structured output through xgrammar, as the native engine does it (it runs on CPU), with compact JSON
        # (no whitespace between JSON tokens on either engine: a small model cannot wander into it)
        from vllm.config import StructuredOutputsConfig

        kwargs["structured_outputs_config"] = StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)
        self._stats = _StatsKeeper()
        # vLLM's own PrometheusStatLogger records the vllm:* metrics in this process's registry (the metrics
        # pusher exports them); with disable_log_stats a silent one takes its place. Its stats must stay on:
        # the keeper reads them for routing and autoscaling.
        loggers = [self._stats.factory] + ([_silent_prometheus()] if options.get("disable_log_stats") else [])
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs), stat_loggers=loggers)
        self.max_model_len: int = self.llm.model_config.max_model_len
        self.tokenizer = Tokenizer.from_folder(path)
        self.vocab_size: int = self.llm.model_config.get_vocab_size()
        self._num_blocks = int(self.llm.vllm_config.cache_config.num_gpu_blocks or 0)

    @property
    def info(self) -> EngineInfo:
        return EngineInfo("vllm", self.max_model_len, self.vocab_size)

    def encode_prompt(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        return encode_prompt(prompt, self.tokenizer, self.vocab_size, self.max_model_len, param)

    def is_ready(self) -> bool:
        return not self.llm.errored

    def check_health(self) -> None:
        if self.llm.errored:
            raise EngineDeadError(f"vLLM engine failed: {self.llm.dead_error!r}")

    def process_ids(self) -> list[int]:
        """vLLM's EngineCore process (its workers are its children)."""
        proc = getattr(getattr(self.llm.engine_core, "resources", None), "engine_manager", None)
        procs = getattr(proc, "processes", None) or []
        return [p.pid for p in procs if getattr(p, "pid", None) is not None]

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[OutputDelta]:
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError as VllmDeadError

        ids = self.encode_prompt(prompt_ids)
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise InvalidRequestError(f"stop_token_ids must be in [0, {self.vocab_size}), got {bad[:5]}",
                                      param="stop_token_ids")
        bad = [t for t, _ in params.logit_bias if t >= self.vocab_size]
        if bad:
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {self.vocab_size}), got {bad[:5]}",
                                      param="logit_bias")
        if self.speculative and (params.processed or params.min_p > 0):  # vLLM ignores min_p and logit_bias there
            neutral = {"logit_bias": (), "min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                       "repetition_penalty": 1.0}
            used = next(n for n, v in neutral.items() if getattr(params, n) != v)
            raise InvalidRequestError(f"{used} is not available with speculative decoding on the vLLM engine",
                                      param=used, code="unsupported_parameter")
        if self.llm.errored:
            raise EngineDeadError(f"vLLM engine failed: {self.llm.dead_error!r}")
        if params.n != 1 or params.best_of is not None:
            raise InvalidRequestError("an engine request is one sequence: n and best_of are fanned out above the "
                                      "engine (the model replica)", param="n")
        if params.structured is not None:  # the native engine's checks and errors; off the event loop
            await asyncio.to_thread(parse, params.structured)
        finished, n_out, first = False, 0, True
        want_lps = params.logprobs is not None
        prompt_lps: list[dict[int, float] | None] = []  # (DELTA outputs may bring them in pieces)
        try:
            async for out in self.llm.generate({"prompt_token_ids": ids}, to_vllm_params(params, self.vocab_size),
                                               request_id):
                prompt_lps += [None if e is None else {t: lp.logprob for t, lp in e.items()}
                               for e in (out.prompt_logprobs or ())]
                c = out.outputs[0]  # DELTA outputs: only what is new
                n_out += len(c.token_ids)
                lps = tuple({t: lp.logprob for t, lp in entry.items()} for entry in (c.logprobs or [])) \
                    if want_lps else None
                finished = out.finished
                # vLLM's engine-core timestamps are time.monotonic() of its process: the same clock as ours.
                scheduled = getattr(out.metrics, "scheduled_ts", None) if first else None
                plp = None
                if params.prompt_logprobs is not None and prompt_lps and (c.token_ids or finished):
                    plp, prompt_lps = tuple(prompt_lps), []  # once, complete: with the first token
                first = False
                yield OutputDelta(request_id, tuple(c.token_ids), c.text, finished, c.finish_reason,
                                  c.stop_reason, lps, len(ids), n_out, out.num_cached_tokens or 0, None,
                                  scheduled or None, plp)
        except VllmDeadError as err:
            finished = True
            raise EngineDeadError(f"vLLM engine died: {err}") from err
        except VLLMValidationError as err:  # refused before it ran (e.g. a schema vLLM's xgrammar cannot take)
            finished = True
            raise InvalidRequestError(str(err), param=err.parameter or (params.structured.param if
                                      params.structured else None), code="invalid_value") from err
        finally:
            if not finished:
                self._stats.aborted += 1  # vLLM's own generate aborts the request when it is cancelled

    def abort(self, request_id: str) -> None:
        import asyncio

        asyncio.get_running_loop().create_task(self.llm.abort(request_id))

    def stats(self, window_s: float = 10.0) -> EngineStats:
        keeper = self._stats
        now = time.monotonic()
        while keeper.tokens and keeper.tokens[0][0] < now - window_s:
            keeper.tokens.popleft()
        # vLLM records stats only on steps; with nothing unfinished the engine holds no blocks at all.
        sched = keeper.scheduler if self.llm.get_num_unfinished_requests() else None
        usage = float(sched.kv_cache_usage) if sched is not None else 0.0
        return EngineStats(
            num_waiting=sched.num_waiting_reqs if sched is not None else 0,
            num_running=sched.num_running_reqs if sched is not None else 0,
            kv_blocks_used=round(usage * self._num_blocks), kv_blocks_total=self._num_blocks, kv_usage=usage,
            prefix_hit_rate=keeper.prefix_hits / keeper.prefix_queries if keeper.prefix_queries else 0.0,
            tokens_per_s=sum(n for _, n in keeper.tokens) / window_s, num_preemptions=keeper.preemptions,
            num_aborted=keeper.aborted,
            spec_acceptance_rate=keeper.accepted_tokens / keeper.draft_tokens if keeper.draft_tokens else 0.0,
            spec_mean_tokens_per_step=1 + keeper.accepted_tokens / keeper.drafts if keeper.drafts else 0.0,
            window_s=window_s)

    def shutdown(self) -> None:
        self.llm.shutdown()
