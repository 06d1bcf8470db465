"""Speculative decoding with the draft as its own deployment (``placement: separate``).

``DraftServer`` holds one draft model for all replicas of a target; each target replica's engine calls it
once per step through a ``ServiceProposer`` (the runner's proposer seam) with only the tokens the draft has
not seen, and gets k proposals per request with their draft distributions. The call is synchronous from the
engine thread: its round trip is added to every decode step (measured in benchmarks/speculative.py).
"""

from __future__ import annotations

from typing import Any

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from parallel.draft_service import DraftService, ServiceProposer
from parallel.speculative import DraftWork


@serve.deployment
class DraftServer:
    """One draft model shared by a target's replicas.

    Example:
        >>> DraftServer.options(name="tiny-code-llama-draft-server").bind("models/tiny-code-llama-draft", k=4)
    """

    def __init__(self, source: str, k: int, max_model_len: int = 1024, kv_cache_memory_bytes: int = 256 << 20,
                 block_size: int = 16, compile: bool = False) -> None:
        from parallel.model_runner import kv_bytes_per_block
        from parallel.models.llama import LlamaArgs
        from parallel.models.loader import read_json

        args = LlamaArgs.from_hf(read_json(source, "config.json"))
        num_blocks = max(kv_cache_memory_bytes // kv_bytes_per_block(args, 1, block_size, torch.float32),
                         -(-max_model_len // block_size))
        self.service = DraftService(source, k, min(max_model_len, args.max_position_embeddings), num_blocks,
                                    block_size, compile=compile)

    def propose(self, client: str, works: list[DraftWork], forgotten: list[str]) -> dict[str, Any]:
        return self.service.propose(client, works, forgotten)

    async def stats(self) -> dict[str, Any]:
        return self.service.stats()


def remote_proposer(handle: DeploymentHandle) -> ServiceProposer:
    """A proposer for a target engine that calls the DraftServer behind ``handle`` (from the engine thread)."""
    return ServiceProposer(lambda client, works, forgotten: handle.propose.remote(client, works, forgotten).result())
