"""Executors drive the model ranks for the engine: one in-process runner, or tensor-parallel Ray workers.

The engine (rank 0's scheduler) hands each step's immutable SchedulerOutput to ``execute`` and gets a
StepResult back; workers never decide anything.
"""

from __future__ import annotations

from typing import Protocol

import torch

from parallel.config import EngineConfig
from parallel.model_runner import ModelRunner
from parallel.models.loader import load_model
from parallel.scheduler import SchedulerOutput, StepResult


class Executor(Protocol):
    """What the engine needs from the ranks."""

    def execute(self, out: SchedulerOutput) -> StepResult: ...

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor: ...

    def check_health(self) -> None: ...

    def shutdown(self) -> None: ...


class UniProcExecutor:
    """World size 1: the model and its KV cache live in the engine's own process.

    Example:
        >>> ex = UniProcExecutor(EngineConfig.from_options("models/tiny-code-llama"), torch.device("cpu"),
        ...                      torch.float32, num_blocks=64)
    """

    def __init__(self, config: EngineConfig, device: torch.device, dtype: torch.dtype, num_blocks: int) -> None:
        model = load_model(config.model.path, dtype, device)
        self.runner = ModelRunner(model, num_blocks, config.cache.block_size, config.model.seed)

    def execute(self, out: SchedulerOutput) -> StepResult:
        return self.runner.execute(out)

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        return self.runner.prompt_logits(token_ids)

    def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        return None


def make_executor(config: EngineConfig, device: torch.device, dtype: torch.dtype, num_blocks: int) -> Executor:
    if config.parallel.tensor_parallel_size == 1:
        return UniProcExecutor(config, device, dtype, num_blocks)
    from parallel.distributed.ray_executor import RayTPExecutor

    return RayTPExecutor(config, device, dtype, num_blocks)
