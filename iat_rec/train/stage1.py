"""Stage 1 as a library: the compressor's factory, its data in time order, snapshot steps and
the loading of a finished run (used by export, stage 2, serving, benchmarks and tests).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from iat_rec.batching.batch import StreamBatch, extend, make_batch, make_window_batch
from iat_rec.batching.history import expand_ranges
from iat_rec.batching.loaders import BatchDataset, SelectTasks, select_tasks, time_order, user_windows
from iat_rec.data.instance_log import InstanceLog, time_split
from iat_rec.errors import IatError
from iat_rec.tables import TOKEN_FEATURE, model_tables, token_table_config
from iat_rec.tokens.table import TokenTable
from iat_rec.train.config import CompressConfig, from_dict
from iat_rec.train.run_dir import RUN_INFO, read_run
from iat_rec.train.trainer import total_steps
from modules.compressor import Compressor


def build_compressor(log: InstanceLog, cfg: CompressConfig, prefix_table: TokenTable | None = None) -> Compressor:
    """The stage-1 model; with ``prefix_table`` (streaming) it also holds that frozen table."""
    return Compressor(
        model_tables(log.schema, cfg.model.emb_dim, dtype=cfg.model.table_dtype),
        dense_in=len(log.schema.dense),
        num_tasks=len(select_tasks(log.schema, cfg.tasks)[0]),
        side_tasks=len(log.schema.labels),
        cfg=cfg.model,
        window=cfg.window if cfg.scheme == "user" else None,
        prefix_table=token_table_config(prefix_table.rows, prefix_table.dim, prefix_table.dtype)
        if prefix_table
        else None,
        prefix_len=cfg.prefix,
        reconstruct=cfg.reconstruct,
        reconstruct_features=reconstructed(log.schema, cfg),
        bf16=cfg.bf16,
    )


def reconstructed(schema, cfg: CompressConfig) -> tuple[str, ...]:
    """The features the token must keep recoverable: the configured ones, else the schema's
    sequence features (what a hand-crafted history would hold), else every sparse feature."""
    return tuple(cfg.reconstruct_features) or tuple(schema.sequence) or tuple(f.name for f in schema.sparse)


class StreamBatchMaker:
    """Windows of one user plus the (up to) P instances of that user right before each window."""

    def __init__(self, prefix: int, window: int):
        self.prefix, self.window = prefix, window

    def __call__(self, log: InstanceLog, rows: np.ndarray) -> StreamBatch:
        base = make_window_batch(log, rows)
        first_rows = np.asarray(rows).reshape(-1, self.window)[:, 0]
        valid = first_rows >= 0
        start_u = np.asarray(log.user_offsets)[np.asarray(log.user)[np.where(valid, first_rows, 0)]]
        begin = np.maximum(start_u, first_rows - self.prefix)
        length = np.where(valid, first_rows - begin, 0)
        ids = expand_ranges(begin, length)
        return extend(
            base,
            StreamBatch,
            prefix_ids=KeyedJaggedTensor.from_lengths_sync(
                [TOKEN_FEATURE], torch.from_numpy(ids), torch.from_numpy(length.astype(np.int32))
            ),
            prefix_valid=torch.from_numpy(np.arange(self.prefix)[None, :] < length[:, None]),
        )


def units_per_batch(cfg: CompressConfig) -> int:
    """What a rank's batch holds: ``batch_size`` instances (temporal), or ``batch_size //
    window`` windows of ``window`` instances (user order, at least one): one meaning of
    ``--batch-size`` for both schemes, so one config gives both the same instances a step."""
    return max(1, cfg.batch_size // cfg.window) if cfg.scheme == "user" else cfg.batch_size


def instances_per_batch(cfg: CompressConfig) -> int:
    """Instance slots in a rank's batch (user order: whole windows, padding included)."""
    return units_per_batch(cfg) * (cfg.window if cfg.scheme == "user" else 1)


def plan_batch(cfg: CompressConfig) -> int:
    """The batch stage 1's planner is told: ``units_per_batch`` (windows in user order), as
    before --batch-size counted instances in both schemes. Told the instances, TorchRec's
    planner makes the small feature tables data-parallel (dense kernel): another plan, so
    other random inits and results (ask for that with --replicate-rows)."""
    return units_per_batch(cfg)


def make_dataset(log: InstanceLog, rows: np.ndarray, cfg: CompressConfig, rank: int, world_size: int) -> BatchDataset:
    """Temporal: instances in global time order. User: windows of one user's consecutive
    instances, ordered by their first instance's time. Both schemes train in time order, as a
    streaming source model does: a model snapshot taken at step s has trained on no instance
    after the time reached at s (time-consistent export relies on it)."""
    if cfg.scheme == "temporal":
        units, window = time_order(log, rows), None
    else:
        units, window = user_windows(log, rows, cfg.window), cfg.window
        units = units[np.argsort(np.asarray(log.ts)[units[:, 0]], kind="stable")]
    return BatchDataset(
        log,
        units,
        units_per_batch(cfg),
        rank,
        world_size,
        window=window,
        seed=cfg.seed,
        make=SelectTasks(
            StreamBatchMaker(cfg.prefix, cfg.window) if cfg.stream else make_window_batch if window else make_batch,
            select_tasks(log.schema, cfg.tasks)[1],
        ),
    )


def slice_steps(steps_per_epoch: int, slices: int, total_steps: int) -> tuple[int, ...]:
    """Snapshot steps for time-consistent export: 0 (the untrained model) and ``slices`` - 1
    more, evenly over the first epoch, none at or past the end of training (rows trained
    after the last snapshot get its tokens; rows never trained on, the final model's)."""
    if slices <= 0:
        return ()
    return tuple(sorted({k * steps_per_epoch // slices for k in range(slices)} & set(range(total_steps))))


def first_train_step(log: InstanceLog, cfg: CompressConfig, world_size: int, after: int | None = None) -> np.ndarray:
    """For every row of the log: the 0-based step of a stage-1 run (``cfg``, ``world_size``
    ranks) at which it was first trained on, or -1 if it never was (valid/test rows, rows
    past a partial epoch; with ``after``, a --resume-from run's, every row up to that time).
    Global batch g (rank g % world at step g // world) holds units
    ``[g * batch, (g + 1) * batch)`` of the first epoch's order."""
    ds = make_dataset(log, time_split(log, cfg.split, after)["train"], cfg, 0, world_size)
    unit_step = np.arange(len(ds.units)) // (units_per_batch(cfg) * world_size)
    step = np.full(log.rows, -1, dtype=np.int64)
    if ds.window is None:
        step[ds.units] = unit_step
    else:
        step[expand_ranges(ds.units[:, 0], ds.units[:, 1])] = np.repeat(unit_step, ds.units[:, 1])
    total = total_steps(cfg, len(ds))
    return np.where(step < total, step, -1)


def load_stage1(run: str | Path) -> tuple[CompressConfig, dict, InstanceLog]:
    """A stage-1 run's config, run info and instance log; refuses a log changed since training."""
    info = read_run(run, "compress")
    # runs made before the reconstruction loss existed trained without it
    cfg = from_dict(CompressConfig, {"reconstruct": 0.0, **info["config"]}, where=str(Path(run) / RUN_INFO))
    log = InstanceLog(cfg.data)
    if log.fingerprint != info["log_fingerprint"]:
        raise IatError(
            f"{cfg.data} changed since {run} was trained (fingerprint {log.fingerprint} != {info['log_fingerprint']})"
        )
    return cfg, info, log
