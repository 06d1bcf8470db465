"""Token embedding and LM head, replicated on every rank.

Replicated rather than vocab-sharded: the vocabularies we serve are small next to the decoder stack, and a
replicated head needs no all-gather of logits before sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Embedding(nn.Module):
    """Lookup table [vocab, hidden]; ``logits(h)`` reuses it as the output projection when tied.

    Example:
        >>> Embedding(10, 4)(torch.tensor([1, 2])).shape
        torch.Size([2, 4])
    """

    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)
