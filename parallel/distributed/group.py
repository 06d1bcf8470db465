"""The tensor-parallel group a model's layers shard over, passed explicitly (no hidden global state).

World size 1 is the in-process case: every collective is the identity. A torch.distributed-backed group
(gloo on CPU, NCCL on CUDA) implements the same three calls for multi-process tensor parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TPGroup:
    """Rank and size of a tensor-parallel group, with its collectives.

    Example:
        >>> g = TPGroup.single()
        >>> g.all_reduce(torch.ones(2)).tolist(), g.world_size
        ([1.0, 1.0], 1)
    """

    rank: int = 0
    world_size: int = 1

    @classmethod
    def single(cls) -> TPGroup:
        return cls(0, 1)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place where the backend allows)."""
        if self.world_size == 1:
            return x
        torch.distributed.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate the ranks' shards along ``dim``."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=dim)

    def shard(self, size: int, what: str) -> int:
        """This rank's share of ``size`` units; a size the group does not divide is a clear error."""
        if size % self.world_size:
            raise ValueError(f"{what}={size} is not divisible by tensor_parallel_size={self.world_size}")
        return size // self.world_size
