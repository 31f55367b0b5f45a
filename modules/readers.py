"""Sequence readers over an IAT history (arXiv 2604.08933, stage 2): each reads the last T
instance tokens of a user with a query built from the request and returns one vector that
enters the feature-interaction block as an extra token.

Common contract: `forward(seq [B, T, d], valid [B, T] bool, query [B, d], bias [B, T] | None)
-> [B, out_dim]` (the transformer also reads packed steps: `packing`).
Padded entries never influence the output (they are zeroed and masked), and
rows whose history is empty give finite outputs. ``bias`` is a target-aware relevance logit
per history step (stage 2 computes it from the candidate-history target products): it is
added to every attention score toward that step, so a reader can attend to an exact match
with the candidate from the first steps of training instead of first aligning its query and
key projections (measured: a Transformer reader without it stayed at chance on the
seen-before check after 600 steps, where DIN, whose scorer reads q * k, reached 0.99). `flops(batch, T)` counts
forward matmul FLOPs (2 x multiply-adds) for MFU; `reader_flops` gives the same without building weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modules.attention import Packing, TransformerBlock, block_flops, recency_positions, small_table_lookup
from modules.mlp import MLP, make_act


def attention_mask(keys: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, 1, L] mask over L keys (True = attend), or an additive float mask carrying
    ``bias`` [B, L] on the valid keys (masked keys get the dtype's lowest value, not -inf,
    so a row can never turn to NaN)."""
    if bias is None:
        return keys[:, None, None, :]
    return bias.to(dtype).masked_fill(~keys, torch.finfo(dtype).min)[:, None, None, :]


