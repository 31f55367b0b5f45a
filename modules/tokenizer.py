"""Feature-group tokens: pooled embeddings and dense features -> G tokens of width D.

RankMixer-style semantic tokenization: the F pooled feature embeddings (plus one vector
for the dense features) are split into G contiguous groups, and each group has its own
projection to a D-wide token, so the interaction block mixes G tokens, not F features.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from modules.interaction import PerTokenLinear
from modules.mlp import MLP


class FeatureTokenizer(nn.Module):
    def __init__(self, num_features: int, emb_dim: int, dense_in: int, num_tokens: int, token_dim: int):
        super().__init__()
        self.dense = MLP(dense_in, [2 * emb_dim], emb_dim) if dense_in > 0 else None
        inputs = num_features + (1 if dense_in > 0 else 0)
        self.per_group = math.ceil(inputs / num_tokens) * emb_dim
        self.pad = num_tokens * self.per_group - inputs * emb_dim
        self.num_tokens = num_tokens
        self.proj = PerTokenLinear(num_tokens, self.per_group, token_dim)

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """pooled [N, F * emb_dim], dense [N, dense_in] -> tokens [N, G, token_dim]."""
        parts = [pooled]
        if self.dense is not None:
            parts.append(self.dense(dense))
        x = torch.cat(parts, dim=1)
        x = nn.functional.pad(x, (0, self.pad))
        return self.proj(x.view(x.shape[0], self.num_tokens, self.per_group))
