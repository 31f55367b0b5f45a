"""Rank: the stage-2 training step in samples (requests) per second and the reader's MFU;
IAT against the hand-crafted sequence at the same history length T, in the same run.

    iat-rec bench rank [--bf16] [--batch 8192] [--max-len 256] [--reader transformer] [--history iat,handcrafted]

The model is the project's ``Ranker`` built directly (as ``iat_rec.train.stage2.build`` does) over a
synthetic log, with a synthetic token table (rows = the log's instances, randomly
initialised by TorchRec, frozen, planned row-wise on GPU like the export's): the planner,
``shard`` (fused optimizer on every table but the token table), ``make_optimizer`` and
``TrainPipelineSparseDist``. Batches come from the real ``Stage2BatchMaker`` over the log's
history index (requests drawn at random from the train split), built before timing (pinned
on CUDA) and cycled. The model's own options: ``--bf16`` runs the dense part (history branches
included) under bf16 autocast, ``--compile`` compiles the branches and the dense modules around
them, ``--pack-history`` runs the reader's position-wise layers on the valid steps only,
``--token-fetch ranges`` reads the token table by row ranges from a replicated copy
(``modules.range_gather``) instead of TorchRec's lookup.

Reader MFU = reader_flops(kind, B, T, dim, ...) x branches x 3 (forward + backward) / step
time / bf16 matmul peak measured in the same run (the step includes everything else, so this
is the reader's share of the step against the whole device). ``reader_only`` times the same
reader alone (forward + backward on [B, T, dim] inputs, masks of the real batches): the
ceiling the full step could reach. ``dense_mfu`` counts every ``nn.Linear`` of the model
instead (hooks over one forward; attention scores not counted): the whole step's MFU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.planner.types import ParameterConstraints

from benchmarks import common
from iat_rec.batching.loaders import BatchDataset
from iat_rec.batching.stage2_data import HistorySource, Stage2BatchMaker
from iat_rec.data.instance_log import time_split
from iat_rec.sharding.planning import make_plan
from iat_rec.sharding.topology import build_topology
from iat_rec.tokens.table import token_constraints
from iat_rec.train.config import ModelConfig, TrainConfig
from iat_rec.train.trainer import make_optimizer, shard
from modules.ranker import READERS, TOKEN_FETCHES, Ranker, RankerConfig, bucket_prefix, build_ranker
from modules.readers import make_reader, reader_flops


def reader_kwargs(r: RankerConfig) -> dict[str, Any]:
    """The reader's constructor arguments, as HistoryBranch passes them."""
    return {} if r.reader == "din" else {"layers": r.reader_layers, "heads": r.reader_heads, "max_len": r.max_len + 1}


def branches(history: str) -> int:
    return {"none": 0, "labels": 1, "iat": 1, "handcrafted": 1, "both": 2}[history]


def step_reader_flops(r: RankerConfig, m: ModelConfig, batches: list) -> float:
    """Forward FLOPs the readers execute in one step, averaged over ``batches``: every branch
    reads T steps, or each length bucket its own width (``hist_buckets``), or packed, its
    valid steps (``hist_steps``) in the layers that treat tokens alone."""
    if branches(r.history) == 0:
        return 0.0
    kw = reader_kwargs(r)
    total = 0.0
    for b in batches:
        start, buckets = 0, b.hist_buckets or ((len(b.ids), r.max_len),)
        steps = b.hist_steps if r.pack_history else None
        for end, width in buckets:
            total += reader_flops(r.reader, end - start, width, r.reader_dim, m.group_dim, steps, **kw)
            start = end
    return branches(r.history) * total / len(batches)


