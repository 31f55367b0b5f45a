"""Feature-interaction blocks over feature tokens x [B, F, d] -> [B, out_dim]."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from modules.mlp import MLP, make_act


class PerGroupLinear(nn.Module):
    """A separate Linear for each of `num_groups` tokens: [B, T, in] -> [B, T, out]."""

    def __init__(self, num_groups: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default init range
        self.weight = nn.Parameter(torch.empty(num_groups, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_groups, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("btd,tdh->bth", x, self.weight) + self.bias


class RankMixerLayer(nn.Module):
    """One RankMixer layer (ByteDance 2025, "RankMixer: Scaling Up Ranking Models in
    Industrial Recommenders"), post-LN as in the paper:
    S = LN(TokenMixing(X) + X);  X' = LN(PFFN(S) + S).
    Token mixing is parameter-free: each token is split into T heads and new token h is the
    concatenation of head h of every token, so each output token sees all features at
    O(1) cost. PFFN gives every token its own FFN weights (heterogeneous feature spaces)."""

    def __init__(self, num_groups: int, dim: int, ffn_mult: int = 4, dropout: float = 0.0, act: str = "gelu") -> None:
        super().__init__()
        if dim % num_groups:
            raise ValueError(f"RankMixer width {dim} must be divisible by num_groups {num_groups}")
        self.t, self.d = num_groups, dim
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            PerGroupLinear(num_groups, dim, ffn_mult * dim),
            make_act(act),
            nn.Dropout(dropout),
            PerGroupLinear(num_groups, ffn_mult * dim, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        mixed = x.reshape(b, self.t, self.t, self.d // self.t).transpose(1, 2).reshape(b, self.t, self.d)
        x = self.norm1(x + mixed)
        return self.norm2(x + self.ffn(x))


class RankMixer(nn.Module):
    """RankMixer over F feature tokens: [B, F, d] -> [B, out_dim].

    Token mixing needs the width to split into F equal heads; when d is not a multiple of F,
    a per-token projection first widens tokens to the next multiple (the paper's tokenizer
    also projects each token group with its own weights). Output: flatten -> Linear to
    `out_dim` (or the flat [B, F * width] when out_dim is None); `self.out_dim` says which.
    """

    def __init__(
        self,
        num_groups: int,
        dim: int,
        layers: int = 2,
        ffn_mult: int = 4,
        out_dim: int | None = None,
        dropout: float = 0.0,
        act: str = "gelu",
    ) -> None:
        super().__init__()
        width = -(-dim // num_groups) * num_groups
        self.num_groups, self.dim, self.width, self.ffn_mult = num_groups, dim, width, ffn_mult
        self.proj = PerGroupLinear(num_groups, dim, width) if width != dim else nn.Identity()
        self.layers = nn.ModuleList(RankMixerLayer(num_groups, width, ffn_mult, dropout, act) for _ in range(layers))
        self.out = nn.Linear(num_groups * width, out_dim) if out_dim is not None else nn.Identity()
        self.out_dim = out_dim if out_dim is not None else num_groups * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for layer in self.layers:
            x = layer(x)
        return self.out(x.flatten(1))

    def flops(self, batch: int) -> float:
        t, w = self.num_groups, self.width
        macs = (t * self.dim * w if w != self.dim else 0) + len(self.layers) * 2 * t * w * self.ffn_mult * w
        macs += t * w * self.out_dim if isinstance(self.out, nn.Linear) else 0
        return 2.0 * batch * macs


class CrossLayer(nn.Module):
    """DCN-V2 cross layer: x_{l+1} = x0 * (W x_l + b) + x_l, with W = U V^T when low-rank."""

    def __init__(self, dim: int, low_rank: int | None = None) -> None:
        super().__init__()
        self.proj = (
            nn.Linear(dim, dim)
            if low_rank is None
            else nn.Sequential(nn.Linear(dim, low_rank, bias=False), nn.Linear(low_rank, dim))
        )

    def forward(self, x0: torch.Tensor, xl: torch.Tensor) -> torch.Tensor:
        return x0 * self.proj(xl) + xl


class DCNv2(nn.Module):
    """DCN-V2 (Wang et al. 2021), stacked: explicit bounded-degree crosses of the flattened
    tokens, then a deep MLP to `out_dim` (default F * d, kept in `self.out_dim`)."""

    def __init__(
        self,
        num_groups: int,
        dim: int,
        layers: int = 2,
        low_rank: int | None = None,
        out_dim: int | None = None,
        deep_hidden: Sequence[int] = (512, 256),
        act: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        n = num_groups * dim
        self.cross = nn.ModuleList(CrossLayer(n, low_rank) for _ in range(layers))
        self.deep = MLP(n, deep_hidden, out_dim if out_dim is not None else n, act=act, dropout=dropout)
        self.out_dim = self.deep.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = x.flatten(1)
        xl = x0
        for layer in self.cross:
            xl = layer(x0, xl)
        return self.deep(xl)

    def flops(self, batch: int) -> float:
        cross = sum(m.in_features * m.out_features for m in self.cross.modules() if isinstance(m, nn.Linear))
        return 2.0 * batch * cross + self.deep.flops(batch)


def make_interaction(
    kind: str, num_groups: int, dim: int, out_dim: int | None, layers: int = 2, **kw: Any
) -> nn.Module:
    """Interaction block by name: "rankmixer" | "dcnv2"; `kw` go to its constructor."""
    if kind == "rankmixer":
        return RankMixer(num_groups, dim, layers=layers, out_dim=out_dim, **kw)
    if kind == "dcnv2":
        return DCNv2(num_groups, dim, layers=layers, out_dim=out_dim, **kw)
    raise ValueError(f"unknown interaction {kind!r}; expected 'rankmixer' or 'dcnv2'")
