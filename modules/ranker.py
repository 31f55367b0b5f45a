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
from modules.attention import Packing, small_table_lookup
from modules.compressor import BaseRanker, bf16_autocast, weighted_bce
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
    bf16: bool = False  # the dense part (feature groups, query, history branches, interaction, head) under bf16
    #   autocast; the lookups, the branches' outputs, the logits and the loss in fp32
    compile: bool = False  # torch.compile each history branch's read and the dense part around them (the
    #   state-dict keys are unchanged)
    pre_project: bool = False  # side-info tables at reader width, added after the projection instead of
    #   concatenated before it: the same functions, without the concat and with a narrower projection
    length_bucket: int = 0  # L > 0: each batch's requests sorted by history length and read in buckets of
    #   lengths rounded up so that bucket_prefix + length is a multiple of L, not all at max_len: the same
    #   outputs, without the padding's work
    pack_history: bool = False  # the transformer reader's position-wise layers run on the valid steps only
    #   (packed), attention on the padded layout: the same outputs, without most of the padding's work


def bucket_prefix(cfg: RankerConfig) -> int:
    """Tokens the reader puts before a history's steps: the transformer prepends the query. Length
    buckets round prefix + steps up to a multiple of L, so a bucket's sequences fill whole
    attention tiles (at L 64, a width of 64 would make sequences of 65: two tiles of 64 rows)."""
    return 1 if cfg.reader == "transformer" else 0


