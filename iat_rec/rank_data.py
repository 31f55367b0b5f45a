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

from iat_rec.batch import Batch, extend, make_batch
from iat_rec.history import HistoryIndex, expand_ranges, side_info
from iat_rec.instance_log import InstanceLog
from iat_rec.planning import TOKEN_FEATURE


@dataclasses.dataclass
class RankBatch(Batch):
    history_ids: KeyedJaggedTensor  # key TOKEN_FEATURE: instance ids of the history, oldest first
    seq: KeyedJaggedTensor  # hand-crafted sequence: one key per sequence feature, same lengths
    hist_labels: torch.Tensor  # int64 [B, T, K]: 0/1, or LABEL_UNKNOWN until label_time < t
    hist_gap: torch.Tensor  # int64 [B, T]: log2 bucket of t - ts
    hist_valid: torch.Tensor  # bool [B, T]


def seq_key(feature: str) -> str:
    return f"seq_{feature}"


class HistorySource:
    """Past instances to fetch from: history index, side info, hand-crafted sequence ids."""

    def __init__(self, index: HistoryIndex, labels: np.ndarray, label_time: np.ndarray, log: InstanceLog | None, seq_features: list[str]):
        self.index, self.labels, self.label_time = index, labels, label_time
        self.log, self.seq_features = log, seq_features
        if seq_features and log is None:
            raise ValueError("hand-crafted sequence features need the source instance log")

    @classmethod
    def from_log(cls, log: InstanceLog, seq_features: list[str]) -> "HistorySource":
        return cls(HistoryIndex.from_log(log), log.labels, log.label_time, log, seq_features)

    @classmethod
    def from_tokens(cls, table, log: InstanceLog | None, seq_features: list[str]) -> "HistorySource":
        return cls(table.history, table.side("labels"), table.side("label_time"), log, seq_features)

    def seq_ids(self, feature: str, rows: np.ndarray) -> np.ndarray:
        """One id per history step; a multi-valued feature contributes its first value (0 if none)."""
        col = self.log.sparse[feature]
        if isinstance(col, tuple):
            values, offsets = col
            has = offsets[rows + 1] > offsets[rows]
            return np.where(has, np.asarray(values)[np.minimum(offsets[rows], max(len(values) - 1, 0))], 0)
        return np.asarray(col[rows], dtype=np.int64)


class RankBatchMaker:
    """Callable (log, rows) -> RankBatch for BatchDataset; picklable for loader workers."""

    def __init__(self, source: HistorySource, max_len: int, same_log: bool):
        self.source, self.max_len, self.same_log = source, max_len, same_log

    def history_users(self, log: InstanceLog, rows: np.ndarray) -> np.ndarray:
        valid = rows >= 0
        users = np.asarray(log.user)[np.where(valid, rows, 0)]
        if not self.same_log:
            users = self.source.index.user_index(log.user_keys[users])
        return np.where(valid, users, -1)

    def __call__(self, log: InstanceLog, rows: np.ndarray) -> RankBatch:
        base = make_batch(log, rows)
        rows = np.asarray(rows, dtype=np.int64)
        times = np.asarray(log.ts)[np.where(rows >= 0, rows, 0)]
        first, length = self.source.index.ranges(self.history_users(log, rows), times, self.max_len)
        hist = expand_ranges(first, length)
        codes, gap = side_info(hist, length, times, self.source.labels, self.source.label_time, self.source.index.ts)
        b, t, k = len(rows), self.max_len, self.source.labels.shape[1]
        valid = np.arange(t)[None, :] < length[:, None]
        hist_labels = np.zeros((b, t, k), dtype=np.int64)
        hist_labels[valid] = codes
        hist_gap = np.zeros((b, t), dtype=np.int64)
        hist_gap[valid] = gap
        lengths = torch.from_numpy(length.astype(np.int32))
        feats = self.source.seq_features
        seq = KeyedJaggedTensor.from_lengths_sync(
            keys=[seq_key(f) for f in feats],
            values=torch.from_numpy(np.concatenate([self.source.seq_ids(f, hist) for f in feats]).astype(np.int64))
            if feats
            else torch.zeros(0, dtype=torch.int64),
            lengths=lengths.repeat(len(feats)),
        )
        return extend(
            base,
            RankBatch,
            history_ids=KeyedJaggedTensor.from_lengths_sync(keys=[TOKEN_FEATURE], values=torch.from_numpy(hist), lengths=lengths),
            seq=seq,
            hist_labels=torch.from_numpy(hist_labels),
            hist_gap=torch.from_numpy(hist_gap),
            hist_valid=torch.from_numpy(valid),
        )
