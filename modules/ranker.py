"""Stage 2: the downstream ranker over a user's history of instance tokens.

Per history step: adapt MLP(token) ++ side-info embeddings (labels known before the request
time, time-gap bucket), projected to the reader width: the IAT sequence. A reader
(Transformer, DIN, LONGER-style) reads it with a learned compression of the request's own
features as the query; its output joins the feature-group tokens as one more token before
the interaction block. The hand-crafted behaviour sequence (item ids, categories, masked
labels through trainable tables) is the same branch with other step inputs, beside IAT
(``both``) or alone (the baseline). The token table is frozen: its lookup is detached, so
no gradient ever reaches it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection

from iat_rec.config import ModelConfig
from iat_rec.history import GAP_BUCKETS, LABEL_UNKNOWN
from iat_rec.planning import TOKEN_FEATURE
from modules.attention import small_table_lookup
from modules.compressor import BaseRanker, weighted_bce
from modules.mlp import MLP
from modules.query import QueryCompressor
from modules.readers import make_reader

HISTORY_MODES = ("none", "handcrafted", "iat", "both")
READERS = ("transformer", "din", "longer")


@dataclasses.dataclass
class RankerConfig:
    history: str = "iat"  # none | handcrafted | iat | both
    reader: str = "transformer"  # transformer | din | longer
    max_len: int = 256  # T: history steps per request
    reader_dim: int = 64
    reader_layers: int = 2
    reader_heads: int = 4
    head: tuple[int, ...] = (256, 128)


class HistoryBranch(nn.Module):
    """Step inputs ++ side-info embeddings -> reader width -> reader(query) -> one token."""

    def __init__(self, step_in: int, num_tasks: int, cfg: RankerConfig, out_dim: int, adapt: bool):
        super().__init__()
        d = cfg.reader_dim
        self.adapt = MLP(step_in, [2 * d], d) if adapt else None
        width = (d if adapt else step_in) + (num_tasks + 1) * d
        self.label_emb = nn.ModuleList(nn.Embedding(LABEL_UNKNOWN + 1, d) for _ in range(num_tasks))
        self.gap_emb = nn.Embedding(GAP_BUCKETS, d)
        self.proj = nn.Linear(width, d)
        kw = {} if cfg.reader == "din" else {"layers": cfg.reader_layers, "heads": cfg.reader_heads, "max_len": cfg.max_len + 1}
        self.reader = make_reader(cfg.reader, d, out_dim, **kw)

    def forward(self, steps: torch.Tensor, labels: torch.Tensor, gap: torch.Tensor, valid: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        x = self.adapt(steps) if self.adapt is not None else steps
        parts = [x] + [small_table_lookup(emb, labels[..., k]) for k, emb in enumerate(self.label_emb)]
        parts.append(small_table_lookup(self.gap_emb, gap))
        return self.reader(self.proj(torch.cat(parts, -1)), valid, query)


class Ranker(nn.Module):
    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        dense_in: int,
        num_tasks: int,
        model: ModelConfig,
        cfg: RankerConfig,
        token_table: EmbeddingConfig | None = None,
        seq_tables: list[EmbeddingConfig] | None = None,
        side_tasks: int | None = None,  # label columns of the history's side info (default num_tasks)
    ):
        super().__init__()
        if cfg.history not in HISTORY_MODES:
            raise ValueError(f"history must be one of {HISTORY_MODES}")
        self.use_iat = cfg.history in ("iat", "both")
        self.use_hand = cfg.history in ("handcrafted", "both")
        self.max_len = cfg.max_len
        branches = int(self.use_iat) + int(self.use_hand)
        self.base = BaseRanker(tables, dense_in, model, extra_tokens=branches)
        if branches:
            self.query = QueryCompressor(model.num_tokens * model.token_dim, cfg.reader_dim)
        if self.use_iat:
            assert token_table is not None
            self.tokens = EmbeddingCollection(tables=[token_table], device=torch.device("meta"))
            self.iat = HistoryBranch(token_table.embedding_dim, side_tasks or num_tasks, cfg, model.token_dim, adapt=True)
        if self.use_hand:
            assert seq_tables
            self.seq = EmbeddingCollection(tables=seq_tables, device=torch.device("meta"))
            self.seq_keys = [n for t in seq_tables for n in t.feature_names]
            step_in = sum(t.embedding_dim for t in seq_tables)
            self.hand = HistoryBranch(step_in, side_tasks or num_tasks, cfg, model.token_dim, adapt=False)
        self.head = MLP(model.hidden, cfg.head, num_tasks)

    def forward(self, batch):
        feats = self.base.feature_tokens(batch)  # [B, G, D]
        extra = []
        if self.use_iat or self.use_hand:
            query = self.query(feats.flatten(1))
        if self.use_iat:
            jt = self.tokens(batch.history_ids)[TOKEN_FEATURE]
            steps = jt.to_padded_dense(desired_length=self.max_len).detach().float()  # frozen table
            extra.append(self.iat(steps, batch.hist_labels, batch.hist_gap, batch.hist_valid, query))
        if self.use_hand:
            seq = self.seq(batch.seq)
            steps = torch.cat([seq[k].to_padded_dense(desired_length=self.max_len) for k in self.seq_keys], -1)
            extra.append(self.hand(steps, batch.hist_labels, batch.hist_gap, batch.hist_valid, query))
        tokens = torch.cat([feats] + [e.unsqueeze(1) for e in extra], 1) if extra else feats
        logits = self.head(self.base.interaction(tokens))
        loss = weighted_bce(logits, batch.labels, batch.weights)
        return loss, (loss.detach(), logits.detach().float(), batch.labels, batch.weights, batch.users)
