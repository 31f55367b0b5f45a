"""Stage 1: train the instance compressor (temporal-order or user-order scheme).

    iat-rec compress --data LOG --scheme {temporal,user} --out RUN [--nproc N] [--steps N | --epochs E]

``--nproc`` > 1 starts that many local ranks through torchrun; under a launcher (torchrun,
torchx) the program runs as one rank of the launched job.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from iat_rec.batching.loaders import select_tasks
from iat_rec.data.instance_log import InstanceLog, check_split, time_split
from iat_rec.dist.atomic import write_json
from iat_rec.dist.env import init_distributed, provenance, rank_main
from iat_rec.errors import IatError
from iat_rec.tokens.table import TokenTable, token_constraints
from iat_rec.train.config import SCHEMES, CompressConfig, check_values, to_dict
from iat_rec.train.run_dir import RUN_FORMAT, check_run_out
from iat_rec.train.stage1 import (
    build_compressor,
    instances_per_batch,
    make_dataset,
    plan_batch,
    slice_steps,
)
from iat_rec.train.trainer import (
    Trainer,
    check_resume,
    check_resume_from,
    make_optimizer,
    program_cli,
    program_parser,
    shard,
    total_steps,
    train_until,
)
from modules.compressor import BOTTLENECK_ACTS


def check_config(cfg: CompressConfig) -> None:
    check_values(cfg)
    if not cfg.data or not cfg.out:
        raise IatError("--data and --out are required")
    if cfg.scheme not in SCHEMES:
        raise IatError(f"--scheme must be one of {list(SCHEMES)}, not '{cfg.scheme}'")
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
        raise IatError(
            f"--reconstruct-features {unknown}: not sparse features of {cfg.data} "
            f"({[f.name for f in log.schema.sparse]})"
        )
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
    if cfg.compile:
        model.compile_dense()
    constraints = token_constraints(env.device.type) if table else None
    dmp, _ = shard(
        model,
        env,
        cfg,
        plan_out=out / "plan.json",
        extra_constraints=constraints,
        plan_batch=plan_batch(cfg),
    )
    if table is not None:
        table.load_into(dmp.module.tokens)
    per_batch = instances_per_batch(cfg)
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
        env,
        cfg,
        dmp,
        make_optimizer(dmp, cfg),
        train_ds,
        valid_ds,
        select_tasks(log.schema, cfg.tasks)[0],
        per_batch,
        info,
        snapshots=snapshots,
    )
    result = trainer.fit()
    if result["stopped_at_time_limit"]:
        if env.is_main:  # unfinished: no result.json (one of a shorter run, continued) until --resume finishes it
            (out / "result.json").unlink(missing_ok=True)
        return result
    if env.is_main:
        write_json(out / "result.json", result)
        print(f"stage 1 done: {out} ({result['steps']} steps)", flush=True)
    return result


def parser() -> argparse.ArgumentParser:
    return program_parser("iat-rec compress", __doc__, CompressConfig)


def cli(argv: list[str]) -> int:
    return program_cli(argv, "pipelines.compress", parser(), CompressConfig, check_config, train)


if __name__ == "__main__":
    rank_main(cli)
