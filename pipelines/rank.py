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
import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.types import ShardingPlan

from iat_rec.batching.loaders import BatchDataset, SelectTasks, select_tasks, time_order
from iat_rec.batching.rank_data import HistorySource, RankBatchMaker
from iat_rec.data.instance_log import InstanceLog, check_split, time_split
from iat_rec.dist import checkpoint as ckpt
from iat_rec.dist.atomic import write_json
from iat_rec.dist.env import DistEnv, init_distributed, provenance, rank_main
from iat_rec.errors import IatError
from iat_rec.sharding.plan_json import load_plan
from iat_rec.sharding.planning import make_plan
from iat_rec.sharding.topology import build_topology
from iat_rec.tables import TOKENS_PATH, table_bytes, token_table_config
from iat_rec.tokens.table import TokenTable, token_constraints
from iat_rec.train.config import TrainConfig, check_values, from_dict, to_dict
from iat_rec.train.stage1 import RUN_FORMAT, check_run_out, load_stage1
from iat_rec.train.trainer import (
    Trainer,
    check_resume,
    check_resume_from,
    evaluate,
    make_optimizer,
    program_cli,
    program_parser,
    shard,
    train_until,
)
from modules.ranker import HISTORY_MODES, QUERIES, READERS, TOKEN_FETCHES, Ranker, RankerConfig, build_ranker


@dataclasses.dataclass
class RankConfig(TrainConfig):
    ranker: RankerConfig = dataclasses.field(default_factory=RankerConfig)
    tokens: str = ""  # token table (history iat/both)
    stage1: str = ""  # stage-1 run: its feature-table plan (and weights with --warm-start)
    warm_start: bool = False  # load the shared feature tables' weights from --stage1
    cross_domain: bool = False  # --tokens of another log: requests read the source users' histories, matched by
    #   user key


def check_config(cfg: RankConfig) -> None:
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


@dataclasses.dataclass
class Built:
    env: DistEnv
    log: InstanceLog
    model: nn.Module  # DistributedModelParallel
    maker: SelectTasks
    splits: dict
    tasks: list[str]


def take_stage1_shape(cfg: RankConfig) -> None:
    """With --stage1 the shared feature tables keep their stage-1 shape (its plan applies)."""
    if cfg.stage1:
        cfg.model.emb_dim = load_stage1(cfg.stage1)[0].model.emb_dim


def build(cfg: RankConfig, env: DistEnv, plan_out: Path | None, after: int | None = None) -> Built:
    """The sharded ranker with its token table loaded, the batch maker and the splits
    (``after``: a --resume-from run's split of the rows after what its earlier runs trained on)."""
    log = InstanceLog(cfg.data)
    r = cfg.ranker
    stage1_plan = None
    if cfg.stage1:
        s1cfg, s1info, s1log = load_stage1(cfg.stage1)
        if s1log.schema.sparse != log.schema.sparse or s1log.schema.sequence != log.schema.sequence:
            raise IatError(
                f"{cfg.data} has other sparse features than the stage-1 log {s1log.path}: "
                "the stage-1 plan does not apply"
            )
        take_stage1_shape(cfg)
        if s1info["world_size"] == env.world_size:
            stage1_plan = load_plan(Path(cfg.stage1) / "plan.json")
        elif env.is_main:
            print(
                f"stage-1 ran on {s1info['world_size']} ranks, this job on {env.world_size}: "
                "re-planning the feature tables",
                flush=True,
            )
    table = TokenTable(cfg.tokens) if r.history in ("iat", "both") else None
    same_log = table is None or table.manifest["log_fingerprint"] == log.fingerprint
    seq_features = list(log.schema.sequence) if r.history in ("handcrafted", "both") else []
    if seq_features and not same_log:
        source_log = InstanceLog(table.manifest["log_path"])
        table.check_log(source_log)
    else:
        source_log = log
    source = (
        HistorySource.from_tokens(table, source_log, seq_features)
        if table
        else HistorySource.from_log(log, seq_features)
    )
    tasks, task_index = select_tasks(log.schema, cfg.tasks)
    model = build_ranker(
        log.schema,
        cfg.model,
        r,
        len(tasks),
        side_tasks=source.labels.shape[1],
        **(
            {"token_rows": table.rows, "token_dim": table.dim, "token_dtype": table.dtype, "token_stats": table.stats()}
            if table
            else {}
        ),
    )
    plan = _plan(model, env, cfg, stage1_plan)
    dmp, _ = shard(model, env, cfg, plan_out=plan_out, plan=plan)
    if table is not None and r.token_fetch == "ranges":
        dmp.module.token_rows.load(read_replica(table, env.device))
    elif table is not None:
        table.load_into(dmp.module.tokens)
    if cfg.warm_start:
        for prefix in ("base.sparse.", "base.shared."):
            if any(k.startswith(prefix) for k in dmp.state_dict()):
                ckpt.load_weights(ckpt.latest(cfg.stage1), dmp, prefix=prefix)
    maker = RankBatchMaker(
        source, r.max_len, same_log, candidate=model.token_query, token_ids=r.token_fetch == "lookup"
    )
    maker = SelectTasks(maker, task_index)
    return Built(env, log, dmp, maker, time_split(log, cfg.split, after), tasks)