def stage2_dataset(
    log, history: str, batch: int, r: RankerConfig, rank: int, world: int, seed: int, token_ids: bool = True
) -> BatchDataset:
    """The training batches of ranker ``r`` (its T and length buckets), as stage 2 makes them."""
    seq = list(log.schema.sequence) if history in ("handcrafted", "both") else []
    maker = Stage2BatchMaker(
        HistorySource.from_log(log, seq),
        r.max_len,
        same_log=True,
        token_ids=token_ids,
        length_bucket=r.length_bucket,
        bucket_prefix=bucket_prefix(r),
    )
    return BatchDataset(log, time_split(log)["train"], batch, rank, world, shuffle=True, seed=seed, make=maker)


@dataclasses.dataclass
class Stage2Case:
    name: str
    model: nn.Module  # DistributedModelParallel
    optimizer: Any
    batches: list
    batch: int
    ranker: RankerConfig
    model_cfg: ModelConfig
    plan: dict[str, str]
    mean_len: float


def build_model(log, r: RankerConfig, model_cfg: ModelConfig, token_dim: int = 64, token_dtype: str = "fp16") -> Ranker:
    """The unsharded ranker for ``r.history`` (embedding tables on the meta device): the
    pipeline's own factory, with a token table of the log's rows (random, frozen)."""
    return build_ranker(
        log.schema,
        model_cfg,
        r,
        len(log.schema.labels),
        token_rows=log.rows,
        token_dim=token_dim,
        token_dtype=token_dtype,
    )


def model_constraints(
    model: Ranker, device_type: str, extra: dict[str, ParameterConstraints] | None
) -> dict[str, ParameterConstraints]:
    """The export's token-table constraints (if the model has the table) updated by ``extra``."""
    cons = dict(token_constraints(device_type)) if hasattr(model, "tokens") else {}
    cons.update(extra or {})
    return cons


def build_case(
    run: common.Run,
    env,
    log,
    history: str,
    ranker: RankerConfig,
    model_cfg: ModelConfig,
    batch: int,
    bf16: bool,
    token_dim: int = 64,
    token_dtype: str = "fp16",
    batches: int = 4,
    constraints: dict[str, ParameterConstraints] | None = None,
) -> Stage2Case:
    """The sharded ranker for ``history``, its optimizer and cached batches. ``bf16``: the
    ranker's own bf16 history branches (``RankerConfig.bf16``), as a training run has them."""
    r = dataclasses.replace(ranker, history=history, bf16=bf16)
    ranker_model = build_model(log, r, model_cfg, token_dim, token_dtype)
    model: nn.Module = ranker_model
    topology = build_topology(env.world_size, env.local_world_size, run.device.type)
    plan = make_plan(
        model, topology, batch, model_constraints(ranker_model, run.device.type, constraints), pg=dist.group.WORLD
    )
    cfg = TrainConfig(batch_size=batch, device=run.device.type)
    dmp, _ = shard(model, env, cfg, plan_out=None, plan=plan, bounds_check=False)
    ranges = hasattr(ranker_model, "token_rows")
    if ranges:  # the replicated table of --token-fetch ranges: random rows, as the lookup's
        rows = torch.empty(log.rows, token_dim, device=run.device).uniform_(-1, 1)
        ranker_model.token_rows.load(rows)
    ds = stage2_dataset(log, history, batch, r, env.rank, env.world_size, run.args.seed, token_ids=not ranges)
    cached = common.cached_batches(ds, batches, run.device)
    mean_len = float(np.mean([b.hist_valid.float().sum(1).mean().item() for b in cached]))
    return Stage2Case(
        history,
        dmp,
        make_optimizer(dmp, cfg),
        cached,
        batch,
        r,
        model_cfg,
        common.plan_summary(plan),
        mean_len,
    )


