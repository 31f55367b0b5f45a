"""Stage 2: train the downstream ranker over fetched instance tokens (or the baselines).

    iat-rec rank --data LOG --tokens TOKENS --history {none,labels,handcrafted,iat,both} \\
                 --reader {transformer,din,longer} [--query {features,token}] --out RUN \\
                 [--stage1 RUN1 [--warm-start]] [--epochs E --eval-every N --early-stop P]

With ``--stage1`` the feature tables keep the stage-1 run's sharding plan (same world size)
and ``--warm-start`` loads their weights from its checkpoint; the token table is planned
and added to that plan (the hand-crafted history reads the feature tables themselves). With
``--early-stop P`` training stops after P evaluations without a better validation AUC and the
best model is restored. At the end the test split is evaluated into ``RUN/metrics.json``
(LogLoss in nats).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from iat_rec.batching.loaders import select_tasks
from iat_rec.data.instance_log import InstanceLog, check_split
from iat_rec.dist.atomic import write_json
from iat_rec.dist.env import init_distributed, provenance, rank_main
from iat_rec.errors import IatError
from iat_rec.tokens.table import TokenTable
from iat_rec.train.config import check_values, to_dict
from iat_rec.train.run_dir import RUN_FORMAT, check_run_out
from iat_rec.train.stage2 import Stage2Config, build, dataset, take_stage1_shape, test_metrics
from iat_rec.train.trainer import (
    Trainer,
    check_resume,
    check_resume_from,
    make_optimizer,
    program_cli,
    program_parser,
    train_until,
)
from modules.ranker import HISTORY_MODES, QUERIES, READERS, TOKEN_FETCHES, layout_problem


def check_config(cfg: Stage2Config) -> None:
    check_values(cfg)
    if not cfg.data or not cfg.out:
        raise IatError("--data and --out are required")
    r = cfg.ranker
    if r.history not in HISTORY_MODES:
        raise IatError(f"--history must be one of {list(HISTORY_MODES)}, not '{r.history}'")
    if r.reader not in READERS:
        raise IatError(f"--reader must be one of {list(READERS)}, not '{r.reader}'")
    if r.history in ("iat", "both") and not cfg.tokens:
        raise IatError(f"--history {r.history} needs --tokens (a token table from iat-rec export)")
    if r.query not in QUERIES:
        raise IatError(f"--query must be one of {list(QUERIES)}, not '{r.query}'")
    if r.token_fetch not in TOKEN_FETCHES:
        raise IatError(f"--token-fetch must be one of {list(TOKEN_FETCHES)}, not '{r.token_fetch}'")
    if r.query == "token" and r.history not in ("iat", "both"):
        raise IatError(
            f"--query token reads the candidate's own token: it needs --history iat or both, not {r.history}"
        )
    problem = layout_problem(r)
    if problem:
        raise IatError(problem)
    if cfg.warm_start and not cfg.stage1:
        raise IatError("--warm-start needs --stage1 RUN")
    log = InstanceLog(cfg.data)
    log.check_files()  # a damaged or edited column is refused before any rank starts
    check_run_out(cfg, (cfg.data, cfg.tokens, cfg.stage1, cfg.resume_from))
    select_tasks(log.schema, cfg.tasks)
    take_stage1_shape(cfg)  # as train() will: --resume-from compares the model it will build
    check_split(log, cfg.split, check_resume_from(cfg, "rank", log).get("train_until"))
    if cfg.tokens:
        table = TokenTable(cfg.tokens)
        table.check_files()
        table.stats()
        other = table.manifest["log_fingerprint"] != log.fingerprint
        if other and not cfg.cross_domain:
            raise IatError(
                f"token table {cfg.tokens} was exported from another instance log ({table.manifest.get('log_path')}): "
                f"pass --cross-domain to read its users' histories for the requests of {cfg.data} (matched by user key)"
            )
        if not other and cfg.cross_domain:
            raise IatError(f"--cross-domain, but token table {cfg.tokens} is of this very log")
        if r.query == "token" and other:
            raise IatError(
                "--query token needs a token table of this very log (the candidate's own row); this one is cross-domain"
            )


def train(cfg: Stage2Config) -> dict:
    env = init_distributed(cfg.device)
    take_stage1_shape(cfg)
    check_resume(cfg, env, InstanceLog(cfg.data).fingerprint)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    resumed = check_resume_from(cfg, "rank", InstanceLog(cfg.data))
    built = build(cfg, env, plan_out=out / "plan.json", after=resumed.get("train_until"))
    info = {
        "format": RUN_FORMAT,
        "stage": "rank",
        "config": to_dict(cfg),
        "world_size": env.world_size,
        "log_fingerprint": built.log.fingerprint,
        "resume_from": resumed,
        "train_until": train_until(built.log, built.splits["train"]),
        "provenance": provenance(),
    }
    trainer = Trainer(
        env,
        cfg,
        built.model,
        make_optimizer(built.model, cfg),
        dataset(built, cfg, "train"),
        dataset(built, cfg, "valid"),
        built.tasks,
        cfg.batch_size,
        info,
    )
    result = trainer.fit()
    if result["stopped_at_time_limit"]:
        if env.is_main:  # unfinished: no test pass and no results (of a shorter run, continued) until --resume ends it
            for name in ("metrics.json", "result.json"):
                (out / name).unlink(missing_ok=True)
        return result
    metrics = test_metrics(built, cfg)
    if env.is_main:
        write_json(out / "metrics.json", metrics)
        write_json(out / "result.json", result)  # training and validation; the test split's figures: metrics.json
        log_hparams(out / "tb", cfg, metrics)
        print(
            f"stage 2 done: {out}: test auc {metrics['auc']:.4f} gauc {metrics['gauc']:.4f} "
            f"logloss {metrics['logloss']:.4f} nats ne {metrics['ne']:.4f}",
            flush=True,
        )
    return metrics


def log_hparams(tb: Path, cfg: Stage2Config, metrics: dict) -> None:
    """The run's options and its test metrics in TensorBoard's HPARAMS tab, to compare runs."""
    from torch.utils.tensorboard import SummaryWriter

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            elif isinstance(v, (int, float, str, bool)):
                out[prefix + k] = v
            else:
                out[prefix + k] = str(v)
        return out

    with SummaryWriter(str(tb)) as writer:
        scores = {f"test/{k}": float(v) for k, v in metrics.items() if k in ("auc", "gauc", "logloss", "ne")}
        writer.add_hparams(flat(to_dict(cfg)), scores, run_name="hparams")


def parser() -> argparse.ArgumentParser:
    return program_parser("iat-rec rank", __doc__, Stage2Config)


def cli(argv: list[str]) -> int:
    return program_cli(argv, "pipelines.rank", parser(), Stage2Config, check_config, train)


if __name__ == "__main__":
    rank_main(cli)
