"""Query of the IAT downstream ranker (arXiv 2604.08933): a learned compression of the
request's own features into one vector in the token space that the readers attend with."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from modules.mlp import MLP


class QueryCompressor(nn.Module):
    """MLP over the concatenated pooled embeddings and dense features -> [B, dim], then
    LayerNorm: the query's scale stays fixed whatever the request features' scale, which
    matters for DIN, whose scorer multiplies q * k directly without a pre-norm."""

    def __init__(
        self, in_dim: int, dim: int, hidden: Sequence[int] = (256,), act: str = "gelu", dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, hidden, dim, act=act, dropout=dropout)
        self.norm = nn.LayerNorm(dim)
        self.out_dim = dim

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """`x`: [B, in_dim], or a sequence of [B, *] parts concatenated on the last dim."""
        if not isinstance(x, torch.Tensor):
            x = torch.cat(list(x), -1)
        return self.norm(self.mlp(x))
