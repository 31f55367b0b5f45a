"""Per-rank batch datasets and resumable loaders on torchdata's StatefulDataLoader.

Every rank gets the same number of batches (TorchRec's pipelines hang otherwise): the
global batch order is cut into ``ceil(units / (batch_size * world))`` steps and the last
one is padded with rows of weight 0. At step s, rank r reads global batch ``s * world + r``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from iat_rec.batching.batch import Batch, make_batch
from iat_rec.data.instance_log import InstanceLog
from iat_rec.errors import IatError


def time_order(log: InstanceLog, rows: np.ndarray) -> np.ndarray:
    """Rows in global time order (ties in (user, time) order): the temporal scheme."""
    return rows[np.argsort(np.asarray(log.ts)[rows], kind="stable")]


def user_windows(log: InstanceLog, rows: np.ndarray, window: int) -> np.ndarray:
    """[n, 2] (first row, length) windows of up to ``window`` consecutive instances of one user.

    ``rows`` must be sorted; the rows of one user inside a time split are contiguous
    because the log is sorted by (user, time).
    """
    if len(rows) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    user = np.asarray(log.user)[rows]
    # a run = maximal block of consecutive row ids of one user
    breaks = np.flatnonzero((np.diff(rows) != 1) | (np.diff(user) != 0)) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(rows)]])
    out = []
    for s, e in zip(starts, ends):
        first = np.arange(s, e, window)
        out.append(np.stack([rows[first], np.minimum(window, e - first)], 1))
    return np.concatenate(out).astype(np.int64)


def select_tasks(schema, tasks: tuple[str, ...] | list[str]) -> tuple[list[str], list[int]]:
    """(names, label columns) of the tasks to train on; all of the schema's when none are named."""
    names = schema.task_names
    if not tasks:
        return names, list(range(len(names)))
    unknown = [t for t in tasks if t not in names]
    if unknown:
        raise IatError(f"--tasks {unknown} not among the log's labels {names}")
    return list(tasks), [names.index(t) for t in tasks]


class SelectTasks:
    """Wraps a batch maker: keeps only the label columns of the selected tasks."""

    def __init__(self, make: Callable, index: list[int]):
        self.make, self.index = make, index

    def __call__(self, log: InstanceLog, rows: np.ndarray):
        batch = self.make(log, rows)
        return dataclasses.replace(batch, labels=batch.labels[:, self.index].contiguous())


class BatchDataset(torch.utils.data.Dataset):
    """Map-style dataset of this rank's batches; item i = global batch ``i * world + rank``.

    ``units`` are either row ids (one instance each) or ``[n, 2]`` user windows; with
    windows a batch holds ``batch_size`` windows x ``window`` rows, window-major.
    """

    def __init__(
        self,
        log: InstanceLog,
        units: np.ndarray,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        window: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        make: Callable[[InstanceLog, np.ndarray], Any] = make_batch,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.log, self.units, self.batch_size = log, units, batch_size
        self.rank, self.world_size, self.window = rank, world_size, window
        self.shuffle, self.seed, self.make = shuffle, seed, make
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        n = len(self.units)
        self.order = np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle else np.arange(n)

    def __len__(self) -> int:
        return max(1, math.ceil(len(self.units) / (self.batch_size * self.world_size)))

    def unit_indices(self, i: int) -> np.ndarray:
        g = i * self.world_size + self.rank
        return self.order[g * self.batch_size : (g + 1) * self.batch_size]

    def rows(self, i: int) -> np.ndarray:
        """Row ids of batch i, padded with -1 to its full size."""
        picked = self.units[self.unit_indices(i)]
        if self.window is None:
            rows = np.full(self.batch_size, -1, dtype=np.int64)
            rows[: len(picked)] = picked
            return rows
        rows = np.full((self.batch_size, self.window), -1, dtype=np.int64)
        if len(picked):
            pos = np.arange(self.window)
            rows[: len(picked)] = np.where(pos < picked[:, 1:2], picked[:, 0:1] + pos, -1)
        return rows.reshape(-1)

    def __getitem__(self, i: int) -> Batch:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.make(self.log, self.rows(i))


class EpochLoader:
    """Endless batches over epochs; its state is exact at any consumed-batch count.

    Train pipelines pull batches ahead of the step they train, so the loader's own state
    runs ahead of the model. We record the loader state after every batch handed out and
    checkpoint the one matching the number of batches the model has consumed.
    """

    def __init__(self, dataset: BatchDataset, num_workers: int = 0, pin_memory: bool = False):
        self.dataset = dataset
        self.loader = StatefulDataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=pin_memory,
            snapshot_every_n_steps=1,
        )
        self.epoch = 0
        self.handed_out = 0
        self._states: dict[int, dict] = {0: self._snapshot()}

    def _snapshot(self) -> dict:
        return {"epoch": self.epoch, "loader": self.loader.state_dict()}

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            self.dataset.set_epoch(self.epoch)
            for batch in self.loader:
                self.handed_out += 1
                self._states[self.handed_out] = self._snapshot()
                yield batch
            self.epoch += 1
            self._states[self.handed_out] = {"epoch": self.epoch, "loader": None}  # next epoch, fresh

    def state_at(self, consumed: int) -> dict:
        """Loader state after ``consumed`` batches; forgets older states."""
        state = self._states[consumed]
        self._states = {k: v for k, v in self._states.items() if k >= consumed}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.dataset.set_epoch(self.epoch)
        if state["loader"] is not None:
            self.loader.load_state_dict(state["loader"])
        self.handed_out = 0
        self._states = {0: state}
