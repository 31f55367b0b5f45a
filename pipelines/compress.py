"""Stage 1: train the instance compressor (temporal-order or user-order scheme).

    iat-rec compress --data LOG --scheme {temporal,user} --out RUN [--nproc N] [--steps N | --epochs E]

``--nproc`` > 1 starts that many local ranks through torchrun; under a launcher (torchrun,
torchx) the program runs as one rank of the launched job.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from iat_rec.dist.atomic import check_out, write_json
from iat_rec.batching.batch import StreamBatch, extend, make_batch, make_window_batch
from iat_rec.train.config import CompressConfig, check_values, from_dict, to_dict
from iat_rec.dist.env import DistEnv, init_distributed, provenance, rank_main
from iat_rec.errors import IatError
from iat_rec.batching.history import expand_ranges
from iat_rec.data.instance_log import InstanceLog, check_split, time_split
from iat_rec.batching.loaders import BatchDataset, SelectTasks, select_tasks, time_order, user_windows
from iat_rec.tables import TOKEN_FEATURE, model_tables, token_table_config
from iat_rec.tokens.table import TokenTable, token_constraints
from modules.compressor import BOTTLENECK_ACTS, Compressor
from iat_rec.train.trainer import (Trainer, check_resume, check_resume_from, embedding_params, make_optimizer, program_cli, program_parser, shard,
                               total_steps, train_until)

RUN_FORMAT = "iat-rec-run"


def build_compressor(log: InstanceLog, cfg: CompressConfig, prefix_table: TokenTable | None = None) -> Compressor:
    """The stage-1 model; with ``prefix_table`` (streaming) it also holds that frozen table."""
    return Compressor(
        model_tables(log.schema, cfg.model.emb_dim),
        dense_in=len(log.schema.dense),
        num_tasks=len(select_tasks(log.schema, cfg.tasks)[0]),
        side_tasks=len(log.schema.labels),
        cfg=cfg.model,
        window=cfg.window if cfg.scheme == "user" else None,
        prefix_table=token_table_config(prefix_table.rows, prefix_table.dim, prefix_table.dtype) if prefix_table else None,
        prefix_len=cfg.prefix,
        reconstruct=cfg.reconstruct,
        reconstruct_features=reconstructed(log.schema, cfg),
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
            prefix_ids=KeyedJaggedTensor.from_lengths_sync([TOKEN_FEATURE], torch.from_numpy(ids), torch.from_numpy(length.astype(np.int32))),
            prefix_valid=torch.from_numpy(np.arange(self.prefix)[None, :] < length[:, None]),
        )


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
        log, units, cfg.batch_size, rank, world_size, window=window, seed=cfg.seed,
        make=SelectTasks(StreamBatchMaker(cfg.prefix, cfg.window) if cfg.stream else make_window_batch if window else make_batch,
                         select_tasks(log.schema, cfg.tasks)[1]),
    )  # fmt: skip


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
    unit_step = np.arange(len(ds.units)) // (cfg.batch_size * world_size)
    step = np.full(log.rows, -1, dtype=np.int64)
    if ds.window is None:
        step[ds.units] = unit_step
    else:
        step[expand_ranges(ds.units[:, 0], ds.units[:, 1])] = np.repeat(unit_step, ds.units[:, 1])
    total = total_steps(cfg, len(ds))
    return np.where(step < total, step, -1)


def check_run_out(cfg, inputs: tuple[str, ...]) -> None:
    """A training run's ``--out``: never an input; an existing run only with --resume (continue
    it) or --overwrite (replace it)."""
    check_out(cfg.out, "a run", {RUN_FORMAT}, "run.json", cfg.resume or cfg.overwrite, tuple(i for i in inputs if i))


def check_config(cfg: CompressConfig) -> None:
    check_values(cfg)
    if not cfg.data or not cfg.out:
        raise IatError("--data and --out are required")
    if cfg.scheme not in ("temporal", "user"):
        raise IatError(f"--scheme must be 'temporal' or 'user', not '{cfg.scheme}'")
    if cfg.model.bottleneck_act not in BOTTLENECK_ACTS:
        raise IatError(f"--bottleneck-act must be one of {list(BOTTLENECK_ACTS)}, not '{cfg.model.bottleneck_act}'")
    if cfg.slices < 0:
        raise IatError(f"--slices must be >= 0, not {cfg.slices}")
    if not cfg.reconstruct >= 0:
        raise IatError(f"--reconstruct must be >= 0, not {cfg.reconstruct}")
    if cfg.stream and cfg.scheme != "user":
        raise IatError("--stream needs --scheme user")
    log = InstanceLog(cfg.data)  # fails early, with a clear message, on a missing or foreign directory
    log.check_files()  # a damaged or edited column is refused before any rank starts
    check_run_out(cfg, (cfg.data, cfg.tokens, cfg.resume_from))
    select_tasks(log.schema, cfg.tasks)
    check_split(log, cfg.split, check_resume_from(cfg, "compress", log).get("train_until"))
    unknown = sorted(set(cfg.reconstruct_features) - {f.name for f in log.schema.sparse})
    if unknown:
        raise IatError(f"--reconstruct-features {unknown}: not sparse features of {cfg.data} ({[f.name for f in log.schema.sparse]})")
    if cfg.stream:
        if not cfg.tokens:
            raise IatError("--stream needs --tokens: a token table of this log (iat-rec export)")
        table = TokenTable(cfg.tokens)
        table.check_files()
        table.check_log(log)
        table.check_dim(cfg.model.iat_dim)


def train(cfg: CompressConfig) -> dict:
    env = init_distributed(cfg.device)
    check_resume(cfg, env, InstanceLog(cfg.data).fingerprint)
    torch.manual_seed(cfg.seed)
    log = InstanceLog(cfg.data)
    resumed = check_resume_from(cfg, "compress", log)
    splits = time_split(log, cfg.split, resumed.get("train_until"))
    train_ds = make_dataset(log, splits["train"], cfg, env.rank, env.world_size)
    valid_ds = make_dataset(log, splits["valid"], cfg, env.rank, env.world_size)
    out = Path(cfg.out)
    table = TokenTable(cfg.tokens) if cfg.stream else None
    model = build_compressor(log, cfg, table)
    constraints = token_constraints(env.device.type) if table else None
    dmp, _ = shard(model, env, cfg, plan_out=out / "plan.json", trainable=embedding_params(model.base), extra_constraints=constraints)
    if table is not None:
        table.load_into(dmp.module.tokens)
    per_batch = cfg.batch_size * (cfg.window if cfg.scheme == "user" else 1)
    info = {
        "format": RUN_FORMAT,
        "stage": "compress",
        "config": to_dict(cfg),
        "data": str(Path(cfg.data).resolve()),
        "log_fingerprint": log.fingerprint,
        "resume_from": resumed,
        "train_until": train_until(log, splits["train"]),
        "world_size": env.world_size,
        "backend": env.backend,
        "provenance": provenance(),
    }
    snapshots = slice_steps(len(train_ds), cfg.slices, total_steps(cfg, len(train_ds)))
    trainer = Trainer(
        env, cfg, dmp, make_optimizer(dmp, cfg.dense_lr), train_ds, valid_ds, select_tasks(log.schema, cfg.tasks)[0], per_batch, info,
        snapshots=snapshots,
    )  # fmt: skip
    result = trainer.fit()
    if env.is_main:
        write_json(out / "result.json", result)
        print(f"stage 1 done: {out} ({result['steps']} steps)", flush=True)
    return result


def parser() -> argparse.ArgumentParser:
    return program_parser("iat-rec compress", __doc__, CompressConfig)


def cli(argv: list[str]) -> int:
    return program_cli(argv, "pipelines.compress", parser(), CompressConfig, check_config, train)


def load_stage1(run: str | Path) -> tuple[CompressConfig, dict, InstanceLog]:
    """A stage-1 run's config, run info and instance log; refuses a log changed since training."""
    path = Path(run) / "run.json"
    if not path.is_file():
        raise IatError(f"{run}: not a stage-1 run (no run.json)")
    info = json.loads(path.read_text())
    if info.get("format") != RUN_FORMAT or info.get("stage") != "compress":
        raise IatError(f"{path}: not a stage-1 (compress) run")
    # runs made before the reconstruction loss existed trained without it
    cfg = from_dict(CompressConfig, {"reconstruct": 0.0, **info["config"]}, where=str(path))
    log = InstanceLog(cfg.data)
    if log.fingerprint != info["log_fingerprint"]:
        raise IatError(f"{cfg.data} changed since {run} was trained (fingerprint {log.fingerprint} != {info['log_fingerprint']})")
    return cfg, info, log


if __name__ == "__main__":
    rank_main(cli)
