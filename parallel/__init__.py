"""modelfleet's execution layer: models, paged KV cache, continuous-batching engine, sampling.

    >>> from parallel import LLM, SamplingParams
    >>> LLM("models/tiny-code-llama").generate(["def fibonacci(n):"], SamplingParams(max_tokens=48, temperature=0))
"""

from parallel.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from parallel.engine import LLMEngine
from parallel.engine_stats import EngineStats
from parallel.llm import LLM
from parallel.outputs import CompletionOutput, RequestOutput
from parallel.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "CacheConfig",
    "CompletionOutput",
    "EngineConfig",
    "EngineStats",
    "LLMEngine",
    "ModelConfig",
    "ParallelConfig",
    "RequestOutput",
    "SamplingParams",
    "SchedulerConfig",
]
