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
from parallel.sampling_params import SamplingParams
from parallel.speculative import DraftProposer, Proposer
from parallel.step_messages import SchedulerOutput, StepResult


class Executor(Protocol):
    """What the engine needs from the ranks."""

    def add_request(self, request_id: str, params: SamplingParams) -> None: ...

    def execute(self, out: SchedulerOutput) -> StepResult: ...

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor: ...

    def check_health(self) -> None: ...

    def worker_pids(self) -> list[int]: ...

    def shutdown(self) -> None: ...


class UniProcExecutor:
    """World size 1: the model and its KV cache live in the engine's own process.

    Example:
        >>> ex = UniProcExecutor(EngineConfig.from_options("models/tiny-code-llama"), torch.device("cpu"),
        ...                      torch.float32, num_blocks=64, max_model_len=1024)
    """

    def __init__(self, config: EngineConfig, device: torch.device, dtype: torch.dtype, num_blocks: int,
                 max_model_len: int, proposer: Proposer | None = None) -> None:
        model = load_model(config.model.path, dtype, device)
        spec = config.speculative
        if spec.external_draft and proposer is None:
            raise ValueError("external_draft needs a proposer")
        if spec.draft_path is not None:
            draft = load_model(spec.draft_path, dtype, device)
            if draft.args.vocab_size != model.args.vocab_size:
                raise ValueError(f"draft vocab_size={draft.args.vocab_size} differs from the target's "
                                 f"{model.args.vocab_size}: the draft must share the target's tokenizer")
            proposer = DraftProposer(draft, num_blocks, config.cache.block_size, spec.num_speculative_tokens,
                                     max_model_len, compile=spec.compile_draft)
        self.runner = ModelRunner(model, num_blocks, config.cache.block_size, config.model.seed, proposer=proposer,
                                  compile=config.model.compile)

    def add_request(self, request_id: str, params: SamplingParams) -> None:
        self.runner.add_request(request_id, params)

    def execute(self, out: SchedulerOutput) -> StepResult:
        return self.runner.execute(out)

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        return self.runner.prompt_logits(token_ids)

    def check_health(self) -> None:
        return None

    def worker_pids(self) -> list[int]:
        return []

    def shutdown(self) -> None:
        return None


def make_executor(config: EngineConfig, device: torch.device, dtype: torch.dtype, num_blocks: int,
                  max_model_len: int, proposer: Proposer | None = None) -> Executor:
    if config.parallel.tensor_parallel_size == 1:
        return UniProcExecutor(config, device, dtype, num_blocks, max_model_len, proposer)
    from parallel.distributed.ray_executor import RayTPExecutor

    return RayTPExecutor(config, device, dtype, num_blocks)
