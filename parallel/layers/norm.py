"""RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * g, computed in float32 as Llama does."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm.

    Example:
        >>> RMSNorm(4)(torch.ones(2, 4)).shape
        torch.Size([2, 4])
    """

    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused rms_norm on the float32 values, then the gain in the input dtype, as Llama orders it
        # (one kernel instead of pow/mean/add/rsqrt/mul: this op runs twice per layer per step)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
