"""Stage 1: the instance compressor (IAT's source model).

A base ranker (sharded EmbeddingBagCollection -> feature-group tokens -> interaction
block -> wide hidden h) with a bottleneck ``token = tanh(s * LN(W h + b))``: the instance
token (``Bottleneck`` says why it is normalised).
A decompress MLP and one head per task train it on the instance's own labels; the token
never sees labels. In the user-order scheme the tokens of a window of one user's
instances go through the causal SIT before decompression, each with the labels of the
user's previous instance once they were known (side info, as stage 2 reads histories); the
stored token is the one before SIT. Streaming: a window is prefixed with the user's earlier tokens, looked up in an
existing token table with gradients stopped. With ``reconstruct`` > 0 the token also has to
recover some of its instance's own feature embeddings (``InstanceReconstruction``), so that it
stays readable as history.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from iat_rec.batching.batch import Batch
from iat_rec.batching.history import LABEL_UNKNOWN
from iat_rec.tables import TOKEN_FEATURE, frozen_collection
from iat_rec.train.config import ModelConfig
from modules.feature_groups import FeatureGroups
from modules.interaction import make_interaction
from modules.mlp import MLP
from modules.sit import RELEVANCE as SIT_RELEVANCE
from modules.sit import SourceInstanceTransformer

BOTTLENECK_ACTS = ("tanh", "identity")


def bf16_autocast(module: nn.Module, enabled: bool) -> torch.autocast:
    """bf16 autocast on ``module``'s device: taken from a parameter, not from an input, because
    TorchRec's pipeline traces forwards with fx, where an input's device is a proxy and autocast
    needs a str."""
    return torch.autocast(next(module.parameters()).device.type, dtype=torch.bfloat16, enabled=enabled)


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over tasks of the weight-averaged BCE; padding rows carry weight 0."""
    bce = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none")
    return (bce * weights[:, None]).sum(0).div(weights.sum().clamp(min=1.0)).sum()


class Bottleneck(nn.Module):
    """The instance token: ``tanh(scale * LN(W h + b))``, LayerNorm without affine parameters.

    A plain ``tanh(W h + b)`` on the unnormalised hidden h saturated within 50 steps: Adam
    grows W along the directions h shares across instances, every entry reaches +-1, the
    per-dimension std across instances falls to 0 (every instance gets the same token) and
    no gradient reaches the base ranker (stage-1 valid AUC 0.53 where the same features
    give 0.71). Normalising the pre-activation fixes its scale for every instance and
    every step: each token's entries have mean 0 and variance 1 before tanh, so with
    ``scale`` 0.5 an entry needs a pre-activation 5.3 standard deviations out to pass
    |t| > 0.99. The token stays in tanh's near-linear range, gradients flow, and it stays
    bounded in (-1, 1), so fp16 storage loses nothing. With ``act="identity"`` the token is
    the normalised pre-activation itself (unbounded but of fixed scale).
    """

    def __init__(self, hidden: int, dim: int, act: str = "tanh", scale: float = 0.5):
        super().__init__()
        if act not in BOTTLENECK_ACTS:
            raise ValueError(f"bottleneck act must be one of {BOTTLENECK_ACTS}, not {act!r}")
        self.proj = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.act, self.scale = act, scale

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.norm(self.proj(h))
        return torch.tanh(self.scale * z) if self.act == "tanh" else z


@torch.fx.wrap
def pool_jagged(jt: JaggedTensor, rows: int) -> torch.Tensor:
    """Sum of each row's embeddings of an unpooled lookup: [rows, dim] (the EBC's SUM pooling).
    fx-wrapped: TorchRec's pipeline tracer keeps it a leaf (its sizes depend on the data)."""
    values = jt.values()
    segment = torch.repeat_interleave(
        torch.arange(rows, device=values.device), jt.lengths().long(), output_size=values.shape[0]
    )
    return torch.zeros(rows, values.shape[1], dtype=values.dtype, device=values.device).index_add_(0, segment, values)