def measure_case(run: common.Run, case: Stage2Case) -> dict[str, Any]:
    dense = common.linear_flops(case.model, case.batches[0], run.device)
    common.reset_peak_memory(run.device)
    timing, pipelined = common.time_train_pipeline(run, case.name, case.model, case.optimizer, case.batches)
    flops = step_reader_flops(case.ranker, case.model_cfg, case.batches)
    step_s = timing.median_ms * 1e-3
    reader_tflops = 3 * flops / step_s / 1e12 if flops else None
    return common.row(
        case.name,
        timing,
        case.batch,
        common.peak_memory_bytes(run.device),
        history=case.name,
        reader=case.ranker.reader,
        max_len=case.ranker.max_len,
        mean_history_len=case.mean_len,
        reader_flops_fwd=flops,
        reader_tflops=reader_tflops,
        reader_mfu=common.ratio(reader_tflops, run.limits.get("bf16_tflops")),
        dense_flops_fwd=dense,
        dense_mfu=common.ratio(3 * dense / step_s / 1e12, run.limits.get("bf16_tflops")),
        pipelined_modules=pipelined,
        plan=case.plan,
    )


def measure_reader_only(
    run: common.Run, r: RankerConfig, m: ModelConfig, batch: int, bf16: bool, valid: torch.Tensor
) -> dict[str, Any]:
    """The reader alone, forward + backward, with the real batches' validity masks."""
    dev = run.device
    reader = make_reader(r.reader, r.reader_dim, m.group_dim, **reader_kwargs(r)).to(dev)
    run_reader = torch.compile(reader) if run.args.compile else reader
    seq = torch.randn(batch, r.max_len, r.reader_dim, device=dev, requires_grad=True)
    query = torch.randn(batch, r.reader_dim, device=dev, requires_grad=True)
    valid = valid.to(dev)

    def step() -> None:
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16):
            out = run_reader(seq, valid, query)
        out.float().sum().backward()
        reader.zero_grad(set_to_none=True)
        seq.grad = query.grad = None

    common.reset_peak_memory(dev)
    t = common.time_fn(step, dev, run.warmup, run.iters)
    common.profile_case(run, "reader_only", step)
    flops = reader_flops(r.reader, batch, r.max_len, r.reader_dim, m.group_dim, **reader_kwargs(r))
    tflops = 3 * flops / (t.median_ms * 1e-3) / 1e12
    out = common.row(
        "reader_only",
        t,
        batch,
        common.peak_memory_bytes(dev),
        history="-",
        reader=r.reader,
        max_len=r.max_len,
        reader_flops_fwd=flops,
        reader_tflops=tflops,
        reader_mfu=common.ratio(tflops, run.limits.get("bf16_tflops")),
    )
    reader = seq = query = None  # step() holds them: release before free()
    common.free(dev)
    return out


