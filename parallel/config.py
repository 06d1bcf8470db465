"""Frozen configuration of the engine: one dataclass per layer, composed into one validated EngineConfig.

Example:
    >>> cfg = EngineConfig.from_options("models/tiny-code-llama", max_num_seqs=8, dtype="float32")
    >>> cfg.scheduler.max_num_seqs
    8
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    """Where the weights are and how to run them.

    Example: ``ModelConfig(path="models/tiny-code-llama", dtype="float32")``.
    """

    path: str
    dtype: str = "auto"  # auto: float32 on CPU, the checkpoint's dtype (float16 -> bfloat16 if unsupported) on CUDA
    device: str = "auto"  # auto: cuda when present, else cpu
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    seed: int = 0
    skip_tokenizer_init: bool = False
    compile: bool = False  # torch.compile the uniform steps (decode, verification); ~15 s per graph at start
    served_model_name: str | None = None  # the ``model_name`` label of its metrics (None: the path, as vLLM)
    disable_log_stats: bool = False  # vLLM's name: no Prometheus metrics from this engine

    def validate(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: fixed-size blocks, sized from a memory budget (or an explicit block count).

    Example: ``CacheConfig(block_size=16, kv_cache_memory_bytes=512 * 2**20)``.
    """

    block_size: int = 16
    kv_cache_memory_bytes: int | None = None  # None: 1 GiB on CPU, gpu_memory_utilization on CUDA
    gpu_memory_utilization: float = 0.85
    num_blocks: int | None = None  # overrides the memory budget (tests use it to force preemption)
    enable_prefix_caching: bool = True

    def validate(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be > 0, got {self.kv_cache_memory_bytes}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Budgets of one step: at most max_num_seqs requests and max_num_batched_tokens tokens.

    Example: ``SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=1024)``.
    """

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 1024
    enable_chunked_prefill: bool = True
    # Tokens per streamed chunk (vLLM's --stream-interval): 1 sends every token at once; n > 1 holds a
    # request's tokens until n are new (the first and the last token always go at once), which cuts the
    # per-chunk cost of every hop behind the engine (replica -> router -> proxy -> client).
    stream_interval: int = 1

    def validate(self) -> None:
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism: ``tensor_parallel_size`` ranks, each a Ray actor in a placement group.

    Example: ``ParallelConfig(tensor_parallel_size=2, placement_strategy="STRICT_PACK")``.
    """

    tensor_parallel_size: int = 1
    placement_strategy: str = "STRICT_PACK"  # SPREAD / STRICT_SPREAD to span nodes
    cpus_per_worker: float = 1.0
    worker_start_timeout_s: float = 300.0
    profile_collectives: bool = False  # time every all-reduce (benchmarks/tensor_parallel.py)

    def validate(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        strategies = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")
        if self.placement_strategy not in strategies:
            raise ValueError(f"placement_strategy must be one of {strategies}, got {self.placement_strategy!r}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Draft/target speculative decoding: a draft model (same tokenizer) proposes k tokens per step.

    Example: ``SpeculativeConfig(draft_path="models/tiny-code-llama-draft", num_speculative_tokens=4)``.
    """

    draft_path: str | None = None
    num_speculative_tokens: int = 0
    external_draft: bool = False  # the caller supplies the proposer (e.g. a draft deployment elsewhere)
    compile_draft: bool = False  # torch.compile the draft's proposal passes (k tiny sequential passes per step)

    @property
    def enabled(self) -> bool:
        return self.draft_path is not None or self.external_draft

    def validate(self) -> None:
        if not self.enabled and self.num_speculative_tokens:
            raise ValueError("num_speculative_tokens needs a draft model (draft_path)")
        if self.draft_path is not None and self.external_draft:
            raise ValueError("give either draft_path or external_draft, not both")
        if self.enabled and not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens}")


@dataclass(frozen=True)
class EngineConfig:
    """The root: every layer's config, validated once at construction.

    Example:
        >>> EngineConfig(model=ModelConfig(path="m")).cache.block_size
        16
    """

    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self) -> None:
        for part in (self.model, self.cache, self.scheduler, self.parallel, self.speculative):
            part.validate()
        if self.speculative.enabled and self.parallel.tensor_parallel_size > 1:
            raise ValueError("speculative decoding with tensor_parallel_size > 1 is not supported yet")
        if self.model.compile and self.parallel.tensor_parallel_size > 1:
            raise ValueError("compile with tensor_parallel_size > 1 is not supported yet (ranks run eager)")

    @classmethod
    def option_names(cls) -> frozenset[str]:
        """Every flat option ``from_options`` accepts: the field names of the layer configs (one vocabulary,
        shared by the vLLM adapter's option table and the cluster schema)."""
        return frozenset(f.name for klass in _OWNERS.values() for f in dataclasses.fields(klass)) - {"path"}

    @classmethod
    def from_options(cls, path: str, **options: Any) -> EngineConfig:
        """Build from flat keyword options named as the layer configs' fields (``dtype=``, ``max_num_seqs=``,
        ``block_size=``, ``kv_cache_memory_bytes=``, ``draft_path=`` ...); any other name is a TypeError."""
        parts: dict[str, dict[str, Any]] = {}
        for key, value in options.items():
            for part, klass in _OWNERS.items():
                if key != "path" and key in {f.name for f in dataclasses.fields(klass)}:
                    parts.setdefault(part, {})[key] = value
                    break
            else:
                raise TypeError(f"unknown engine option {key!r}")
        return cls(
            model=ModelConfig(path=path, **parts.get("model", {})),
            cache=CacheConfig(**parts.get("cache", {})),
            scheduler=SchedulerConfig(**parts.get("scheduler", {})),
            parallel=ParallelConfig(**parts.get("parallel", {})),
            speculative=SpeculativeConfig(**parts.get("speculative", {})),
        )


_OWNERS: dict[str, type] = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "parallel": ParallelConfig,
    "speculative": SpeculativeConfig,
}
