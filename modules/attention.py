"""Shared attention pieces: multi-head attention on SDPA, a pre-LN transformer block, a packed
layout of padded sequences and position helpers. Masks are boolean, True = attend, or additive
floats, broadcastable to [B, heads, Lq, Lk]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modules.mlp import MLP


class Packing:
    """The valid rows of a padded [B, L] layout, packed: ``index`` [M] holds each packed row's
    flat slot b * L + l. Layers that treat every position alike run on the M packed rows, not
    on B x L; attention pads its inputs back to [B, L, c] (padding slots read zero) and packs its
    output. Both moves are gathers, each the other's adjoint, so neither direction's backward
    needs an atomic scatter (``index`` holds each slot at most once)."""

    def __init__(self, index: torch.Tensor, batch: int, length: int) -> None:
        self.index, self.batch, self.length = index, batch, length
        rows = index.shape[0]
        # packed row of each slot; ``rows`` (one past the last) on padding slots
        self.slot = index.new_full((batch * length,), rows).scatter_(0, index, torch.arange(rows, device=index.device))

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, *c] -> [M, *c]."""
        return _Gather.apply(x.reshape(self.batch * self.length, *x.shape[2:]), self.index, self.slot)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[M, *c] -> [B, L, *c], zero on padding slots."""
        return _Gather.apply(x, self.slot, self.index).view(self.batch, self.length, *x.shape[1:])


class _Gather(torch.autograd.Function):
    """``out[i] = x[index[i]]``, zero where ``index[i]`` is past ``x``'s rows. ``inverse`` is the
    same map backwards (``x``'s row j went to ``out[inverse[j]]``, or nowhere), so the backward is
    a gather too: each row is read by at most one slot."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse, index)
        return _take(x, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inverse, index = ctx.saved_tensors
        return _take(grad, inverse), None, None


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if not x.shape[0]:
        return x.new_zeros(index.shape[0], *x.shape[1:])
    rows = x[index.clamp(max=x.shape[0] - 1)]
    return rows.masked_fill((index >= x.shape[0]).view(-1, *[1] * (x.dim() - 1)), 0)


class MultiHeadAttention(nn.Module):
    """Multi-head attention through `F.scaled_dot_product_attention`, so CUDA picks the
    flash / memory-efficient kernels. Queries come from `x`; keys and values from `kv`
    (default `x`), which makes the same module serve self- and cross-attention."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        kv: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """[B, Lq, d] queries over [B, Lk, d] keys. With ``packing``, ``kv`` is packed [M, d] and
        attended in its padded layout, and ``x`` is [B, Lq, d] or packed too (output likewise)."""
        kv = x if kv is None else kv
        packed = packing is not None and x.dim() == 2
        q, kv = self.q(x), self.kv(kv)
        if packing is not None:  # the projections ran on the packed rows; attention needs [B, L, c]
            kv = packing.pad(kv)
            q = packing.pad(q) if packed else q
        (b, lq, d), lk, h = q.shape, kv.shape[1], self.heads
        q = q.view(b, lq, h, d // h).transpose(1, 2)
        k, v = kv.view(b, lk, 2, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        o = o.transpose(1, 2).reshape(b, lq, d)
        return self.out(packing.pack(o) if packed else o)


class TransformerBlock(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x), LN(kv)), then x + FFN(LN(x)).
    Pre-LN keeps deep stacks stable without warm-up tricks; callers add a final LayerNorm."""

    def __init__(self, dim: int, heads: int, ffn_mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = MLP(dim, [ffn_mult * dim], dim, act="gelu", dropout=dropout)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv: torch.Tensor | None = None,
        residual: bool = True,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """``residual=False``: the output is what attention read (plus its FFN), without ``x``
        itself: a read-out whose queries only ask (readers read history with a query token).
        ``packing``: ``kv`` (default ``x``) is packed, see ``MultiHeadAttention``."""
        h = self.norm1(x)
        a = self.drop(self.attn(h, h if kv is None else self.norm1(kv), mask, packing))
        x = x + a if residual else a
        return x + self.drop(self.ffn(self.norm2(x)))


def block_flops(lq: int, lk: int, dim: int, ffn_mult: int) -> float:
    """Multiply-adds of one TransformerBlock for one example: Lq query rows over Lk key rows
    (self-attention: lq == lk). Matmuls only; norms, softmax and activations are not counted."""
    proj = 2 * lq * dim * dim + 2 * lk * dim * dim  # q and out on queries; k and v on keys
    return float(proj + 2 * lq * lk * dim + 2 * lq * dim * ffn_mult * dim)


def forward_positions(valid: torch.Tensor, max_len: int) -> torch.Tensor:
    """Index of each valid position among the valid ones, from the start ([B, L] long).
    Counting valid entries only makes positions independent of where padding sits."""
    return (valid.long().cumsum(-1) - 1).clamp(0, max_len - 1)


def recency_positions(valid: torch.Tensor, max_len: int) -> torch.Tensor:
    """Number of valid positions after each one (0 = most recent valid), clamped.
    Readers index by recency: the newest events matter most whatever the history length."""
    v = valid.long()
    return (v.sum(-1, keepdim=True) - v.cumsum(-1)).clamp(0, max_len - 1)


def small_table_lookup(table: nn.Embedding, index: torch.Tensor) -> torch.Tensor:
    """``table(index)`` for [B, L] indices into a small table, with a cheap backward.

    nn.Embedding's backward sorts all B x L indices to sum the gradients of each of the few
    rows: with B 8192 and L 256, the recency-position, label and time-gap lookups of a stage-2
    step took 11 of its 95 ms on an H100. As a gather from the table expanded over the batch,
    the backward is a scatter-add into a [B, rows, d] buffer (atomic adds collide only within
    one request's L indices, not across the batch) and a sum over B (benchmarks/NOTES.md)."""
    if index.dim() != 2:
        raise ValueError(f"small_table_lookup takes [B, L] indices, not {tuple(index.shape)}")
    b, length = index.shape
    rows, dim = table.weight.shape
    index = index.long()[..., None].expand(b, length, dim)
    return torch.gather(table.weight[None].expand(b, rows, dim), 1, index)