def add_model_flags(p) -> None:
    p.add_argument("--batch", type=int, default=None, help="requests per step B (default 8192; tiny 32)")
    p.add_argument("--max-len", type=int, default=None, help="history length T (default 256; tiny 16)")
    p.add_argument("--reader", default="transformer", choices=list(READERS))
    p.add_argument("--reader-dim", type=int, default=None, help="default: RankerConfig's (64)")
    p.add_argument("--reader-layers", type=int, default=None, help="default: RankerConfig's (2)")
    p.add_argument("--reader-heads", type=int, default=None, help="default: RankerConfig's (2)")
    p.add_argument(
        "--token-fetch", default="lookup", choices=list(TOKEN_FETCHES), help="the ranker's token fetch (RankerConfig)"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the history branches (and reader_only)")
    p.add_argument("--bf16", action=argparse_bool(), default=False, help="the dense part in bf16 autocast")
    p.add_argument(
        "--pre-project", action=argparse_bool(), default=False, help="side-info tables added after the projection"
    )
    p.add_argument(
        "--length-bucket", type=int, default=0, help="read histories in buckets of lengths rounded up to this (0: at T)"
    )
    p.add_argument(
        "--pack-history",
        action=argparse_bool(),
        default=False,
        help="the transformer's position-wise layers on the valid steps only",
    )
    p.add_argument("--users", type=int, default=None, help="synthetic users (default 3000; tiny 60)")
    p.add_argument("--mean-instances", type=float, default=None, help="per user (default 300; tiny 40)")


def argparse_bool():
    import argparse

    return argparse.BooleanOptionalAction


def configs(args, tiny: bool) -> tuple[RankerConfig, ModelConfig, int]:
    r = RankerConfig(
        reader=args.reader,
        max_len=common.pick(args.max_len, tiny, 16, 256),
        token_fetch=args.token_fetch,
        compile=args.compile,
        pre_project=args.pre_project,
        length_bucket=args.length_bucket,
        pack_history=args.pack_history,
    )
    if args.reader_dim:
        r.reader_dim = args.reader_dim
    if args.reader_layers:
        r.reader_layers = args.reader_layers
    if args.reader_heads:
        r.reader_heads = args.reader_heads
    if tiny:
        r.head = (32,)
    m = ModelConfig() if not tiny else ModelConfig(emb_dim=8, hidden=64)
    return r, m, common.pick(args.batch, tiny, 32, 8192)


def stage2_log(run: common.Run, args):
    return common.synth_log(
        run, "rank", common.pick(args.users, run.tiny, 60, 3000), common.pick(args.mean_instances, run.tiny, 40, 300)
    )


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser("rank", __doc__)
    add_model_flags(p)
    p.add_argument("--history", default="iat,handcrafted", help="comma list of none, iat, handcrafted, both")
    p.add_argument("--no-reader-only", dest="reader_only", action="store_false", help="skip the reader-alone case")
    args = p.parse_args(argv)
    with common.bench_run("rank", args, warmup=(2, 10), iters=(3, 40)) as run, common.dist_env(run.device) as env:
        r, m, batch = configs(args, run.tiny)
        log = stage2_log(run, args)
        histories = [h.strip() for h in args.history.split(",") if h.strip()]
        rows = []
        valid = None
        for h in histories:
            case = build_case(run, env, log, h, r, m, batch, args.bf16)
            rows.append(measure_case(run, case))
            valid = case.batches[0].hist_valid
            del case
            common.free(run.device)
        if args.reader_only and valid is not None:
            rows.append(measure_reader_only(run, r, m, batch, args.bf16, valid))
        by = {x["case"]: x for x in rows}
        summary = []
        for x in rows:
            if x.get("reader_mfu") is not None:
                summary.append(
                    common.summary_item(
                        run,
                        f"reader MFU ({x['case']}, {r.reader})",
                        x["reader_mfu"],
                        "MFU",
                        "bf16 matmul peak",
                        x["reader_mfu"],
                        "reader_mfu" if args.bf16 and x["case"] != "reader_only" else None,
                    )
                )
        for x in rows:
            if x["case"] != "reader_only":
                summary.append(
                    common.summary_item(
                        run,
                        f"stage-2 {x['case']} samples/s",
                        x["samples_per_s"],
                        "samples/s",
                        "bf16 matmul peak (dense MFU)",
                        x["dense_mfu"],
                    )
                )
        if "iat" in by and "handcrafted" in by:
            summary.append(common.versus(run, "IAT / hand-crafted samples/s", by, "iat", "handcrafted"))
        config = {
            "batch": batch,
            "max_len": r.max_len,
            "reader": r.reader,
            "ranker": dataclasses.asdict(r),
            "model": dataclasses.asdict(m),
            "bf16": args.bf16,
            "compile": args.compile,
            "token_fetch": r.token_fetch,
            "histories": histories,
            "log_rows": log.rows,
            "token_table": {"rows": log.rows, "dim": 64, "dtype": "fp16"},
            "batches": "Stage2BatchMaker, train-split requests shuffled; cached, pinned, cycled",
        }
        columns = common.DEFAULT_COLUMNS + (
            ("mean len", "mean_history_len", ""),
            ("reader TFLOP/s", "reader_tflops", ""),
            ("reader MFU", "reader_mfu", "pct"),
            ("dense MFU", "dense_mfu", "pct"),
        )
        common.finish(run, config, rows, summary, columns)
    return 0


if __name__ == "__main__":
    common.main_guard(main)
