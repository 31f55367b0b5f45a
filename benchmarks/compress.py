"""Compress: the stage-1 training step, temporal and user order, in samples (instances) per second.

    iat-rec bench compress [--batch 8192] [--window 64] [--users 2000]

The model is the project's: ``build_compressor`` on a synthetic log, planned and sharded by
``iat_rec.train.trainer.shard`` (fused row-wise Adagrad on the EBC), Adam on the dense part
(``make_optimizer``), stepped by ``TrainPipelineSparseDist`` exactly as the trainer does.
Batches come from the real datasets (``iat_rec.train.stage1.make_dataset``) and are built
before timing (pinned on CUDA) and cycled, so the figure is the GPU step, not the loader
(``iat-rec bench loader`` measures that). Both schemes see the same instances per step:
temporal ``--batch`` instances, user order ``--batch / --window`` windows of ``--window``
(rows past a user's last instance are padding with weight 0; ``valid_fraction`` says how many
rows are real). ``dense_mfu``: forward FLOPs of every ``nn.Linear`` (counted by hooks over
one forward) x 3 / step time / bf16 matmul peak of the same run (``--bf16``: the trainer's ``--bf16``).
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks import common
from iat_rec.data.instance_log import time_split
from iat_rec.tables import TABLE_DTYPES
from iat_rec.train.config import CompressConfig, ModelConfig
from iat_rec.train.stage1 import build_compressor, instances_per_batch, make_dataset, plan_batch, units_per_batch
from iat_rec.train.trainer import make_optimizer, shard


def measure_scheme(
    run: common.Run,
    env,
    log,
    scheme: str,
    instances: int,
    window: int,
    model_cfg: ModelConfig,
    batches: int = 8,
    bf16: bool = False,
    constraints: str = "",
    replicate_rows: int = 0,
    compile: bool = False,
) -> dict[str, Any]:
    """``constraints``: a planner constraints JSON file (TrainConfig.constraints), "" for the planner's choice;
    ``replicate_rows``: tables of at most this many rows data-parallel (TrainConfig.replicate_rows)."""
    cfg = CompressConfig(
        data=str(log.path),
        out=str(run.work / f"run-{scheme}"),
        scheme=scheme,
        window=window,
        batch_size=instances,
        model=model_cfg,
        device=run.device.type,
        constraints=constraints,
        replicate_rows=replicate_rows,
        bf16=bf16,
        compile=compile,
    )
    ds = make_dataset(log, time_split(log, cfg.split)["train"], cfg, env.rank, env.world_size)
    cached = common.cached_batches(ds, batches, run.device)
    valid = sum(float(b.weights.sum()) for b in cached) / sum(b.weights.numel() for b in cached)
    model = build_compressor(log, cfg)
    if cfg.compile:
        model.compile_dense()
    dmp, plan = shard(model, env, cfg, plan_out=None, plan_batch=plan_batch(cfg), bounds_check=False)
    opt = make_optimizer(dmp, cfg)
    flops = common.linear_flops(dmp, cached[0], run.device)
    common.reset_peak_memory(run.device)
    timing, pipelined = common.time_train_pipeline(run, scheme, dmp, opt, cached)
    samples = instances_per_batch(cfg)
    dense_tflops = 3 * flops / (timing.median_ms * 1e-3) / 1e12
    out = common.row(
        scheme,
        timing,
        samples,
        common.peak_memory_bytes(run.device),
        batch_size=units_per_batch(cfg),
        window=window if scheme == "user" else None,
        valid_fraction=valid,
        valid_samples_per_s=samples * valid / (timing.median_ms * 1e-3),
        bf16=bf16,
        compiled=compile,
        dense_flops_fwd=flops,
        dense_tflops=dense_tflops,
        dense_mfu=common.ratio(dense_tflops, run.limits.get("bf16_tflops")),
        pipelined_modules=pipelined,
        plan=sorted(set(common.plan_summary(plan).values())),
        distinct_batches=len(cached),
    )
    del dmp, opt, model, cached
    common.free(run.device)
    return out


def model_config(args) -> ModelConfig:
    m = ModelConfig()
    if args.emb_dim:
        m.emb_dim = args.emb_dim
    if args.hidden:
        m.hidden = args.hidden
    m.table_dtype = args.table_dtype
    return m


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser("compress", __doc__)
    p.add_argument("--batch", type=int, default=None, help="instances per step (default 8192; tiny 64)")
    p.add_argument("--window", type=int, default=None, help="user order: instances per window (default 64; tiny 8)")
    p.add_argument("--users", type=int, default=None, help="synthetic users (default 2000; tiny 60)")
    p.add_argument("--emb-dim", type=int, default=None, help="feature embedding dim (default: ModelConfig's)")
    p.add_argument("--hidden", type=int, default=None, help="the base ranker's hidden width (default: ModelConfig's)")
    p.add_argument("--schemes", default="temporal,user")
    p.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=False, help="the trainer's --bf16 (dense part in bf16)"
    )
    p.add_argument("--table-dtype", default="fp32", choices=sorted(TABLE_DTYPES), help="the feature tables' weights")
    p.add_argument("--replicate-rows", type=int, default=0, help="tables of at most N rows data-parallel (0: planner)")
    p.add_argument("--compile", action="store_true", help="the trainer's --compile (dense part as CUDA graphs)")
    args = p.parse_args(argv)
    with common.bench_run("compress", args, warmup=(2, 10)) as run, common.dist_env(run.device) as env:
        tiny = run.tiny
        instances = common.pick(args.batch, tiny, 64, 8192)
        window = common.pick(args.window, tiny, 8, 64)
        users = common.pick(args.users, tiny, 60, 2000)
        log = common.synth_log(run, "compress", users, 40 if tiny else 100)
        model_cfg = model_config(args)
        schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
        rows = [
            measure_scheme(
                run,
                env,
                log,
                s,
                instances,
                window,
                model_cfg,
                bf16=args.bf16,
                replicate_rows=args.replicate_rows,
                compile=args.compile,
            )
            for s in schemes
        ]
        config = {
            "instances_per_step": instances,
            "window": window,
            "users": users,
            "log_rows": log.rows,
            "model": vars(model_cfg),
            "schemes": schemes,
            "bf16": args.bf16,
            "compile": args.compile,
            "replicate_rows": args.replicate_rows,
            "batches": "cached, pinned, cycled",
        }
        by = {r["case"]: r for r in rows}
        summary = [
            common.summary_item(
                run,
                f"stage-1 {r['case']} samples/s",
                r["samples_per_s"],
                "samples/s",
                "bf16 matmul peak (dense MFU)",
                r["dense_mfu"],
            )
            for r in rows
        ]
        if "temporal" in by and "user" in by:
            summary.append(common.versus(run, "user / temporal samples/s", by, "user", "temporal"))
        columns = common.DEFAULT_COLUMNS + (
            ("valid frac", "valid_fraction", ""),
            ("dense TFLOP/s", "dense_tflops", ""),
            ("dense MFU", "dense_mfu", "pct"),
        )
        common.finish(run, config, rows, summary, columns)
    return 0


if __name__ == "__main__":
    common.main_guard(main)
