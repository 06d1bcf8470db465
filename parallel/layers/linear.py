"""Column- and row-parallel linear layers (Megatron-LM, Shoeybi et al. 2019, section 3).

A column-parallel layer splits the output features across ranks (no communication); a row-parallel layer
splits the input features and sums the partial products with one all-reduce. Each parameter carries a
``weight_loader(param, full_checkpoint_tensor, shard_id)`` that copies this rank's slice, so loading a
checkpoint is the same code at every world size.

Example:
    >>> from parallel.distributed import TPGroup
    >>> lin = QKVParallelLinear(64, head_dim=16, num_heads=4, num_kv_heads=2, bias=False, tp=TPGroup.single())
    >>> lin.weight.shape
    torch.Size([128, 64])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parallel.distributed import TPGroup


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class ColumnParallelLinear(nn.Module):
    """y = x A^T with A split by rows (output features) across ranks; each rank keeps its slice of y."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.out_local = tp.shard(out_features, "output features")
        self.weight = _param(self.out_local, in_features)
        self.weight.weight_loader = self.weight_loader
        self.bias = _param(self.out_local) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        size = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp.rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (gate and up of SwiGLU)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, tp: TPGroup) -> None:
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        assert isinstance(shard_id, int)
        world = self.tp.world_size
        offset = sum(self.out_sizes[:shard_id]) // world
        size = self.out_sizes[shard_id] // world
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp.rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused, sharded by heads.

    Query heads split evenly. KV heads split evenly when there are at least as many as ranks; otherwise
    (GQA with fewer KV heads than ranks) each KV head is replicated on world/num_kv_heads ranks, and rank r
    holds KV head r * num_kv_heads // world, the one its query heads attend to.
    """

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 tp: TPGroup) -> None:
        world = tp.world_size
        self.head_dim = head_dim
        self.num_heads = tp.shard(num_heads, "num_attention_heads")
        if num_kv_heads >= world:
            self.num_kv_heads = tp.shard(num_kv_heads, "num_key_value_heads")
        elif world % num_kv_heads:
            raise ValueError(f"tensor_parallel_size={world} is not a multiple of num_key_value_heads={num_kv_heads}")
        else:
            self.num_kv_heads = 1
        self.total_kv_heads = num_kv_heads
        out_local = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden, out_local * world, bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        rank, world = self.tp.rank, self.tp.world_size
        if shard_id == "q":
            offset, size, start = 0, q_size, rank * q_size
        else:
            kv_head = rank * self.total_kv_heads // world if self.total_kv_heads < world else rank * self.num_kv_heads
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, start = kv_size, kv_head * self.head_dim
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, start, size))

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return qkv.split([q_size, kv_size, kv_size], dim=-1)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r A_r^T: input features split across ranks, one all-reduce, bias added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.in_local = tp.shard(in_features, "input features")
        self.weight = _param(out_features, self.in_local)
        self.weight.weight_loader = self.weight_loader
        self.bias = _param(out_features) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self.bias_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        size = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp.rank * size, size))

    @staticmethod
    def bias_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y