class BaseRanker(nn.Module):
    """Sparse + dense features -> feature-group tokens -> interaction -> hidden h.

    Features that no history reads go through a pooled EmbeddingBagCollection (``sparse``);
    the schema's sequence features through an EmbeddingCollection (``shared``) whose tables
    stage 2 also uses for the hand-crafted history (``iat_rec.tables.model_tables``).
    """

    def __init__(
        self,
        tables: tuple[list[EmbeddingBagConfig], list[EmbeddingConfig]],
        dense_in: int,
        cfg: ModelConfig,
        extra_groups: int = 0,
    ):
        super().__init__()
        bags, shared = tables
        # on the meta device: DistributedModelParallel materialises the shards
        self.sparse = EmbeddingBagCollection(tables=bags, device=torch.device("meta")) if bags else None
        self.shared = EmbeddingCollection(tables=shared, device=torch.device("meta")) if shared else None
        self.bag_names = [n for t in bags for n in t.feature_names]
        self.shared_names = [t.feature_names[0] for t in shared]  # the candidate's own features
        self.grouping = FeatureGroups(
            len(self.bag_names) + len(self.shared_names), cfg.emb_dim, dense_in, cfg.num_groups, cfg.group_dim
        )
        self.interaction = make_interaction(
            cfg.interaction, cfg.num_groups + extra_groups, cfg.group_dim, cfg.hidden, layers=cfg.interaction_layers
        )

    def embed(self, batch: Batch) -> tuple[torch.Tensor, dict[str, JaggedTensor]]:
        """(pooled [N, F * emb_dim] in bag-then-shared feature order, the shared lookups by key)."""
        parts, looked_up = [], {}
        if self.sparse is not None:
            # a sharded EBC may return its features in plan order: regroup into schema order
            parts.append(KeyedTensor.regroup([self.sparse(batch.sparse)], [self.bag_names])[0])
        if self.shared is not None:
            looked_up = self.shared(batch.shared)
            rows = batch.dense.shape[0]
            parts += [pool_jagged(looked_up[f], rows) for f in self.shared_names]
        return torch.cat(parts, dim=1), looked_up

    def group_features(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.grouping(pooled, dense)


class InstanceReconstruction(nn.Module):
    """Recovers chosen feature embeddings of each instance from its token, by in-batch contrast.

    Per feature, a linear read-out of the token must be closer (cosine / ``temp``) to the
    row's own embedding of that feature than to the other rows' (rows with the same value
    count as positives); the loss is the InfoNCE averaged over rows, then features. Why:
    trained on its own labels alone, a token keeps only what predicts its own instance, at
    the limit a score, and loses which item it was. A history of such tokens cannot tell
    that the candidate was met before: on the seen-before log (2-core CPU, 2,000 users x
    100, T 32) the nearest-neighbour cosine among a row's history tokens separated the label
    with AUC 0.51 and stage 2 stayed at 0.49; with item_id and category recovered (weight
    0.1) 0.93 and 0.99. Targets are the detached embeddings: the loss shapes the token,
    not the tables. At most ``negatives`` rows of the batch are the candidates.
    """

    def __init__(
        self, dim: int, features: int, emb_dim: int, temp: float = 0.1, negatives: int = 1024, anchors: int = 8192
    ):
        super().__init__()
        self.read = nn.Linear(dim, features * emb_dim)
        self.features, self.emb_dim, self.temp, self.negatives, self.anchors = (
            features,
            emb_dim,
            temp,
            negatives,
            anchors,
        )
        # a fixed generic direction: equal embeddings, and only they, project equally
        probe = torch.randn(emb_dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.register_buffer("probe", probe, persistent=False)

    def forward(self, token: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """token [N, d], targets [N, F * emb_dim] (detached), weights [N] (0: padding) -> scalar.
        At most ``anchors`` rows are scored (the [F, rows, candidates] logits bound the memory)."""
        token, targets, weights = token[: self.anchors], targets[: self.anchors], weights[: self.anchors]
        n, f, e = token.shape[0], self.features, self.emb_dim
        pred = nn.functional.normalize(self.read(token.float()).view(n, f, e), dim=-1).transpose(0, 1)  # [F, N, e]
        raw = targets.view(n, f, e).transpose(0, 1)
        target = nn.functional.normalize(raw.float(), dim=-1)
        m = min(n, self.negatives)
        cand, cand_ok = target[:, :m], weights[:m] > 0
        # the rows holding the row's own value: equal embeddings, compared exactly through a
        # float64 projection (a cosine threshold would depend on the matmul's precision, TF32 or bf16)
        key = (raw.double() * self.probe.to(raw.device)).sum(-1)  # [F, N]
        same = key[:, :, None] == key[:, None, :m]  # [F, N, M]
        logits = (pred @ cand.transpose(1, 2) / self.temp).masked_fill(~cand_ok, float("-inf"))
        pos = logits.masked_fill(~same, float("-inf")).logsumexp(-1)
        has = torch.isfinite(pos) & (weights > 0)  # real rows whose value is among the candidates
        nce = torch.where(has, logits.logsumexp(-1) - pos, torch.zeros_like(pos))  # [F, N]
        return (nce.sum(1) / has.sum(1).clamp(min=1)).mean()


class Compressor(nn.Module):
    def __init__(
        self,
        tables: tuple[list[EmbeddingBagConfig], list[EmbeddingConfig]],
        dense_in: int,
        num_tasks: int,
        cfg: ModelConfig,
        window: int | None = None,  # user order: instances per window (enables SIT)
        prefix_table: EmbeddingConfig | None = None,  # streaming: the token table of earlier tokens
        prefix_len: int = 0,
        side_tasks: int = 0,  # label columns of the SIT's side info (cfg.sit_labels)
        reconstruct: float = 0.0,  # weight of the InstanceReconstruction loss (0: off)
        reconstruct_features: tuple[str, ...] = (),  # the sparse features it recovers
        bf16: bool = False,  # the dense part under bf16 autocast; tokens, logits and the loss in fp32
    ):
        super().__init__()
        self.bf16 = bf16
        self.graph_steps = False  # compile_dense in mode reduce-overhead: each forward starts a CUDA-graph step
        self.base = BaseRanker(tables, dense_in, cfg)
        self.bottleneck = Bottleneck(cfg.hidden, cfg.iat_dim, cfg.bottleneck_act)
        self.window, self.prefix_len = window, prefix_len
        self.stream = prefix_table is not None
        if self.stream:  # frozen: its lookup is detached, and it gets no optimizer and no checkpoint
            self.tokens = frozen_collection(prefix_table)
        self.sit = (
            SourceInstanceTransformer(
                cfg.iat_dim,
                layers=cfg.sit_layers,
                heads=cfg.sit_heads,
                max_len=4096,
                relevance=SIT_RELEVANCE if cfg.sit_relevance else None,
            )
            if window
            else None
        )
        # the SIT's side info: each instance's input also carries the labels of the user's
        # previous instance as known at its time, so later positions read (token, label) pairs
        # as stage 2 does, and the tokens learn what makes a past label informative
        self.label_emb = (
            nn.ModuleList(nn.Embedding(LABEL_UNKNOWN + 1, cfg.iat_dim) for _ in range(side_tasks))
            if window and cfg.sit_labels and side_tasks
            else None
        )
        self.decompress = MLP(cfg.iat_dim, cfg.decompress, num_tasks)
        self.reconstruct = reconstruct
        self.reconstruction = None
        if reconstruct > 0:
            names = self.base.bag_names + self.base.shared_names
            missing = sorted(set(reconstruct_features) - set(names))
            if missing or not reconstruct_features:
                raise ValueError(
                    f"reconstruct_features must be sparse features of the model ({names}), "
                    f"not {list(reconstruct_features)}"
                )
            cols = torch.arange(len(names) * cfg.emb_dim).view(len(names), cfg.emb_dim)
            picked = cols[[names.index(n) for n in reconstruct_features]].flatten()
            self.register_buffer(
                "reconstruct_cols", picked, persistent=False
            )  # derived from the config: not checkpointed
            self.reconstruction = InstanceReconstruction(cfg.iat_dim, len(reconstruct_features), cfg.emb_dim)

    def compile_dense(self, mode: str = "reduce-overhead") -> None:
        """torch.compile each dense module in place: feature groups, interaction, bottleneck,
        SIT, heads (and the reconstruction). Each is a leaf of TorchRec's pipeline tracer (no
        sharded module inside), and its state-dict keys stay the eager model's. The default mode
        replays each region as a CUDA graph on a GPU: stage 1's dense part is many small
        kernels whose launches the host would otherwise issue one by one. On a CPU the mode only
        compiles."""
        for m in (self.base.grouping, self.base.interaction, self.bottleneck, self.sit, self.decompress):
            if m is not None:
                m.compile(mode=mode)
        if self.reconstruction is not None:
            self.reconstruction.compile(mode=mode)
        self.graph_steps = mode == "reduce-overhead"

    def encode(self, batch: Batch) -> torch.Tensor:
        """The instance token of every row: [N, iat_dim]."""
        return self._encode(batch)[0]

    def _encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [N, iat_dim], the pooled feature embeddings they were made from)."""
        pooled, _ = self.base.embed(batch)
        return self.token(pooled, batch.dense), pooled

    def token(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """The instance token from the pooled feature embeddings (bag-then-shared feature order)
        and the dense features: everything after the lookups, also served by ``iat_rec.tokens.online``.
        In fp32 whatever ``bf16`` computes in, so the token table's bytes mean one thing."""
        with self._autocast():
            token = self.bottleneck(self.base.interaction(self.base.group_features(pooled, dense)))
        return token.float()

    def _autocast(self):
        return bf16_autocast(self.bottleneck, self.bf16)  # the bottleneck: serving keeps it

    def logits(self, batch: Batch, token: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self._logits(batch, token).float()

    def _logits(self, batch: Batch, token: torch.Tensor) -> torch.Tensor:
        if self.sit is not None:
            w = self.window
            valid = batch.weights.view(-1, w) > 0
            prefix = prefix_valid = None
            if self.stream:  # the user's earlier tokens from the token table, gradients stopped
                jt = self.tokens(batch.prefix_ids)[TOKEN_FEATURE]
                prefix = jt.to_padded_dense(desired_length=self.prefix_len).detach().float()
                prefix_valid = batch.prefix_valid
            side = None
            if self.label_emb is not None:  # side info of the SIT input only: the stored token is before it
                side = sum(emb(batch.prev_labels[:, k]) for k, emb in enumerate(self.label_emb))
                side = side.view(-1, w, side.shape[-1])
            token = self.sit(token.view(-1, w, token.shape[-1]), valid, prefix, prefix_valid, side)
            token = token.reshape(-1, token.shape[-1])
        return self.decompress(token)

    def forward(self, batch: Batch):
        if self.graph_steps:  # a new step: the regions' CUDA graphs may reuse the last step's buffers
            torch.compiler.cudagraph_mark_step_begin()
        token, pooled = self._encode(batch)
        logits = self.logits(batch, token)
        loss = weighted_bce(logits, batch.labels, batch.weights)
        if self.reconstruction is not None:
            targets = pooled[:, self.reconstruct_cols].detach()
            loss = loss + self.reconstruct * self.reconstruction(token, targets, batch.weights)
        return loss, (loss.detach(), logits.detach().float(), batch.labels, batch.weights, batch.users)
