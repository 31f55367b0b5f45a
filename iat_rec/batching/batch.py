"""Batches: rows of the instance log as KeyedJaggedTensors and dense tensors.

A batch is a TorchRec ``Pipelineable`` so the train pipelines can copy it to the device on
a side stream. Padding rows (id -1) keep every rank's batch the same shape; they carry
weight 0, no sparse ids, and zero dense features.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from iat_rec.batching.history import LABEL_UNKNOWN
from iat_rec.data.instance_log import InstanceLog


def _map_fields(obj, fn):
    return dataclasses.replace(
        obj,
        **{
            f.name: fn(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if isinstance(getattr(obj, f.name), (torch.Tensor, KeyedJaggedTensor))
        },
    )


class PipelineableMixin(Pipelineable):
    """``to`` / ``record_stream`` / ``pin_memory`` over every tensor and KJT field."""

    def to(self, device: torch.device, non_blocking: bool = False):
        return _map_fields(self, lambda t: t.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (torch.Tensor, KeyedJaggedTensor)):
                v.record_stream(stream)

    def pin_memory(self):
        return _map_fields(self, lambda t: t.pin_memory())


@dataclasses.dataclass
class Batch(PipelineableMixin):
    """N instances (for user-order windows N = windows x W, window-major)."""

    dense: torch.Tensor  # float32 [N, D]
    sparse: KeyedJaggedTensor  # pooled features (every sparse feature but the sequence ones), N rows each
    shared: KeyedJaggedTensor  # the schema's sequence features (unpooled tables shared with histories)
    labels: torch.Tensor  # float32 [N, K]
    weights: torch.Tensor  # float32 [N]; 0 on padding rows
    ids: torch.Tensor  # int64 [N]; instance id, -1 on padding rows
    users: torch.Tensor  # int64 [N]; user index, -1 on padding rows


def extend(base: Batch, cls: type, **extra) -> Batch:
    """A ``cls`` (a Batch subclass) with ``base``'s fields and the ``extra`` ones (which may
    also replace base fields)."""
    return cls(**{**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, **extra})


@dataclasses.dataclass
class WindowBatch(Batch):
    """User-order windows: each row also carries the labels of its user's previous instance
    as known at the row's time, the side info the SIT reads (the token never sees them)."""

    prev_labels: torch.Tensor  # int64 [N, K]: 0/1, or LABEL_UNKNOWN (not known yet, or no previous instance)


def previous_labels(log: InstanceLog, rows: np.ndarray) -> np.ndarray:
    """Label codes of each row's previous instance of the same user, shown only once known
    strictly before the row's time (so same-request instances never see each other's)."""
    rows = np.asarray(rows, dtype=np.int64)
    prev = rows - 1
    ok = rows > 0
    safe, safe_prev = np.where(ok, rows, 0), np.where(ok, prev, 0)
    user, ts = np.asarray(log.user), np.asarray(log.ts)
    ok &= user[safe_prev] == user[safe]
    known = ok[:, None] & (np.asarray(log.label_time)[safe_prev] < ts[safe][:, None])
    return np.where(known, np.asarray(log.labels)[safe_prev].astype(np.int64), LABEL_UNKNOWN)


def make_window_batch(log: InstanceLog, rows: np.ndarray) -> WindowBatch:
    return extend(make_batch(log, rows), WindowBatch, prev_labels=torch.from_numpy(previous_labels(log, rows)))


@dataclasses.dataclass
class StreamBatch(WindowBatch):
    """User-order windows with the user's earlier instances as a SIT prefix (streaming)."""

    prefix_ids: KeyedJaggedTensor  # key TOKEN_FEATURE: up to P instance ids before each window
    prefix_valid: torch.Tensor  # bool [windows, P]


def gather_jagged(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR gather: (lengths [n], values) of ``rows``; rows < 0 are empty."""
    valid = rows >= 0
    picked = rows[valid]  # padding rows read no offsets: the CSR may even have no rows
    starts = np.zeros(len(rows), dtype=np.int64)
    lengths = np.zeros(len(rows), dtype=np.int64)
    starts[valid] = offsets[picked]
    lengths[valid] = offsets[picked + 1] - starts[valid]
    total = int(lengths.sum())
    if total == 0:
        return lengths, np.zeros(0, dtype=np.int64)
    out_off = np.cumsum(lengths) - lengths
    idx = np.repeat(starts - out_off, lengths) + np.arange(total)
    return lengths, np.asarray(values[idx], dtype=np.int64)


def sparse_kjt(log: InstanceLog, rows: np.ndarray, names: list[str] | None = None) -> KeyedJaggedTensor:
    """KJT (key-major) of the given features for ``rows``; rows < 0 get no ids."""
    names = names if names is not None else log.schema.sparse_names
    valid = rows >= 0
    safe = np.where(valid, rows, 0)
    lengths, values = [], []
    for name in names:
        col = log.sparse[name]
        if isinstance(col, tuple):
            ln, vals = gather_jagged(col[0], col[1], rows)
        else:
            ln, vals = valid.astype(np.int64), np.asarray(col[safe[valid]], dtype=np.int64)
        lengths.append(ln)
        values.append(vals)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(names),
        values=torch.from_numpy(np.concatenate(values) if values else np.zeros(0, np.int64)),
        lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32) if lengths else np.zeros(0, np.int32)),
        stride=len(rows),
    )


def make_batch(log: InstanceLog, rows: np.ndarray) -> Batch:
    """The batch of instance rows ``rows`` (int64, -1 = padding)."""
    rows = np.array(rows, dtype=np.int64).reshape(-1)  # a copy: the batch must not alias the caller's array
    valid = rows >= 0
    safe = np.where(valid, rows, 0)
    mask = valid.astype(np.float32)
    dense = np.asarray(log.dense[safe], dtype=np.float32) * mask[:, None]
    labels = np.asarray(log.labels[safe], dtype=np.float32) * mask[:, None]
    users = np.where(valid, np.asarray(log.user[safe]), -1)
    shared = list(log.schema.sequence)
    return Batch(
        dense=torch.from_numpy(dense),
        sparse=sparse_kjt(log, rows, [n for n in log.schema.sparse_names if n not in shared]),
        shared=sparse_kjt(log, rows, shared),
        labels=torch.from_numpy(labels),
        weights=torch.from_numpy(mask),
        ids=torch.from_numpy(rows),
        users=torch.from_numpy(users.astype(np.int64)),
    )
