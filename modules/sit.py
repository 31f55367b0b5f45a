"""Source instance transformer (SIT) of IAT's user-order scheme (arXiv 2604.08933): a causal
transformer over one user's instance tokens in time order, so every position is trained to
predict its own labels from its token and the user's earlier tokens."""

from __future__ import annotations

import torch
from torch import nn

from modules.attention import TransformerBlock, forward_positions

RELEVANCE = 4.0  # initial attention logit per unit of token cosine


class SourceInstanceTransformer(nn.Module):
    """Causal pre-LN transformer over a window of one user's tokens.

    `forward(tokens [B, W, d], valid [B, W], prefix [B, P, d] | None, prefix_valid [B, P] | None)`
    returns [B, W, d] for the window positions only. Window position i attends to valid window
    positions <= i and to every valid prefix position (the user's earlier tokens; the caller
    has stopped their gradients). The prefix is run through the same layers, placed before the
    window, so its keys/values at every layer are what a longer window would have produced.
    Positions count valid entries only, so padding placement does not shift them. Padded
    outputs are zero.

    Content relevance (``relevance``, off by default): every attention score from i to an
    earlier j gets ``relevance * cos(token_i, token_j)`` added (a learned scale, initially
    the given value), computed on the tokens themselves, before ``side`` (the label side
    info) and positions. A past instance like the present one is then attended from the
    first step; without it the query/key projections start unaligned and the SIT never
    learned to match. Measured (2-core CPU, 2,000 users x 100, window 32, one epoch): on the
    seen-before log (label: the item occurs among the last 32) stage-1 valid AUC 0.72 with
    it, 0.51 without (tokens with item reconstruction either way); on the click log it
    costs about 0.01 (0.7158 / 0.7155 against 0.7262 / 0.7265 over seeds 0 / 1), as the
    drifting state asks for recent instances, not similar ones.
    """

    def __init__(
        self,
        dim: int = 64,
        layers: int = 2,
        heads: int = 4,
        ffn_mult: int = 4,
        dropout: float = 0.0,
        max_len: int = 4096,
        relevance: float | None = None,  # initial scale of the content-relevance term; None: off
    ) -> None:
        super().__init__()
        self.dim = dim
        self.max_len = max_len
        self.pos = nn.Embedding(max_len, dim)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, ffn_mult, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.relevance = nn.Parameter(torch.tensor(float(relevance))) if relevance is not None else None

    def forward(
        self,
        tokens: torch.Tensor,
        valid: torch.Tensor,
        prefix: torch.Tensor | None = None,
        prefix_valid: torch.Tensor | None = None,
        side: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``side`` [B, W, d]: side info added to the window's inputs (not to the relevance)."""
        w = tokens.shape[1]
        x, v = tokens, valid.bool()
        if prefix is not None:
            if prefix_valid is None:
                prefix_valid = torch.ones(prefix.shape[:2], dtype=torch.bool, device=prefix.device)
            x = torch.cat([prefix.to(tokens.dtype), tokens], 1)
            v = torch.cat([prefix_valid.bool(), v], 1)
        # Zero padding so that garbage there (even NaN) cannot leak through 0-weight attention.
        x = x.masked_fill(~v[..., None], 0.0)
        n = x.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        # Every query keeps its own key, so padded rows are never fully masked (no NaN).
        mask = ((causal & v[:, None, :]) | eye).unsqueeze(1)  # [B, 1, n, n]
        if self.relevance is not None:
            unit = nn.functional.normalize(x.float(), dim=-1)
            cos = (unit @ unit.transpose(1, 2)).masked_fill(eye, 0.0)  # self: no bonus
            low = torch.finfo(x.dtype).min
            mask = (self.relevance * cos).to(x.dtype).unsqueeze(1).masked_fill(~mask, low)
        if side is not None:
            x = x + nn.functional.pad(side.to(x.dtype), (0, 0, n - w, 0))
        pos = forward_positions(v, self.max_len)
        x = x + self.pos(pos)
        for blk in self.blocks:
            x = blk(x, mask)
        out = self.norm(x[:, n - w :])
        return out.masked_fill(~valid.bool()[..., None], 0.0)
