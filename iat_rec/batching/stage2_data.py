"""Stage-2 batches: each request row with the last T instances of its user before its time.

The history is fetched by timestamp from a *source* of past instances (the token table's
side info, or the request log itself for the hand-crafted baseline). In-domain requests are
rows of the source log; cross-domain requests come from another log and are matched to
source users by their raw user key (unknown users get an empty history).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from iat_rec.batching.batch import Batch, extend, make_batch
from iat_rec.batching.history import HistoryIndex, expand_ranges, padded_side_info
from iat_rec.data.instance_log import InstanceLog
from iat_rec.tables import CANDIDATE_FEATURE, TOKEN_FEATURE, history_feature


@dataclasses.dataclass
class Stage2Batch(Batch):
    """``shared`` also holds the hand-crafted history: key ``history_feature(f)`` per sequence
    feature f, the ids of the history steps (same lengths as ``history_ids``)."""

    # TOKEN_FEATURE: history instance ids, oldest first; CANDIDATE_FEATURE: the row itself.
    # None where the model reads the token table by ranges (hist_first and the lengths suffice).
    history_ids: KeyedJaggedTensor | None
    hist_first: torch.Tensor  # int64 [B]: first token-table row of each history (its length: hist_valid.sum(1))
    hist_labels: torch.Tensor  # int8 [B, T, K]: 0/1, or LABEL_UNKNOWN until label_time < t
    hist_gap: torch.Tensor  # int8 [B, T]: log2 bucket of t - ts
    hist_valid: torch.Tensor  # bool [B, T]
    # With a length bucket (Stage2BatchMaker): rows sorted by history length, longest first, and
    # (end row, steps) per bucket: rows [previous end, end) have at most ``steps`` valid steps.
    # Host ints, never moved to the device, so the model slices by them without a sync.
    hist_buckets: tuple[tuple[int, int], ...] | None = None
    # The number of valid history steps (host int, like hist_buckets): a packed read
    # (RankerConfig.pack_history) sizes its rows by it without reading the lengths back.
    hist_steps: int | None = None


class HistorySource:
    """Past instances to fetch from: history index, side info, hand-crafted sequence ids."""

    def __init__(
        self,
        index: HistoryIndex,
        labels: np.ndarray,
        label_time: np.ndarray,
        log: InstanceLog | None,
        seq_features: list[str],
    ):
        self.index, self.labels, self.label_time = index, labels, label_time
        self.log, self.seq_features = log, seq_features
        if seq_features and log is None:
            raise ValueError("hand-crafted sequence features need the source instance log")

    @classmethod
    def from_log(cls, log: InstanceLog, seq_features: list[str]) -> HistorySource:
        return cls(HistoryIndex.from_log(log), log.labels, log.label_time, log, seq_features)

    @classmethod
    def from_tokens(cls, table, log: InstanceLog | None, seq_features: list[str]) -> HistorySource:
        return cls(table.history, table.side("labels"), table.side("label_time"), log, seq_features)

    def seq_ids(self, feature: str, rows: np.ndarray) -> np.ndarray:
        """One id per history step; a multi-valued feature contributes its first value (0 if none)."""
        col = self.log.sparse[feature]
        if isinstance(col, tuple):
            values, offsets = col
            has = offsets[rows + 1] > offsets[rows]
            return np.where(has, np.asarray(values)[np.minimum(offsets[rows], max(len(values) - 1, 0))], 0)
        return np.asarray(col[rows], dtype=np.int64)


class Stage2BatchMaker:
    """Callable (log, rows) -> Stage2Batch for BatchDataset; picklable for loader workers.
    ``candidate``: the token lookup also gets each request's own row (stage 2's token query).
    ``token_ids=False``: no id list for a TorchRec lookup (the model reads ranges).
    ``length_bucket`` L > 0: the batch's rows are sorted by history length, longest first, and
    cut into buckets of lengths rounded up so that ``bucket_prefix`` + length is a multiple of L
    (``hist_buckets``), so the model reads each bucket's histories at that length, not all at T
    (``HistoryBranch``). ``bucket_prefix``: the tokens the reader puts before the steps
    (``modules.ranker.bucket_prefix``), so its sequences fill whole attention tiles."""

    def __init__(
        self,
        source: HistorySource,
        max_len: int,
        same_log: bool,
        candidate: bool = False,
        token_ids: bool = True,
        length_bucket: int = 0,
        bucket_prefix: int = 0,
    ):
        if length_bucket < 0 or bucket_prefix < 0:
            raise ValueError(f"length_bucket ({length_bucket}) and bucket_prefix ({bucket_prefix}) must be >= 0")
        if candidate and not same_log:
            raise ValueError("the candidate's own token exists only for requests of the token table's log")
        self.source, self.max_len, self.same_log, self.candidate = source, max_len, same_log, candidate
        self.token_ids, self.length_bucket, self.bucket_prefix = token_ids, length_bucket, bucket_prefix

    def history_users(self, log: InstanceLog, rows: np.ndarray) -> np.ndarray:
        valid = rows >= 0
        users = np.asarray(log.user)[np.where(valid, rows, 0)]
        if not self.same_log:
            users = self.source.index.user_index(log.user_keys[users])
        return np.where(valid, users, -1)

    def __call__(self, log: InstanceLog, rows: np.ndarray) -> Stage2Batch:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        times = np.asarray(log.ts)[np.where(rows >= 0, rows, 0)]
        first, length = self.source.index.ranges(self.history_users(log, rows), times, self.max_len)
        buckets = None
        if self.length_bucket:
            order = np.argsort(-length, kind="stable")
            rows, times, first, length = rows[order], times[order], first[order], length[order]
            buckets = length_buckets(length, self.length_bucket, self.max_len, self.bucket_prefix)
        base = make_batch(log, rows)
        src, feats, b = self.source, self.source.seq_features, len(rows)
        hist_labels, hist_gap, valid = padded_side_info(
            first, length, times, src.labels, src.label_time, src.index.ts, self.max_len
        )
        hist = expand_ranges(first, length) if self.token_ids or feats else None  # the ranges' row ids
        history_ids = None
        if self.token_ids:
            keys, values, lengths = [TOKEN_FEATURE], [hist], [length]
            if self.candidate:
                own = rows >= 0
                keys.append(CANDIDATE_FEATURE)
                values.append(rows[own])
                lengths.append(own.astype(np.int64))
            history_ids = KeyedJaggedTensor.from_lengths_sync(
                keys=keys,
                values=torch.from_numpy(np.concatenate(values)),
                lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)),
                stride=b,
            )
        shared = base.shared
        if feats:  # the candidate's own ids, then the history's ids under their history keys
            shared = KeyedJaggedTensor.from_lengths_sync(
                keys=base.shared.keys() + [history_feature(f) for f in feats],
                values=torch.cat(
                    [base.shared.values()] + [torch.from_numpy(self.source.seq_ids(f, hist)) for f in feats]
                ),
                lengths=torch.cat(
                    [base.shared.lengths(), torch.from_numpy(np.tile(length, len(feats)).astype(np.int32))]
                ),
                stride=b,
            )
        return extend(
            base,
            Stage2Batch,
            shared=shared,
            history_ids=history_ids,
            hist_first=torch.from_numpy(first.astype(np.int64)),
            hist_labels=torch.from_numpy(hist_labels),
            hist_gap=torch.from_numpy(hist_gap),
            hist_valid=torch.from_numpy(valid),
            hist_buckets=buckets,
            hist_steps=int(length.sum()),
        )


def length_buckets(length: np.ndarray, bucket: int, max_len: int, prefix: int = 0) -> tuple[tuple[int, int], ...]:
    """(end row, steps) per run of equal ``min(ceil((length + prefix) / bucket) * bucket - prefix,
    max_len)`` over lengths sorted longest first; an empty history counts as one step (no
    bucket of width 0)."""
    if not len(length):
        return ()
    steps = np.minimum(-(-(np.maximum(length, 1) + prefix) // bucket) * bucket - prefix, max_len)
    ends = np.flatnonzero(np.diff(steps)) + 1
    return tuple((int(e), int(steps[e - 1])) for e in [*ends, len(steps)])


def bucket_share(buckets: tuple[tuple[int, int], ...], max_len: int) -> float:
    """The share of the history steps read at T that the buckets read (query step included)."""
    start, steps = 0, 0
    for end, width in buckets:
        steps, start = steps + (end - start) * (width + 1), end
    return steps / max(start * (max_len + 1), 1)
