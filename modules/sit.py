"""Source instance transformer (SIT) of IAT's user-order scheme (arXiv 2604.08933): a causal
transformer over one user's instance tokens in time order, so every position is trained to
predict its own labels from its token and the user's earlier tokens."""

from __future__ import annotations

import torch
from torch import nn

from modules.attention import TransformerBlock, forward_positions, sinusoidal


class SourceInstanceTransformer(nn.Module):
    """Causal pre-LN transformer over a window of one user's tokens.

    `forward(tokens [B, W, d], valid [B, W], prefix [B, P, d] | None, prefix_valid [B, P] | None)`
    returns [B, W, d] for the window positions only. Window position i attends to valid window
    positions <= i and to every valid prefix position (the user's earlier tokens; the caller
    has stopped their gradients). The prefix is run through the same layers, placed before the
    window, so its keys/values at every layer are what a longer window would have produced.
    Positions count valid entries only, so padding placement does not shift them. Padded
    outputs are zero.
    """

    def __init__(
        self,
        dim: int = 64,
        layers: int = 2,
        heads: int = 4,
        ffn_mult: int = 4,
        dropout: float = 0.0,
        max_len: int = 4096,
        pos_emb: str = "learned",
    ) -> None:
        super().__init__()
        if pos_emb not in ("learned", "sinusoidal"):
            raise ValueError(f"pos_emb must be 'learned' or 'sinusoidal', got {pos_emb!r}")
        self.dim = dim
        self.max_len = max_len
        self.pos = nn.Embedding(max_len, dim) if pos_emb == "learned" else None
        if self.pos is not None:
            nn.init.normal_(self.pos.weight, std=0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, ffn_mult, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(
        self,
        tokens: torch.Tensor,
        valid: torch.Tensor,
        prefix: torch.Tensor | None = None,
        prefix_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        w = tokens.shape[1]
        x, v = tokens, valid.bool()
        if prefix is not None:
            if prefix_valid is None:
                prefix_valid = torch.ones(prefix.shape[:2], dtype=torch.bool, device=prefix.device)
            x = torch.cat([prefix.to(tokens.dtype), tokens], 1)
            v = torch.cat([prefix_valid.bool(), v], 1)
        # Zero padding so that garbage there (even NaN) cannot leak through 0-weight attention.
        x = x.masked_fill(~v[..., None], 0.0)
        pos = forward_positions(v, self.max_len)
        x = x + (self.pos(pos) if self.pos is not None else sinusoidal(pos, self.dim).to(x.dtype))

        n = x.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        # Every query keeps its own key, so padded rows are never fully masked (no NaN).
        mask = ((causal & v[:, None, :]) | eye).unsqueeze(1)  # [B, 1, n, n]
        for blk in self.blocks:
            x = blk(x, mask)
        out = self.norm(x[:, n - w :])
        return out.masked_fill(~valid.bool()[..., None], 0.0)
