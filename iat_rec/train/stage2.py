"""Stage 2's library: its config, the sharded ranker with its batch maker, and its datasets.

The program (``iat-rec rank``, ``pipelines/rank.py``) and ``evaluate`` build stage 2 from here:
``build`` reads the instance log and the token table, builds the ranker (``modules.ranker``),
plans its new tables beside the stage-1 plan (``--stage1``) and shards it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.types import ShardingPlan

from iat_rec.batching.loaders import BatchDataset, SelectTasks, select_tasks, time_order
from iat_rec.batching.stage2_data import HistorySource, Stage2BatchMaker, bucket_share
from iat_rec.data.instance_log import InstanceLog, time_split
from iat_rec.dist import checkpoint as ckpt
from iat_rec.dist.env import DistEnv
from iat_rec.errors import IatError
from iat_rec.sharding.plan_json import load_plan
from iat_rec.sharding.planning import make_plan
from iat_rec.sharding.topology import build_topology
from iat_rec.tables import TOKENS_PATH, table_bytes, token_table_config
from iat_rec.tokens.table import TokenTable, token_constraints
from iat_rec.train.config import TrainConfig, from_dict
from iat_rec.train.run_dir import RUN_INFO, read_run
from iat_rec.train.stage1 import load_stage1
from iat_rec.train.trainer import evaluate, shard
from modules.range_gather import even_bounds
from modules.ranker import Ranker, RankerConfig, bucket_prefix, build_ranker


@dataclasses.dataclass
class Stage2Config(TrainConfig):
    ranker: RankerConfig = dataclasses.field(default_factory=RankerConfig)
    tokens: str = ""  # token table (history iat/both)
    stage1: str = ""  # stage-1 run: its feature-table plan (and weights with --warm-start)
    warm_start: bool = False  # load the shared feature tables' weights from --stage1
    cross_domain: bool = False  # --tokens of another log: requests read the source users' histories, matched by
    #   user key


@dataclasses.dataclass
class Built:
    env: DistEnv
    log: InstanceLog
    model: nn.Module  # DistributedModelParallel
    maker: SelectTasks
    splits: dict
    tasks: list[str]


def take_stage1_shape(cfg: Stage2Config) -> None:
    """With --stage1 the shared feature tables keep their stage-1 shape and dtype (its plan applies)."""
    if cfg.stage1:
        stage1 = load_stage1(cfg.stage1)[0].model
        cfg.model.emb_dim, cfg.model.table_dtype = stage1.emb_dim, stage1.table_dtype


def build(cfg: Stage2Config, env: DistEnv, plan_out: Path | None, after: int | None = None) -> Built:
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
    tokens = token_constraints(env.device.type) if hasattr(model, TOKENS_PATH) else None
    plan = _plan(model, env, cfg, stage1_plan, tokens)
    dmp, _ = shard(model, env, cfg, plan_out=plan_out, plan=plan, extra_constraints=tokens)
    if table is not None and r.token_fetch == "ranges":
        dmp.module.token_rows.load(read_replica(table, env.device))
    elif table is not None and r.token_fetch == "sharded_ranges":
        bounds = even_bounds(table.rows, env.world_size)
        dmp.module.token_rows.load(table.read_shard(bounds[env.rank], bounds[env.rank + 1]).to(env.device), bounds)
    elif table is not None:
        table.load_into(dmp.module.tokens)
    if cfg.warm_start:
        for prefix in ("base.sparse.", "base.shared."):
            if any(k.startswith(prefix) for k in dmp.state_dict()):
                ckpt.load_weights(ckpt.latest(cfg.stage1), dmp, prefix=prefix)
    maker = Stage2BatchMaker(
        source,
        r.max_len,
        same_log,
        candidate=model.token_query,
        token_ids=r.token_fetch == "lookup",
        length_bucket=r.length_bucket,
        bucket_prefix=bucket_prefix(r),
    )
    maker = SelectTasks(maker, task_index)
    splits = time_split(log, cfg.split, after)
    if r.length_bucket and env.is_main and len(splits["train"]):
        first = maker(log, time_order(log, splits["train"])[: cfg.batch_size]).hist_buckets
        print(
            f"length buckets of {r.length_bucket}: the first batch is read in {len(first)} buckets "
            f"(widths {', '.join(str(w) for _, w in first)}), "
            f"{bucket_share(first, r.max_len):.0%} of the steps at --max-len {r.max_len}",
            flush=True,
        )
    return Built(env, log, dmp, maker, splits, tasks)


def read_replica(table: TokenTable, device: torch.device) -> torch.Tensor:
    """The whole token table on ``device`` (``--token-fetch ranges``: every rank holds it all)."""
    need = table_bytes(token_table_config(table.rows, table.dim, table.dtype))
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if need > total // 2:
            raise IatError(
                f"token table {table.path} is {need / 2**30:.1f} GiB, more than half of this GPU's "
                f"{total / 2**30:.0f} GiB: --token-fetch ranges keeps a whole copy on every rank; use sharded_ranges"
            )
    return table.read_rows(0, table.rows).to(device)


def _plan(
    model: Ranker, env: DistEnv, cfg: Stage2Config, stage1_plan: ShardingPlan | None, constraints: dict | None
) -> ShardingPlan | None:
    """Stage-1 plan for the shared feature tables, plus a fresh plan (under ``constraints``) for
    the new tables; None without --stage1 (``shard`` plans the whole model, with --constraints
    and --replicate-rows)."""
    if stage1_plan is None:
        return None
    topology = build_topology(env.world_size, env.local_world_size, env.device.type, hbm_gb=cfg.hbm_gb or None)
    holder = nn.Module()
    if hasattr(model, TOKENS_PATH):
        holder.add_module(TOKENS_PATH, model.tokens)
    new = (
        make_plan(holder, topology, cfg.batch_size, constraints, pg=dist.group.WORLD)
        if len(holder._modules)
        else ShardingPlan({})
    )
    return ShardingPlan({**stage1_plan.plan, **new.plan})


def dataset(built: Built, cfg: Stage2Config, split: str) -> BatchDataset:
    rows = time_order(built.log, built.splits[split])
    return BatchDataset(built.log, rows, cfg.batch_size, built.env.rank, built.env.world_size, make=built.maker)


def test_metrics(built: Built, cfg: Stage2Config) -> dict:
    """Evaluates the test split; the first task's figures are also at the top level."""
    per_task = evaluate(built.model, dataset(built, cfg, "test"), built.env, built.tasks)
    first = per_task[built.tasks[0]]
    return {**{k: first[k] for k in ("auc", "gauc", "logloss", "ne", "n")}, "task": built.tasks[0], "tasks": per_task}


def load_stage2_config(run: str | Path) -> Stage2Config:
    return from_dict(Stage2Config, read_run(run, "rank")["config"], where=str(Path(run) / RUN_INFO))
