"""Stage 1: the instance compressor (IAT's source model).

A base ranker (sharded EmbeddingBagCollection -> feature-group tokens -> interaction
block -> wide hidden h) with a bottleneck ``token = act(W h + b)``: the instance token.
A decompress MLP and one head per task train it on the instance's own labels; the token
never sees labels. In the user-order scheme the tokens of a window of one user's
instances go through the causal SIT before decompression; the stored token is the one
before SIT. Streaming: a window is prefixed with the user's earlier tokens, looked up in an
existing token table with gradients stopped.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedTensor

from iat_rec.batch import Batch
from iat_rec.config import ModelConfig
from iat_rec.planning import TOKEN_FEATURE
from modules.interaction import make_interaction
from modules.mlp import MLP
from modules.sit import SourceInstanceTransformer
from modules.tokenizer import FeatureTokenizer

_ACTS = {"tanh": nn.Tanh, "gelu": nn.GELU, "relu": nn.ReLU, "identity": nn.Identity}


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over tasks of the weight-averaged BCE; padding rows carry weight 0."""
    bce = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none")
    return (bce * weights[:, None]).sum(0).div(weights.sum().clamp(min=1.0)).sum()


class BaseRanker(nn.Module):
    """Sparse + dense features -> feature-group tokens -> interaction -> hidden h."""

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        dense_in: int,
        cfg: ModelConfig,
        extra_tokens: int = 0,
    ):
        super().__init__()
        # on the meta device: DistributedModelParallel materialises the shards
        self.sparse = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
        self.feature_names = [n for t in tables for n in t.feature_names]
        self.tokenizer = FeatureTokenizer(len(self.feature_names), cfg.emb_dim, dense_in, cfg.num_tokens, cfg.token_dim)
        self.interaction = make_interaction(
            cfg.interaction, cfg.num_tokens + extra_tokens, cfg.token_dim, cfg.hidden, layers=cfg.interaction_layers
        )

    def feature_tokens(self, batch: Batch) -> torch.Tensor:
        # a sharded EBC may return its features in plan order: regroup into schema order
        pooled = KeyedTensor.regroup([self.sparse(batch.sparse)], [self.feature_names])[0]
        return self.tokenizer(pooled, batch.dense)


class Compressor(nn.Module):
    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        dense_in: int,
        num_tasks: int,
        cfg: ModelConfig,
        window: int | None = None,  # user order: instances per window (enables SIT)
        prefix_table: EmbeddingConfig | None = None,  # streaming: the token table of earlier tokens
        prefix_len: int = 0,
    ):
        super().__init__()
        self.base = BaseRanker(tables, dense_in, cfg)
        self.bottleneck = nn.Sequential(nn.Linear(cfg.hidden, cfg.iat_dim), _ACTS[cfg.bottleneck_act]())
        self.window, self.prefix_len = window, prefix_len
        self.stream = prefix_table is not None
        if self.stream:  # frozen: its lookup is detached and it gets no optimizer
            self.tokens = EmbeddingCollection(tables=[prefix_table], device=torch.device("meta"))
        self.sit = (
            SourceInstanceTransformer(cfg.iat_dim, layers=cfg.sit_layers, heads=cfg.sit_heads, max_len=4096)
            if window
            else None
        )
        self.decompress = MLP(cfg.iat_dim, cfg.decompress, num_tasks)

    def encode(self, batch: Batch) -> torch.Tensor:
        """The instance token of every row: [N, iat_dim]."""
        h = self.base.interaction(self.base.feature_tokens(batch))
        return self.bottleneck(h)

    def logits(self, batch: Batch, token: torch.Tensor) -> torch.Tensor:
        if self.sit is not None:
            w = self.window
            valid = batch.weights.view(-1, w) > 0
            prefix = prefix_valid = None
            if self.stream:  # the user's earlier tokens from the token table, gradients stopped
                jt = self.tokens(batch.prefix_ids)[TOKEN_FEATURE]
                prefix = jt.to_padded_dense(desired_length=self.prefix_len).detach().float()
                prefix_valid = batch.prefix_valid
            token = self.sit(token.view(-1, w, token.shape[-1]), valid, prefix, prefix_valid)
            token = token.reshape(-1, token.shape[-1])
        return self.decompress(token)

    def forward(self, batch: Batch):
        logits = self.logits(batch, self.encode(batch))
        loss = weighted_bce(logits, batch.labels, batch.weights)
        return loss, (loss.detach(), logits.detach().float(), batch.labels, batch.weights, batch.users)
