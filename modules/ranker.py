"""Stage 2: the downstream ranker over a user's history of instance tokens.

Per history step: adapt MLP(standardised token) ++ target products ++ side-info embeddings
(labels known before the request time, time-gap bucket), projected to the reader width: the
IAT sequence. A reader (Transformer, DIN, LONGER-style) reads it with a query compressed from
the request's own raw features; its output joins the feature-group tokens as one more token
before the interaction block.

The hand-crafted behaviour sequence (item ids, categories, masked labels) is the same branch
with other step inputs: its ids are looked up in the *same* tables as the candidate's own
features (one TorchRec table per feature, two keys), beside IAT (``both``) or alone (the
baseline). ``labels`` reads the side info alone (no tokens, no ids): the ablation that shows
what the tokens add beyond the labels.

Target products: each step also carries ``normalize(candidate) * normalize(step)`` per
shared id feature (the q * k term of DIN's attention input, on unit vectors), so an exact
match between the candidate and a past instance is a cosine of 1 in one embedding space, not
something the reader must learn across two unrelated spaces. With ``query="token"`` the
candidate's own instance token (its row of the token table: the candidate compressed by the
frozen stage-1 model) joins the query, and the same product is taken in token space.

The token table is frozen: its lookup is detached, so no gradient ever reaches it. Tokens
are standardised per dimension with the table's own statistics (its manifest) before the
adapt MLP: a token's common component across instances carries nothing, and the adapt MLP
then sees unit-scale inputs whatever the compressor's output scale.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, data_type_to_dtype

from iat_rec.batching.history import GAP_BUCKETS, LABEL_UNKNOWN
from iat_rec.batching.stage2_data import length_buckets
from iat_rec.tables import (
    CANDIDATE_FEATURE,
    TOKEN_FEATURE,
    frozen_collection,
    history_feature,
    model_tables,
    token_table_config,
)
from iat_rec.train.config import ModelConfig
from modules.attention import small_table_lookup
from modules.compressor import BaseRanker, weighted_bce
from modules.mlp import MLP
from modules.query import QueryCompressor
from modules.range_gather import RangeTokenTable
from modules.readers import LONGER_MERGE, make_reader

HISTORY_MODES = ("none", "labels", "handcrafted", "iat", "both")
READERS = ("transformer", "din", "longer")
QUERIES = ("features", "token")
TOKEN_FETCHES = ("lookup", "ranges", "sharded_ranges")
RELEVANCE = 4.0  # initial attention logit of a step per unit of candidate cosine (HistoryBranch)


@dataclasses.dataclass
class RankerConfig:
    history: str = "iat"  # none | labels | handcrafted | iat | both
    reader: str = "transformer"  # transformer | din | longer
    query: str = "features"  # features | token: the candidate's own instance token joins the query (iat/both)
    token_fetch: str = "lookup"  # lookup: a TorchRec table, sharded | ranges: on every rank, one row range per history
    #   | sharded_ranges: a block of rows per rank, histories sent to their owners as ranges (modules/range_gather.py)
    max_len: int = 256  # T: history steps per request
    reader_dim: int = 64  # width of the history sequence and its reader
    reader_layers: int = 2  # layers of the reader (transformer, longer)
    reader_heads: int = 2  # head dim 32 at width 64
    head: tuple[int, ...] = (256, 128)  # hidden widths of the MLP from the interaction output to the heads
    bf16: bool = False  # the history branches under bf16 autocast (their outputs, the rest and the loss in fp32)
    compile: bool = False  # torch.compile each history branch's read (its state-dict keys are unchanged)
    pre_project: bool = False  # side-info tables at reader width, added after the projection instead of
    #   concatenated before it: the same functions, without the concat and with a narrower projection
    length_bucket: int = 0  # L > 0: each batch's requests sorted by history length and read in buckets of
    #   lengths rounded up so that bucket_prefix + length is a multiple of L, not all at max_len: the same
    #   outputs, without the padding's work


def bucket_prefix(cfg: RankerConfig) -> int:
    """Tokens the reader puts before a history's steps: the transformer prepends the query. Length
    buckets round prefix + steps up to a multiple of L, so a bucket's sequences fill whole
    attention tiles (at L 64, a width of 64 would make sequences of 65: two tiles of 64 rows)."""
    return 1 if cfg.reader == "transformer" else 0


def length_bucket_problem(cfg: RankerConfig) -> str | None:
    """Why ``cfg.length_bucket`` would change what the reader computes, or None. LONGER merges
    fixed groups of steps, counted from a left padding to a multiple of the group: a bucket's
    groups are T's only if every width and T are multiples of the group."""
    if not cfg.length_bucket or cfg.reader != "longer":
        return None
    if cfg.length_bucket % LONGER_MERGE or cfg.max_len % LONGER_MERGE:
        return (
            f"--length-bucket {cfg.length_bucket} with --max-len {cfg.max_len}: the LONGER reader merges groups of "
            f"{LONGER_MERGE} steps, so both must be multiples of {LONGER_MERGE}"
        )
    return None


