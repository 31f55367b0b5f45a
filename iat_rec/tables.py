"""Every embedding table of the models: names, TorchRec configs and sizes.

One home for the names both stages and the planner share: the feature tables ``t_<feature>``
(pooled, or unpooled for sequence features that a hand-crafted history also reads), and the
frozen token table ``TOKEN_TABLE`` with its lookup features, held at module path
``TOKENS_PATH`` by every model that has one. The nn modules build their tables from here;
nothing here plans or shards.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import (
    DATA_TYPE_NUM_BITS,
    BaseEmbeddingConfig,
    DataType,
    EmbeddingBagConfig,
    EmbeddingConfig,
)
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from iat_rec.data.schema import Schema
from iat_rec.errors import IatError

TOKEN_TABLE = "iat_tokens"
TOKEN_FEATURE = "history_ids"
CANDIDATE_FEATURE = "candidate_ids"  # stage 2's token query: the candidate instance's own row

# Module paths of the tables: the token table is at TOKENS_PATH in every model that has one;
# build_tables_module also uses FEATURES_PATH. Frozen is marked by requires_grad (frozen_collection).
FEATURES_PATH = "features"
TOKENS_PATH = "tokens"

TOKEN_DTYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16}
TABLE_DTYPES = TOKEN_DTYPES  # the feature tables' weights (ModelConfig.table_dtype)


def feature_table_configs(schema: Schema, dim: int) -> list[EmbeddingBagConfig]:
    """One pooled table per sparse feature of the schema, named ``t_<feature>``."""
    return [
        EmbeddingBagConfig(
            name=f"t_{f.name}",
            feature_names=[f.name],
            num_embeddings=f.num_embeddings,
            embedding_dim=dim,
        )
        for f in schema.sparse
    ]


def history_feature(feature: str) -> str:
    """The KJT key of a sequence feature's hand-crafted history (the same table as ``feature``)."""
    return f"seq_{feature}"


def model_tables(
    schema: Schema, dim: int, history: bool = False, dtype: str = "fp32"
) -> tuple[list[EmbeddingBagConfig], list[EmbeddingConfig]]:
    """The base ranker's tables, named ``t_<feature>`` in both stages (one sharding plan).

    Pooled tables (an EmbeddingBagCollection) hold the features that no history reads. The
    schema's sequence features get unpooled tables (an EmbeddingCollection) so that, with
    ``history``, one table serves both the candidate's feature and its hand-crafted history
    (key ``history_feature(f)``): an exact id match between them is a match in one
    embedding space, as in DIN, BST and TorchRec's sequence examples. ``dtype``: the weights'
    (fp16 halves their memory and bandwidth; FBGEMM's fused optimizer rounds stochastically).
    """
    if dtype not in TABLE_DTYPES:
        raise IatError(f"table dtype '{dtype}' not in {sorted(TABLE_DTYPES)}")
    shared = set(schema.sequence)
    bags = [
        EmbeddingBagConfig(
            name=f"t_{f.name}",
            feature_names=[f.name],
            num_embeddings=f.num_embeddings,
            embedding_dim=dim,
            data_type=TABLE_DTYPES[dtype],
        )
        for f in schema.sparse
        if f.name not in shared
    ]
    ids = [
        EmbeddingConfig(
            name=f"t_{f}",
            feature_names=[f, history_feature(f)] if history else [f],
            num_embeddings=schema.feature(f).num_embeddings,
            embedding_dim=dim,
            data_type=TABLE_DTYPES[dtype],
        )
        for f in schema.sequence
    ]
    return bags, ids


def token_table_config(
    rows: int, dim: int = 64, dtype: str = "fp32", features: tuple[str, ...] = (TOKEN_FEATURE,)
) -> EmbeddingConfig:
    """The token table: row i is the token of instance i, looked up unpooled by ``features``
    (TOKEN_FEATURE for histories; stage 2 adds CANDIDATE_FEATURE for the candidate's own token)."""
    if dtype not in TOKEN_DTYPES:
        raise IatError(f"token dtype '{dtype}' not in {sorted(TOKEN_DTYPES)}")
    if rows < 1 or dim < 1:
        raise IatError(f"token table needs rows >= 1 and dim >= 1 (got rows={rows}, dim={dim})")
    return EmbeddingConfig(
        name=TOKEN_TABLE,
        feature_names=list(features),
        num_embeddings=int(rows),
        embedding_dim=dim,
        data_type=TOKEN_DTYPES[dtype],
    )


def build_tables_module(
    feature_tables: list[EmbeddingBagConfig],
    token_table: EmbeddingConfig | None = None,
    device: str | torch.device = "meta",
) -> nn.Module:
    """Feature tables at ``features`` and the token table at ``tokens``, on meta by default.

    Meta tensors have shapes and dtypes but no storage, so a 10^10-row table plans on a laptop.
    """
    m = nn.Module()
    if feature_tables:
        m.add_module(FEATURES_PATH, EmbeddingBagCollection(tables=feature_tables, device=torch.device(device)))
    if token_table is not None:
        m.add_module(TOKENS_PATH, frozen_collection(token_table, device))
    return m


def frozen_collection(table: EmbeddingConfig, device: str | torch.device = "meta") -> EmbeddingCollection:
    """An EmbeddingCollection marked frozen (``requires_grad=False``): the trainer gives it no
    optimizer and leaves it out of checkpoints (``train.trainer.frozen_tables``)."""
    return EmbeddingCollection(tables=[table], device=torch.device(device)).requires_grad_(False)


def table_bytes(cfg: BaseEmbeddingConfig) -> int:
    return cfg.num_embeddings * cfg.embedding_dim * DATA_TYPE_NUM_BITS[cfg.data_type] // 8


def module_table_configs(module: nn.Module) -> list[BaseEmbeddingConfig]:
    """Every table config of the EmbeddingBagCollections/EmbeddingCollections in ``module``."""
    out: list[BaseEmbeddingConfig] = []
    for m in module.modules():
        if isinstance(m, EmbeddingBagCollection):
            out += m.embedding_bag_configs()
        elif isinstance(m, EmbeddingCollection):
            out += m.embedding_configs()
    return out
