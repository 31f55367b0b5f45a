"""Feature-group tokens: pooled embeddings and dense features -> G tokens of width D.

RankMixer-style semantic tokenization: the F pooled feature embeddings (plus one vector
for the dense features) are split into G contiguous groups, and each group has its own
projection to a D-wide token, so the interaction block mixes G tokens, not F features.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from modules.interaction import PerGroupLinear
from modules.mlp import MLP


class FeatureGroups(nn.Module):
    def __init__(self, num_features: int, emb_dim: int, dense_in: int, num_groups: int, group_dim: int):
        super().__init__()
        self.dense = MLP(dense_in, [2 * emb_dim], emb_dim) if dense_in > 0 else None
        inputs = num_features + (1 if dense_in > 0 else 0)
        self.per_group = math.ceil(inputs / num_groups) * emb_dim
        self.pad = num_groups * self.per_group - inputs * emb_dim
        self.num_groups = num_groups
        self.proj = PerGroupLinear(num_groups, self.per_group, group_dim)

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """pooled [N, F * emb_dim], dense [N, dense_in] -> group tokens [N, G, group_dim]."""
        parts = [pooled]
        if self.dense is not None:
            parts.append(self.dense(dense))
        x = torch.cat(parts, dim=1)
        x = nn.functional.pad(x, (0, self.pad))
        return self.proj(x.view(x.shape[0], self.num_groups, self.per_group))