class HistoryBranch(nn.Module):
    """[adapt(steps) | steps] ++ target products ++ side-info embeddings -> reader width ->
    reader(query) -> one token. ``step_in`` or ``target_in`` may be 0 (labels only).

    With ``pre_project`` the side-info embeddings (labels known before t, time gap) are added
    after the projection: W [x; e_1; ...; e_k] = W_x x + sum_i W_i e_i, and W_i e_i is a lookup
    in the table W_i E_i, so each side table holds its projected rows and neither the concat
    nor the projection's side-info columns exist (no bias for a labels-only branch).

    ``buckets`` (a batch's ``hist_buckets``: rows sorted by history length, longest first):
    each run of rows is read at its own number of steps. Everything here is per request and
    padded steps never reach the output, so this is the same function of the batch, with
    the work of the padding left out (the history is a prefix of the T steps)."""

    def __init__(self, step_in: int, target_in: int, num_tasks: int, cfg: RankerConfig, out_dim: int, adapt: bool):
        super().__init__()
        d = cfg.reader_dim
        self.adapt = MLP(step_in, [2 * d], d) if adapt and step_in else None
        self.pre_project = cfg.pre_project
        width = (d if self.adapt is not None else step_in) + target_in
        width += 0 if self.pre_project else (num_tasks + 1) * d
        self.label_emb = nn.ModuleList(nn.Embedding(LABEL_UNKNOWN + 1, d) for _ in range(num_tasks))
        self.gap_emb = nn.Embedding(GAP_BUCKETS, d)
        self.proj = nn.Linear(width, d) if width else None
        # Target-aware relevance of each step: a logit added to the reader's attention toward it.
        # Initialised to RELEVANCE x the sum of the per-feature cosines (the products of a group
        # sum to its cosine), so an exact match starts out attended: from a zero start Adam moves
        # each weight ~lr per step and the logit needed to single out one of T steps took
        # thousands of steps (the Transformer reader sat at chance on the seen-before check).
        self.relevance = nn.Linear(target_in, 1) if target_in else None
        if self.relevance is not None:
            nn.init.constant_(self.relevance.weight, RELEVANCE)
            nn.init.zeros_(self.relevance.bias)
        kw = (
            {}
            if cfg.reader == "din"
            else {"layers": cfg.reader_layers, "heads": cfg.reader_heads, "max_len": cfg.max_len + 1}
        )
        problem = length_bucket_problem(cfg)
        if problem:
            raise ValueError(problem)
        self.reader = make_reader(cfg.reader, d, out_dim, **kw)
        self.bf16, self.compiled = cfg.bf16, cfg.compile
        if cfg.compile and cfg.length_bucket:
            # a graph per width (every width a history of 0..T steps buckets to; + 1 to spare), grad
            # mode, branch kind (two at most) and bucket of one row (dynamo specialises a size of 1): see _reader
            every_length = np.arange(cfg.max_len + 1)
            widths = len(length_buckets(every_length, cfg.length_bucket, cfg.max_len, bucket_prefix(cfg))) + 1
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, 8 * widths)

    def forward(
        self,
        steps: torch.Tensor | None,
        target: torch.Tensor | None,
        labels: torch.Tensor,
        gap: torch.Tensor,
        valid: torch.Tensor,
        query: torch.Tensor,
        buckets: tuple[tuple[int, int], ...] | None = None,
    ) -> torch.Tensor:
        # Autocast here, not around the ranker: the branch is a leaf of TorchRec's pipeline
        # tracer, so the context is entered when the step really runs (and inside torch.compile).
        with torch.autocast(valid.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            read = self._reader()
            if buckets is None:
                return read(steps, target, labels, gap, valid, query).float()
            per_step, outs, start = (steps, target, labels, gap, valid), [], 0
            for end, width in buckets:
                rows = slice(start, end)
                outs.append(read(*(_bucket(t, rows, width) for t in per_step), _bucket(query, rows)))
                start = end
            return torch.cat(outs).float()

    def _reader(self):
        """``_read``, compiled with ``compile``: one function for every branch, so its compiled
        graphs are told apart by guards on the branch (at most two kinds), grad mode (training,
        evaluation), and the width (T, or each bucket's). Bucketed inputs come contiguous and marked
        dynamic in rows only: slices of the [B, T] tensors would be guarded on their offsets and
        strides, and rows change from batch to batch. Widths stay static (a few per T): torch
        2.11's inductor failed to generate code for a symbolic width (NOTES 36)."""
        if not self.compiled:
            return self._read
        return functools.partial(compiled_read(), self)

    def _read(self, steps, target, labels, gap, valid, query) -> torch.Tensor:
        parts = []
        if steps is not None:
            parts.append(self.adapt(steps) if self.adapt is not None else steps)
        if target is not None:
            parts.append(target)
        side = [small_table_lookup(emb, labels[..., k]) for k, emb in enumerate(self.label_emb)]
        side.append(small_table_lookup(self.gap_emb, gap))
        if self.pre_project:
            x = sum(side) if self.proj is None else sum(side, self.proj(torch.cat(parts, -1)))
        else:
            x = self.proj(torch.cat(parts + side, -1))
        bias = self.relevance(target).squeeze(-1) if self.relevance is not None else None
        return self.reader(x, valid, query, bias)


def _bucket(t: torch.Tensor | None, rows: slice, width: int | None = None) -> torch.Tensor | None:
    """Rows ``rows`` (and the first ``width`` steps) of a branch input, contiguous, with rows
    marked dynamic and steps static for torch.compile (see ``HistoryBranch._reader``)."""
    if t is None:
        return None
    t = (t[rows] if width is None else t[rows, :width]).contiguous()
    torch._dynamo.maybe_mark_dynamic(t, 0)
    if t.dim() > 1:  # else dynamo's automatic dynamic shapes would make the width symbolic at its second value
        torch._dynamo.mark_static(t, 1)
    return t


@functools.cache
def compiled_read():
    """``HistoryBranch._read`` under torch.compile, one for every branch: a function, not a
    bound method kept on the module, so the module deep-copies and pickles as before."""
    return torch.compile(HistoryBranch._read)


def target_products(candidate: torch.Tensor, steps: torch.Tensor, groups: int) -> torch.Tensor:
    """Per group of columns (one id feature, or the whole token): unit(candidate) * unit(step).
    candidate [B, G * e], steps [B, T, G * e] -> [B, T, G * e]; each group sums to a cosine."""
    b, t, width = steps.shape
    cand = F.normalize(candidate.view(b, 1, groups, width // groups), dim=-1)
    return (cand * F.normalize(steps.view(b, t, groups, width // groups), dim=-1)).view(b, t, width)


class Ranker(nn.Module):
    def __init__(
        self,
        tables: tuple[list[EmbeddingBagConfig], list[EmbeddingConfig]],
        dense_in: int,
        num_tasks: int,
        model: ModelConfig,
        cfg: RankerConfig,
        token_table: EmbeddingConfig | None = None,
        token_stats: tuple[torch.Tensor, torch.Tensor] | None = None,  # per-dim (mean, std) of the table
        side_tasks: int | None = None,  # label columns of the history's side info (default num_tasks)
    ):
        super().__init__()
        if cfg.history not in HISTORY_MODES:
            raise ValueError(f"history must be one of {HISTORY_MODES}")
        if cfg.query not in QUERIES:
            raise ValueError(f"query must be one of {QUERIES}")
        if cfg.token_fetch not in TOKEN_FETCHES:
            raise ValueError(f"token_fetch must be one of {TOKEN_FETCHES}")
        self.token_fetch = cfg.token_fetch
        self.use_iat = cfg.history in ("iat", "both")
        self.use_hand = cfg.history in ("handcrafted", "both")
        self.use_labels = cfg.history == "labels"
        self.token_query = self.use_iat and cfg.query == "token"
        self.max_len = cfg.max_len
        branches = int(self.use_iat) + int(self.use_hand) + int(self.use_labels)
        self.base = BaseRanker(tables, dense_in, model, extra_groups=branches)
        side = side_tasks or num_tasks
        shared = len(self.base.shared_names)
        self.shared_width = shared * model.emb_dim
        if branches:
            raw = (len(self.base.bag_names) + shared) * model.emb_dim + dense_in
            token_dim = token_table.embedding_dim if token_table is not None else 0
            self.query = QueryCompressor(raw + (token_dim if self.token_query else 0), cfg.reader_dim)
        if self.use_iat:
            assert token_table is not None
            if cfg.token_fetch != "lookup":
                self.token_rows = RangeTokenTable(
                    token_table.embedding_dim,
                    data_type_to_dtype(token_table.data_type),
                    sharded=cfg.token_fetch == "sharded_ranges",
                )
            else:
                self.tokens = frozen_collection(token_table)
            dim = token_table.embedding_dim
            mean, std = token_stats if token_stats is not None else (torch.zeros(dim), torch.ones(dim))
            # from the table's manifest, like the table itself: not part of the checkpoints
            self.register_buffer("token_mean", torch.as_tensor(mean, dtype=torch.float32), persistent=False)
            self.register_buffer(
                "token_std", torch.as_tensor(std, dtype=torch.float32).clamp(min=1e-6), persistent=False
            )
            self.iat = HistoryBranch(dim, dim if self.token_query else 0, side, cfg, model.group_dim, adapt=True)
        if self.use_hand:
            if not shared:
                raise ValueError("the hand-crafted history needs the schema's sequence features")
            self.hand = HistoryBranch(self.shared_width, self.shared_width, side, cfg, model.group_dim, adapt=False)
        if self.use_labels:
            self.labels = HistoryBranch(0, 0, side, cfg, model.group_dim, adapt=False)
        self.head = MLP(model.hidden, cfg.head, num_tasks)

    def _standard(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens.detach().float() - self.token_mean) / self.token_std  # frozen table: detached

    def _fetch(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Standardised history tokens [B, T, d] and, for the token query, the candidate's own [B, d]."""
        if self.token_fetch != "lookup":
            steps = self.token_rows(batch.hist_first, batch.hist_valid.sum(1), self.max_len)
            candidate = self.token_rows.take(batch.ids) if self.token_query else None
        else:
            jt = self.tokens(batch.history_ids)
            steps = jt[TOKEN_FEATURE].to_padded_dense(desired_length=self.max_len)
            candidate = jt[CANDIDATE_FEATURE].to_padded_dense(desired_length=1)[:, 0] if self.token_query else None
        return self._standard(steps), None if candidate is None else self._standard(candidate)

    def forward(self, batch):
        pooled, looked_up = self.base.embed(batch)
        feats = self.base.group_features(pooled, batch.dense)  # [B, G, D]
        side = (batch.hist_labels, batch.hist_gap, batch.hist_valid)
        buckets = batch.hist_buckets
        extra, query_in = [], [pooled, batch.dense]
        if self.use_iat:
            steps, candidate = self._fetch(batch)
            target = None
            if self.token_query:
                query_in.append(candidate)
                target = target_products(candidate, steps, 1)
        if hasattr(self, "query"):  # some history branch reads with it
            query = self.query(torch.cat(query_in, -1))
        if self.use_iat:
            extra.append(self.iat(steps, target, *side, query, buckets))
        if self.use_hand:
            names = self.base.shared_names
            hist = torch.cat(
                [looked_up[history_feature(f)].to_padded_dense(desired_length=self.max_len) for f in names], -1
            )
            candidate = pooled[:, pooled.shape[1] - self.shared_width :]
            extra.append(self.hand(hist, target_products(candidate, hist, len(names)), *side, query, buckets))
        if self.use_labels:
            extra.append(self.labels(None, None, *side, query, buckets))
        tokens = torch.cat([feats] + [e.unsqueeze(1) for e in extra], 1) if extra else feats
        logits = self.head(self.base.interaction(tokens))
        loss = weighted_bce(logits, batch.labels, batch.weights)
        return loss, (loss.detach(), logits.detach().float(), batch.labels, batch.weights, batch.users)


def build_ranker(
    schema,
    model: ModelConfig,
    cfg: RankerConfig,
    num_tasks: int,
    token_rows: int = 0,
    token_dim: int = 64,
    token_dtype: str = "fp32",
    token_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    side_tasks: int | None = None,
) -> Ranker:
    """The stage-2 model for ``schema`` (tables on the meta device, ready to shard); the token
    table, for iat/both, is ``token_rows`` x ``token_dim`` of ``token_dtype``."""
    token_table = None
    if cfg.history in ("iat", "both"):
        features = (TOKEN_FEATURE, CANDIDATE_FEATURE) if cfg.query == "token" else (TOKEN_FEATURE,)
        token_table = token_table_config(token_rows, token_dim, token_dtype, features)
    tables = model_tables(schema, model.emb_dim, cfg.history in ("handcrafted", "both"), model.table_dtype)
    return Ranker(tables, len(schema.dense), num_tasks, model, cfg, token_table, token_stats, side_tasks)
