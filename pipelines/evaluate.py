"""Evaluate a stage-2 run on the test split: ``RUN/metrics.json``.

    iat-rec evaluate --run RUN [--nproc N]

Rebuilds the run's ranker from its recorded config, loads its weights (the best model of
an early-stopped run, else its latest checkpoint), and writes
``{"auc", "gauc", "logloss", "ne", "n", "task", "tasks"}`` (LogLoss in nats).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from iat_rec.dist import checkpoint as ckpt
from iat_rec.dist.atomic import write_json
from iat_rec.dist.env import init_distributed, rank_main, run_ranks
from iat_rec.errors import IatError
from iat_rec.train.run_dir import read_run
from iat_rec.train.stage2 import build, load_stage2_config, test_metrics
from iat_rec.train.trainer import BEST, frozen_tables


def evaluate_run(run: str) -> dict:
    cfg = load_stage2_config(run)
    cfg.warm_start = False  # the run's own checkpoint has every weight
    env = init_distributed(cfg.device)
    last = Path(run) / BEST if cfg.early_stop and (Path(run) / BEST / ".metadata").is_file() else ckpt.latest(run)
    if last is None:
        raise IatError(f"{run}: no checkpoint to evaluate")
    resumed = read_run(run, "rank").get("resume_from") or {}
    built = build(cfg, env, plan_out=None, after=resumed.get("train_until"))  # the run's own test split
    ckpt.load_weights(last, built.model, skip=frozen_tables(built.model))  # build() loaded the token table
    metrics = test_metrics(built, cfg)
    if env.is_main:
        write_json(Path(run) / "metrics.json", metrics)
        print(
            f"{run} ({last.name}): test auc {metrics['auc']:.4f} gauc {metrics['gauc']:.4f} "
            f"logloss {metrics['logloss']:.4f} nats n {metrics['n']}"
        )
    return metrics


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="iat-rec evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", required=True, help="stage-2 run directory")
    p.add_argument("--nproc", type=int, default=None, help="local ranks to launch (default: GPUs, else 2)")
    args = p.parse_args(argv)
    load_stage2_config(args.run)
    return run_ranks("pipelines.evaluate", argv, args.nproc, lambda: evaluate_run(args.run))


if __name__ == "__main__":
    rank_main(cli)