def _zero_padding(seq: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    # Masked keys get weight 0, but 0 * NaN is NaN: clear whatever the padding rows hold.
    return seq.masked_fill(~valid[..., None], 0.0)


class TransformerReader(nn.Module):
    """Bidirectional self-attention over [query; history], read at the query token.

    Why this rather than cross-attention from the query alone: with the query prepended
    (as BST does with the target item) every layer contextualises history tokens with each
    other *and* with the request, so the reader can model order, repeats and
    target-conditioned patterns, which a single query-to-history attention cannot; IAT
    tokens are dense 64-d vectors, so at T = 256 the O(T^2 d) cost stays small beside the
    embedding lookups. The query token is always a valid key, so an empty history still
    has something to attend to (no NaN). Only the query row is read, so the last layer
    computes that row alone (cross-attention from it over the full sequence), saving
    about one layer of work. History tokens get learned recency embeddings
    (0 = most recent valid), which do not depend on where padding sits.
    """

    def __init__(
        self,
        dim: int,
        out_dim: int,
        layers: int = 2,
        heads: int = 4,
        ffn_mult: int = 4,
        dropout: float = 0.0,
        max_len: int = 1024,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError("TransformerReader needs layers >= 1")
        self.dim, self.out_dim, self.layers, self.ffn_mult, self.max_len = dim, out_dim, layers, ffn_mult, max_len
        self.pos = nn.Embedding(max_len, dim)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, ffn_mult, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, out_dim)

    def forward(
        self,
        seq: torch.Tensor,
        valid: torch.Tensor,
        query: torch.Tensor,
        bias: torch.Tensor | None = None,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """``packing`` (of the [B, T] steps): ``seq`` [N, d] and ``bias`` [N] hold the valid steps
        only, so the layers that treat tokens alone run on the B queries and N steps, not on
        B x (1 + T) tokens; attention reads them in the padded layout. Same outputs."""
        valid = valid.bool()
        b, t = valid.shape
        pos = small_table_lookup(self.pos, recency_positions(valid, self.max_len))
        keys = torch.cat([valid.new_ones(b, 1), valid], 1)
        if packing is None:
            seq = _zero_padding(seq, valid) + pos.to(seq.dtype)
            x = torch.cat([query[:, None].to(seq.dtype), seq], 1)  # [B, 1 + T, d]
            tokens = None
        else:
            seq = seq + packing.pack(pos).to(seq.dtype)
            x = torch.cat([query.to(seq.dtype), seq])  # [B + N, d]: the queries, then the steps
            # their slots in the padded [B, 1 + T] layout: b (1 + T) for query b, then after it its steps
            steps = packing.index + packing.index // t + 1
            tokens = Packing(torch.cat([torch.arange(b, device=steps.device) * (t + 1), steps]), b, t + 1)
            bias = None if bias is None else packing.pad(bias)
        mask = attention_mask(keys, None if bias is None else F.pad(bias, (1, 0)), x.dtype)
        for blk in self.blocks[:-1]:
            x = blk(x, mask, packing=tokens)
        head = x[:, :1] if tokens is None else x[:b, None]  # the query rows
        q = self.blocks[-1](head, mask, kv=x, residual=False, packing=tokens)  # last layer: their read-out only
        return self.out(self.norm(q[:, 0]))

    def flops(self, batch: int, T: int, steps: int | None = None) -> float:
        """``steps``: the batch's valid steps, read packed: the layers that treat tokens alone
        run on ``batch + steps`` tokens, not on batch x (1 + T); attention on the padded layout."""
        d, L, f = self.dim, T + 1, self.ffn_mult
        tokens = batch * L if steps is None else batch + steps
        scores = 2 * L * L * d  # q k and weights v of one sequence
        macs = (self.layers - 1) * (tokens * (4 * d * d + 2 * f * d * d) + batch * scores)
        macs += tokens * 2 * d * d + batch * (2 * d * d + 2 * L * d + 2 * f * d * d)  # last: keys of all, queries one
        return 2.0 * (macs + batch * d * self.out_dim)


class DINReader(nn.Module):
    """DIN target attention (Zhou et al. 2018): an MLP scores each history token from
    [q, k, q - k, q * k]; the output is the weighted sum of the history.

    Weights: softmax over valid positions by default (`normalize="softmax"`). DIN keeps raw,
    unnormalised weights to preserve the intensity of interest (how much of the history
    matches), but an IAT history holds every logged instance (impressions, not only clicks)
    and T reaches 256+, so a raw sum scales with history length and activity and makes the
    reader's output scale, and training, unstable; the softmax output stays on the token
    scale. `normalize="none"` gives DIN's raw weighted sum.

    The first layer is linear in [q, k, q - k, q * k], so it is split algebraically:
    q (Wq + Wd) is computed once per request and only [k, q * k] [Wk - Wd, Wp] per history
    step, which halves the per-step cost and never materialises the 4d concat.
    """

    def __init__(
        self,
        dim: int,
        out_dim: int,
        hidden: Sequence[int] = (64, 32),
        act: str = "relu",
        normalize: str = "softmax",
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("DINReader needs at least one hidden width")
        if normalize not in ("softmax", "none"):
            raise ValueError(f"normalize must be 'softmax' or 'none', got {normalize!r}")
        self.dim, self.out_dim, self.normalize = dim, out_dim, normalize
        self.first = nn.Linear(4 * dim, hidden[0])  # over [q, k, q - k, q * k]
        self.act = make_act(act)
        self.score = MLP(hidden[0], hidden[1:], 1, act=act)
        self.out = nn.Linear(dim, out_dim)

    def forward(
        self, seq: torch.Tensor, valid: torch.Tensor, query: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        valid = valid.bool()
        seq = _zero_padding(seq, valid)
        query = query.to(seq.dtype)
        wq, wk, wd, wp = self.first.weight.split(self.dim, dim=1)
        hq = F.linear(query, wq + wd, self.first.bias)  # [B, h]
        hk = F.linear(torch.cat([seq, query[:, None] * seq], -1), torch.cat([wk - wd, wp], 1))  # [B, T, h]
        logits = self.score(self.act(hq[:, None] + hk)).squeeze(-1)  # [B, T]
        if bias is not None:
            logits = logits + bias.to(logits.dtype)
        if self.normalize == "softmax":
            # finfo.min, not -inf: an all-padded row then softmaxes to uniform, zeroed below.
            logits = logits.float().masked_fill(~valid, torch.finfo(torch.float32).min)
            w = torch.softmax(logits, -1) * valid
        else:
            w = logits * valid
        pooled = torch.bmm(w[:, None].to(seq.dtype), seq).squeeze(1)  # [B, d]
        return self.out(pooled)

    def flops(self, batch: int, T: int) -> float:
        d, h0 = self.dim, self.first.out_features
        per_step = 2 * d * h0 + self.score.flops(1) / 2 + d  # [k, q*k] layer, score MLP, pooling
        return 2.0 * batch * (d * h0 + T * per_step + d * self.out_dim)


LONGER_MERGE = 4  # history tokens per merged LONGER token


class LongerReader(nn.Module):
    """LONGER-style reader (ByteDance 2025, "LONGER: Scaling Up Long Sequence Modeling in
    Industrial Recommenders"): global tokens (learned ones plus the query) summarise a
    history shortened by token merging.

    1. Token merge: each `merge` consecutive history tokens are concatenated (order inside
       the group kept) and projected to one token, cutting the length by `merge`. The
       history is left-padded to a multiple of `merge`, so the newest group is full.
    2. Layer 1 is cross-attention from the globals to [globals; merged history]: the cost is
       linear in T, and the globals are always valid keys (no NaN on empty histories).
    3. Layers 2.. are self-attention among the globals.
    The output is the flattened final globals projected to `out_dim`.
    """

    def __init__(
        self,
        dim: int,
        out_dim: int,
        layers: int = 2,
        heads: int = 4,
        num_global: int = 4,
        merge: int = LONGER_MERGE,
        ffn_mult: int = 4,
        dropout: float = 0.0,
        max_len: int = 1024,
    ) -> None:
        super().__init__()
        if layers < 1 or merge < 1 or num_global < 0:
            raise ValueError("LongerReader needs layers >= 1, merge >= 1, num_global >= 0")
        self.dim, self.out_dim, self.layers, self.ffn_mult = dim, out_dim, layers, ffn_mult
        self.merge, self.num_global, self.max_len = merge, num_global, max_len
        self.globals = nn.Parameter(torch.randn(num_global, dim) * 0.02)
        self.merge_proj = nn.Linear(merge * dim, dim)
        self.pos = nn.Embedding(max_len, dim)  # recency of merged groups
        nn.init.normal_(self.pos.weight, std=0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, ffn_mult, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear((num_global + 1) * dim, out_dim)

    def forward(
        self, seq: torch.Tensor, valid: torch.Tensor, query: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        valid = valid.bool()
        b, t, d = seq.shape
        m = self.merge
        seq = _zero_padding(seq, valid)
        pad = (-t) % m  # static (from the shape), not data-dependent
        if pad:
            seq = F.pad(seq, (0, 0, pad, 0))
            valid = F.pad(valid, (pad, 0), value=False)
            bias = F.pad(bias, (pad, 0)) if bias is not None else None
        s = (t + pad) // m
        merged = self.merge_proj(seq.reshape(b, s, m * d))  # [B, S, d]
        mvalid = valid.view(b, s, m).any(-1)
        if bias is not None:  # a merged group is as relevant as its most relevant step
            bias = (
                bias.masked_fill(~valid, torch.finfo(bias.dtype).min).view(b, s, m).amax(-1).masked_fill(~mvalid, 0.0)
            )
        merged = merged + small_table_lookup(self.pos, recency_positions(mvalid, self.max_len)).to(merged.dtype)

        g = torch.cat([self.globals.to(merged.dtype).expand(b, -1, -1), query[:, None].to(merged.dtype)], 1)
        kv = torch.cat([g, merged], 1)
        kvalid = torch.cat([mvalid.new_ones(b, g.shape[1]), mvalid], 1)
        kbias = None if bias is None else F.pad(bias, (g.shape[1], 0))
        g = self.blocks[0](g, attention_mask(kvalid, kbias, g.dtype), kv=kv)
        for blk in self.blocks[1:]:
            g = blk(g)
        return self.out(self.norm(g).flatten(1))

    def flops(self, batch: int, T: int) -> float:
        d, g = self.dim, self.num_global + 1
        s = -(-T // self.merge)
        macs = s * self.merge * d * d  # merge projection
        macs += block_flops(g, g + s, d, self.ffn_mult)
        macs += (self.layers - 1) * block_flops(g, g, d, self.ffn_mult)
        macs += g * d * self.out_dim
        return 2.0 * batch * macs


_READERS: dict[str, type[nn.Module]] = {
    "transformer": TransformerReader,
    "din": DINReader,
    "longer": LongerReader,
}


def make_reader(kind: str, dim: int, out_dim: int, **kw: Any) -> nn.Module:
    """Reader by name: "transformer" | "din" | "longer"; `kw` go to its constructor."""
    try:
        cls = _READERS[kind]
    except KeyError:
        raise ValueError(f"unknown reader {kind!r}; expected one of {sorted(_READERS)}") from None
    return cls(dim, out_dim, **kw)


def reader_flops(kind: str, batch: int, T: int, dim: int, out_dim: int, steps: int | None = None, **kw: Any) -> float:
    """Forward matmul FLOPs of `make_reader(kind, dim, out_dim, **kw)` on a [batch, T] history.
    Built on the meta device, so nothing is allocated; counts the full padded length T, or with
    ``steps`` (the transformer's packed read) that many valid steps."""
    with torch.device("meta"):
        reader = make_reader(kind, dim, out_dim, **kw)
    return reader.flops(batch, T) if steps is None else reader.flops(batch, T, steps)
