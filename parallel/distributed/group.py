"""The tensor-parallel group a model's layers shard over, passed explicitly (no hidden global state).

World size 1 is the in-process case: every collective is the identity. A torch.distributed-backed group
(gloo on CPU, NCCL on CUDA) implements the same three calls for multi-process tensor parallelism.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class CollectiveStats:
    """Time spent in collectives, for benchmarks (``ParallelConfig.profile_collectives``)."""

    calls: int = 0
    seconds: float = 0.0
    bytes: int = 0

    def snapshot_and_reset(self) -> dict[str, float]:
        out = {"calls": self.calls, "seconds": self.seconds, "bytes": self.bytes}
        self.calls, self.seconds, self.bytes = 0, 0.0, 0
        return out


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
    stats: CollectiveStats | None = field(default=None, compare=False)

    @classmethod
    def single(cls) -> TPGroup:
        return cls(0, 1)

    @classmethod
    def connect(cls, rank: int, world_size: int, init_method: str, backend: str | None = None,
                timeout_s: float = 60.0, profile: bool = False) -> TPGroup:
        """Join the process group of this process (one per worker): gloo on CPU, NCCL on CUDA.

        The timeout bounds how long a collective waits for a dead peer before raising.
        """
        if world_size > 1 and not dist.is_initialized():
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        return cls(rank, world_size, CollectiveStats() if profile else None)

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place where the backend allows)."""
        if self.world_size == 1:
            return x
        if self.stats is None:
            dist.all_reduce(x)
            return x
        start = time.perf_counter()
        dist.all_reduce(x)
        self.stats.calls += 1
        self.stats.seconds += time.perf_counter() - start
        self.stats.bytes += x.numel() * x.element_size()
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate the ranks' shards along ``dim``."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=dim)

    def shard(self, size: int, what: str) -> int:
        """This rank's share of ``size`` units; a size the group does not divide is a clear error."""
        if size % self.world_size:
            raise ValueError(f"{what}={size} is not divisible by tensor_parallel_size={self.world_size}")
        return size // self.world_size