def layout_problem(cfg: RankerConfig) -> str | None:
    """Why ``cfg``'s history layout (length buckets, packing) cannot be read as asked, or None.
    LONGER merges fixed groups of steps, counted from a left padding to a multiple of the
    group: a bucket's groups are T's only if every width and T are multiples of the group.
    Packing is the transformer reader's own, and leaves buckets nothing to cut."""
    if cfg.pack_history and cfg.reader != "transformer":
        return f"--pack-history is the transformer reader's; --reader {cfg.reader} reads the padded steps"
    if cfg.pack_history and cfg.length_bucket:
        return "--pack-history reads the valid steps only: length buckets (--length-bucket) would cut nothing more"
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
    reader(query) -> one token. ``step_in`` may be 0 (labels only), ``groups`` 0 (no target
    products: ``target_products(candidate, steps, groups)``, taken here from the candidate).
    ``stats`` (mean, std): the steps are rows of the frozen token table, standardised here.

    With ``pre_project`` the side-info embeddings (labels known before t, time gap) are added
    after the projection: W [x; e_1; ...; e_k] = W_x x + sum_i W_i e_i, and W_i e_i is a lookup
    in the table W_i E_i, so each side table holds its projected rows and neither the concat
    nor the projection's side-info columns exist (no bias for a labels-only branch).

    ``buckets`` (a batch's ``hist_buckets``: rows sorted by history length, longest first):
    each run of rows is read at its own number of steps. Everything here is per request and
    padded steps never reach the output, so this is the same function of the batch, with
    the work of the padding left out (the history is a prefix of the T steps).

    ``pack_history``: the valid steps are packed (``modules.attention.Packing``) before the
    adapt MLP, so every layer that treats steps alone runs on them only; the reader attends
    in the padded layout. ``steps_total`` (a batch's ``hist_steps``) sizes the packed rows
    without reading the lengths back from the device."""

    def __init__(self, step_in: int, groups: int, num_tasks: int, cfg: RankerConfig, out_dim: int, adapt: bool):
        super().__init__()
        d = cfg.reader_dim
        self.groups = groups
        target_in = step_in if groups else 0
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
        problem = layout_problem(cfg)
        if problem:
            raise ValueError(problem)
        self.reader = make_reader(cfg.reader, d, out_dim, **kw)
        self.bf16, self.compiled, self.pack = cfg.bf16, cfg.compile, cfg.pack_history
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
        candidate: torch.Tensor | None,
        labels: torch.Tensor,
        gap: torch.Tensor,
        valid: torch.Tensor,
        query: torch.Tensor,
        buckets: tuple[tuple[int, int], ...] | None = None,
        steps_total: int | None = None,
        stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        # Autocast here, inside the branch (the ranker's own covers its other dense modules): the
        # branch is a leaf of TorchRec's pipeline tracer, so the context is entered when the step
        # really runs (and inside torch.compile).
        with torch.autocast(valid.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            read = self._reader()
            if self.pack:
                if steps_total is None:
                    raise ValueError("pack_history needs the batch's hist_steps (Stage2BatchMaker sets it)")
                index = valid_index(valid, steps_total)
                torch._dynamo.maybe_mark_dynamic(index, 0)  # one graph for every batch's count of steps
                return read(steps, candidate, labels, gap, valid, query, stats, index).float()
            if buckets is None:
                return read(steps, candidate, labels, gap, valid, query, stats).float()
            outs, start = [], 0
            for end, width in buckets:
                rows = slice(start, end)
                s, l, g, v = (_bucket(t, rows, width) for t in (steps, labels, gap, valid))
                outs.append(read(s, _bucket(candidate, rows), l, g, v, _bucket(query, rows), stats))
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

    def _read(self, steps, candidate, labels, gap, valid, query, stats, index=None) -> torch.Tensor:
        packing = None if index is None else Packing(index, *valid.shape)
        take = (lambda t: t) if packing is None else packing.pack  # per-step inputs: [B, T, c] or [N, c]
        # Written on the padded steps; compiled, the packing gathers fuse into them (only valid steps computed).
        target = None
        if steps is not None:
            steps = steps if stats is None else standardize(steps, *stats)
            target = take(target_products(candidate, steps, self.groups)) if self.groups else None
            steps = take(steps)
        parts = []
        if steps is not None:
            parts.append(self.adapt(steps) if self.adapt is not None else steps)
        if target is not None:
            parts.append(target)
        # small tables looked up in the padded layout (their cheap backward needs [B, T] indices), then packed
        side = [take(small_table_lookup(emb, labels[..., k])) for k, emb in enumerate(self.label_emb)]
        side.append(take(small_table_lookup(self.gap_emb, gap)))
        if self.pre_project:
            x = sum(side) if self.proj is None else sum(side, self.proj(torch.cat(parts, -1)))
        else:
            x = self.proj(torch.cat(parts + side, -1))
        bias = self.relevance(target).squeeze(-1) if self.relevance is not None else None
        return self.reader(x, valid, query, bias) if packing is None else self.reader(x, valid, query, bias, packing)


def valid_index(valid: torch.Tensor, total: int) -> torch.Tensor:
    """Flat position b * T + t of each valid step of ``valid`` [B, T] (each row's valid steps a
    prefix), given their count ``total``, so nothing waits on the device for it."""
    b, t = valid.shape
    length = valid.sum(1)
    start = torch.arange(b, device=valid.device) * t - (length.cumsum(0) - length)
    return torch.repeat_interleave(start, length, output_size=total) + torch.arange(total, device=valid.device)


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


def standardize(tokens: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Rows of the frozen token table, per dimension standardised, in fp32 (detached: frozen)."""
    return (tokens.detach().float() - mean) / std


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
            self.iat = HistoryBranch(dim, int(self.token_query), side, cfg, model.group_dim, adapt=True)
        if self.use_hand:
            if not shared:
                raise ValueError("the hand-crafted history needs the schema's sequence features")
            self.hand = HistoryBranch(self.shared_width, shared, side, cfg, model.group_dim, adapt=False)
        if self.use_labels:
            self.labels = HistoryBranch(0, 0, side, cfg, model.group_dim, adapt=False)
        self.head = MLP(model.hidden, cfg.head, num_tasks)
        self.bf16 = cfg.bf16
        if cfg.compile:
            # The dense part around the branches, which eager launches as many small kernels: each
            # module compiled in place (same state-dict keys). Modules, not functions of the ranker:
            # TorchRec's pipeline traces the ranker's forward with fx, which refuses a compiled
            # function, but leaves a child without sharded modules untraced.
            for module in (self.base.grouping, self.base.interaction, self.head, getattr(self, "query", None)):
                if module is not None:
                    module.compile()

    def _autocast(self):
        return bf16_autocast(self.head, self.bf16)

    def _fetch(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """History tokens [B, T, d] as stored (the branch standardises them, packed or not) and, for
        the token query, the candidate's own [B, d], standardised."""
        if self.token_fetch != "lookup":
            steps = self.token_rows(batch.hist_first, batch.hist_valid.sum(1), self.max_len)
            candidate = self.token_rows.take(batch.ids) if self.token_query else None
        else:
            jt = self.tokens(batch.history_ids)
            steps = jt[TOKEN_FEATURE].to_padded_dense(desired_length=self.max_len)
            candidate = jt[CANDIDATE_FEATURE].to_padded_dense(desired_length=1)[:, 0] if self.token_query else None
        return steps, None if candidate is None else standardize(candidate, self.token_mean, self.token_std)

    def _dense_in(self, pooled: torch.Tensor, dense: torch.Tensor, candidate: torch.Tensor | None):
        """The feature-group tokens [B, G, D] and, if a branch reads history, its query [B, d]."""
        with self._autocast():
            feats = self.base.group_features(pooled, dense)
            if not hasattr(self, "query"):
                return feats, None
            return feats, self.query(torch.cat([pooled, dense] + ([candidate] if self.token_query else []), -1))

    def _dense_out(self, feats: torch.Tensor, extra: list[torch.Tensor]) -> torch.Tensor:
        """Logits [B, K] in fp32 from the group tokens and one token per history branch."""
        tokens = torch.cat([feats] + [e.unsqueeze(1) for e in extra], 1) if extra else feats
        with self._autocast():
            return self.head(self.base.interaction(tokens)).float()

    def forward(self, batch):
        pooled, looked_up = self.base.embed(batch)
        side = (batch.hist_labels, batch.hist_gap, batch.hist_valid)
        buckets = batch.hist_buckets
        extra, steps, candidate = [], None, None
        if self.use_iat:
            steps, candidate = self._fetch(batch)
        feats, query = self._dense_in(pooled, batch.dense, candidate)
        if self.use_iat:
            stats = (self.token_mean, self.token_std)
            extra.append(self.iat(steps, candidate, *side, query, buckets, batch.hist_steps, stats))
        if self.use_hand:
            names = self.base.shared_names
            hist = torch.cat(
                [looked_up[history_feature(f)].to_padded_dense(desired_length=self.max_len) for f in names], -1
            )
            candidate = pooled[:, pooled.shape[1] - self.shared_width :]
            extra.append(self.hand(hist, candidate, *side, query, buckets, batch.hist_steps))
        if self.use_labels:
            extra.append(self.labels(None, None, *side, query, buckets, batch.hist_steps))
        logits = self._dense_out(feats, extra)
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
