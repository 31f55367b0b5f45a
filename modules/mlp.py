"""A plain multi-layer perceptron, the building block of every other module here."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_ACTS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


def make_act(name: str) -> nn.Module:
    """Activation module by name: "gelu" | "relu" | "silu"."""
    try:
        return _ACTS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTS)}") from None


class MLP(nn.Module):
    """Linear -> [LayerNorm] -> act -> [Dropout] per hidden width, then an optional plain
    Linear to `out_dim` (no activation, so the output can be a logit or a residual branch).

    `self.out_dim` is the output width: `out_dim`, else the last hidden width, else `in_dim`.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int | None = None,
        act: str = "gelu",
        dropout: float = 0.0,
        norm: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if norm:
                layers.append(nn.LayerNorm(h))
            layers.append(make_act(act))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        if out_dim is not None:
            layers.append(nn.Linear(width, out_dim))
            width = out_dim
        self.net = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def flops(self, rows: int) -> float:
        """Forward matmul FLOPs (2 x multiply-adds) for `rows` input rows."""
        return 2.0 * rows * sum(m.in_features * m.out_features for m in self.net if isinstance(m, nn.Linear))