def read_replica(table: TokenTable, device: torch.device) -> torch.Tensor:
    """The whole token table on ``device`` (``--token-fetch ranges``: every rank holds it all)."""
    need = table_bytes(token_table_config(table.rows, table.dim, table.dtype))
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if need > total // 2:
            raise IatError(
                f"token table {table.path} is {need / 2**30:.1f} GiB, more than half of this GPU's "
                f"{total / 2**30:.0f} GiB: --token-fetch ranges keeps a whole copy on every rank; use lookup (sharded)"
            )
    return table.read_rows(0, table.rows).to(device)


def _plan(model: Ranker, env: DistEnv, cfg: RankConfig, stage1_plan: ShardingPlan | None) -> ShardingPlan:
    """Stage-1 plan for the shared feature tables, plus a fresh plan for the new tables."""
    topology = build_topology(env.world_size, env.local_world_size, env.device.type, hbm_gb=cfg.hbm_gb or None)
    constraints = token_constraints(env.device.type) if hasattr(model, TOKENS_PATH) else None
    if stage1_plan is None:
        return make_plan(model, topology, cfg.batch_size, constraints, pg=dist.group.WORLD)
    holder = nn.Module()
    if hasattr(model, TOKENS_PATH):
        holder.add_module(TOKENS_PATH, model.tokens)
    new = (
        make_plan(holder, topology, cfg.batch_size, constraints, pg=dist.group.WORLD)
        if len(holder._modules)
        else ShardingPlan({})
    )
    return ShardingPlan({**stage1_plan.plan, **new.plan})


def dataset(built: Built, cfg: RankConfig, split: str) -> BatchDataset:
    rows = time_order(built.log, built.splits[split])
    return BatchDataset(built.log, rows, cfg.batch_size, built.env.rank, built.env.world_size, make=built.maker)


def test_metrics(built: Built, cfg: RankConfig) -> dict:
    """Evaluates the test split; the first task's figures are also at the top level."""
    per_task = evaluate(built.model, dataset(built, cfg, "test"), built.env, built.tasks)
    first = per_task[built.tasks[0]]
    return {**{k: first[k] for k in ("auc", "gauc", "logloss", "ne", "n")}, "task": built.tasks[0], "tasks": per_task}


def train(cfg: RankConfig) -> dict:
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
        make_optimizer(built.model, cfg.dense_lr),
        dataset(built, cfg, "train"),
        dataset(built, cfg, "valid"),
        built.tasks,
        cfg.batch_size,
        info,
    )
    result = trainer.fit()
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


def log_hparams(tb: Path, cfg: RankConfig, metrics: dict) -> None:
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


def load_rank_config(run: str | Path) -> RankConfig:
    path = Path(run) / "run.json"
    if not path.is_file():
        raise IatError(f"{run}: not a run (no run.json)")
    info = json.loads(path.read_text())
    if info.get("format") != RUN_FORMAT or info.get("stage") != "rank":
        raise IatError(f"{path}: not a stage-2 (rank) run")
    return from_dict(RankConfig, info["config"], where=str(path))


def parser() -> argparse.ArgumentParser:
    return program_parser("iat-rec rank", __doc__, RankConfig)


def cli(argv: list[str]) -> int:
    return program_cli(argv, "pipelines.rank", parser(), RankConfig, check_config, train)


if __name__ == "__main__":
    rank_main(cli)
