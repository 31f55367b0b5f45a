"""Scaling: the stage-1 (compress, temporal) and stage-2 (rank, IAT) training steps on 1, 2, 4, ...
ranks: samples/s, speedup over 1 rank and scaling efficiency per rank count.

    iat-rec bench scaling [--ranks 1,2,4,8] [--stages 1,2] [--batch 8192] [--max-len 256] [--feature-sharding row_wise]

The benchmark launches itself through the elastic agent (``iat_rec.dist.env.launch``, as
``--nproc`` does for the training programs) once per rank count: NCCL on GPUs (rank counts
above the visible GPUs are an error), gloo on CPU. Weak scaling: every rank trains ``--batch``
samples per step (stage 1: instances; stage 2: requests), so the ideal n-rank figure is n x.
Every job gets the same plan *shape*: the token table row-wise (table-wise on CPU, where
TorchRec has no row-wise) and every feature table ``--feature-sharding`` (default row_wise on
GPU, table_wise on CPU); the JSON records the plan types of each job. A job's step time is its
slowest rank's median; samples/s = batch x ranks / step.

``--plan-ranks 8,64`` adds the TorchRec planner's view of rank counts that were not run (nodes
of 8 GPUs with this GPU's HBM): the estimated sparse time per step of the slowest rank, for the
same model and constraints, next to its estimate for the 1-rank job. ``estimated_step_ms`` =
the measured 1-rank step - the planner's 1-rank sparse estimate + its n-rank estimate (the
dense part per rank is unchanged under weak scaling; the dense gradient all-reduce is not in
the planner's model), and ``estimated_efficiency`` = 1-rank step / estimated step.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchrec.distributed.planner.types import ParameterConstraints

from benchmarks import common
from benchmarks import compress as compress_bench
from benchmarks import rank as stage2_bench
from iat_rec.data.instance_log import InstanceLog
from iat_rec.dist.env import drop_flag, init_distributed, launch
from iat_rec.errors import IatError
from iat_rec.sharding.planning import make_plan_with_stats, quiet_planner_logs
from iat_rec.sharding.topology import build_topology
from iat_rec.tables import TOKEN_TABLE
from iat_rec.train.config import CompressConfig
from iat_rec.train.stage1 import build_compressor

STAGES = {1: "stage1_compress_temporal", 2: "stage2_rank_iat"}


def feature_sharding(log, device_type: str, choice: str) -> dict[str, list[str]]:
    """Feature table -> sharding types for --feature-sharding (empty: the planner's choice)."""
    if choice == "auto":
        return {}
    types = (["row_wise"] if device_type == "cuda" else ["table_wise"]) if choice == "default" else [choice]
    return {f"t_{f.name}": types for f in log.schema.sparse}


def scaling_constraints(log, device_type: str, choice: str, stage: int = 2) -> dict[str, ParameterConstraints]:
    """Every job's constraints: the feature tables', and for stage 2 the token table row-wise."""
    out = {
        name: ParameterConstraints(sharding_types=types)
        for name, types in feature_sharding(log, device_type, choice).items()
    }
    if stage == 2:
        out[TOKEN_TABLE] = ParameterConstraints(
            sharding_types=["row_wise"] if device_type == "cuda" else ["table_wise"]
        )
    return out


def measure_stage(run: common.Run, env, log, stage: int, args) -> dict[str, Any]:
    """One stage's step on this rank (the row of benchmarks.compress or benchmarks.rank)."""
    r, m, batch = stage2_bench.configs(args, run.tiny)
    if stage == 1:
        features = feature_sharding(log, env.device.type, args.feature_sharding)
        spec = {name: {"sharding_types": types} for name, types in features.items()}
        constraints = common.write_constraints(run, f"stage1-rank{env.rank}", spec) if spec else ""
        row = compress_bench.measure_scheme(
            run, env, log, "temporal", batch, 1, m, bf16=bool(args.bf16), constraints=constraints
        )
        return {**row, "plan_types": row["plan"]}
    cons = scaling_constraints(log, env.device.type, args.feature_sharding)
    case = stage2_bench.build_case(run, env, log, "iat", r, m, batch, bool(args.bf16), constraints=cons)
    row = stage2_bench.measure_case(run, case)
    del case
    common.free(run.device)
    return {**row, "plan_types": sorted(set(row["plan"].values()))}


def worker(args) -> int:
    """One rank of a launched job: every stage timed, reduced over ranks; rank 0 writes --result."""
    env = init_distributed(args.device)
    try:
        tiny = (env.device.type == "cpu") if args.tiny is None else bool(args.tiny)
        if args.threads or (tiny and env.device.type == "cpu"):
            torch.set_num_threads(args.threads or 1)
        run = common.Run(
            "scaling",
            args,
            env.device,
            tiny,
            common.pick(args.warmup, tiny, 2, 10),
            common.pick(args.iters, tiny, 3, 40),
            Path(args.result).parent,
        )
        if args.bf16 is None:
            args.bf16 = env.device.type == "cuda"
        log = InstanceLog(args.data)
        results = []
        for stage in stages(args):
            torch.manual_seed(args.seed)
            row = measure_stage(run, env, log, stage, args)
            stats = torch.tensor(
                [row["ms_per_step"], float(row["peak_mem_bytes"])], dtype=torch.float64, device=env.device
            )
            per_rank = [torch.zeros_like(stats) for _ in range(env.world_size)]
            dist.all_gather(per_rank, stats)
            per_rank = [t.cpu().tolist() for t in per_rank]
            step_ms = max(p[0] for p in per_rank)
            batch = row["samples_per_step"]
            results.append(
                {
                    "case": f"{STAGES[stage]}/{env.world_size}",
                    "stage": stage,
                    "world_size": env.world_size,
                    "backend": env.backend,
                    "ms_per_step": step_ms,
                    "samples_per_s": batch * env.world_size / (step_ms * 1e-3),
                    "samples_per_step": batch * env.world_size,
                    "per_rank_batch": batch,
                    "peak_mem_bytes": int(max(p[1] for p in per_rank)),
                    "rank_ms_per_step": [p[0] for p in per_rank],
                    "timing": row["timing"],
                    "plan_types": row["plan_types"],
                    "pipelined_modules": row["pipelined_modules"],
                    "bf16": bool(args.bf16),
                }
            )
        if env.is_main:
            Path(args.result).write_text(json.dumps(results))
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def planner_sparse_ms(run: common.Run, log, stage: int, world: int, hbm_gb: float | None) -> float:
    """The planner's estimated sparse time per step (slowest rank) of ``stage`` on ``world`` ranks."""
    args, device_type = run.args, run.device.type
    r, m, batch = stage2_bench.configs(args, run.tiny)
    topology = build_topology(world, min(world, 8), device_type, hbm_gb=hbm_gb)
    cons = scaling_constraints(log, device_type, args.feature_sharding, stage)
    if stage == 1:
        model = build_compressor(log, CompressConfig(data=str(log.path), model=m, device=device_type))
    else:
        model = stage2_bench.build_model(log, dataclasses.replace(r, history="iat"), m)
    with quiet_planner_logs():
        result = make_plan_with_stats(model, topology, batch, cons, debug=False)
    return float(result.perf_ms)


def planner_rows(run: common.Run, log, measured: list[dict[str, Any]], worlds: list[int]) -> list[dict[str, Any]]:
    hbm_gb = torch.cuda.get_device_properties(run.device).total_memory / 1e9 if run.cuda else None
    out = []
    for stage in sorted({x["stage"] for x in measured}):
        one = next(x for x in measured if x["stage"] == stage and x["world_size"] == 1)
        base = planner_sparse_ms(run, log, stage, 1, hbm_gb)
        for world in worlds:
            est = planner_sparse_ms(run, log, stage, world, hbm_gb)
            step = one["ms_per_step"] - base + est
            out.append(
                {
                    "case": f"{STAGES[stage]}/{world} (planner)",
                    "stage": stage,
                    "world_size": world,
                    "planner_sparse_ms": est,
                    "planner_sparse_ms_1_rank": base,
                    "estimated_step_ms": step,
                    "estimated_efficiency": common.ratio(one["ms_per_step"], step),
                }
            )
    return out


def stages(args) -> list[int]:
    out = [int(x) for x in str(args.stages).split(",") if x.strip()]
    if not out or any(s not in STAGES for s in out):
        raise IatError(f"--stages: a comma list of 1 and 2, not {args.stages!r}")
    return out


def rank_counts(args, cuda: bool) -> list[int]:
    counts = sorted({int(x) for x in str(args.ranks).split(",") if x.strip()})
    if not counts or counts[0] < 1:
        raise IatError(f"--ranks: a comma list of positive rank counts, not {args.ranks!r}")
    if cuda and counts[-1] > torch.cuda.device_count():
        raise IatError(
            f"--ranks {args.ranks}: {counts[-1]} ranks need {counts[-1]} GPUs; torch sees {torch.cuda.device_count()}"
        )
    return counts


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = common.base_parser("scaling", __doc__)
    stage2_bench.add_model_flags(p)
    p.set_defaults(bf16=None)
    p.add_argument("--ranks", default="1,2", help="comma list of rank counts (default 1,2); 1 is the baseline")
    p.add_argument(
        "--stages", default="1,2", help="comma list: 1 = stage-1 compress (temporal), 2 = stage-2 rank (IAT)"
    )
    p.add_argument(
        "--feature-sharding",
        default="default",
        choices=["default", "auto", "row_wise", "table_wise", "data_parallel"],
        help="feature tables' sharding in every job (default: row_wise on GPU, table_wise on CPU; auto: planner)",
    )
    p.add_argument(
        "--plan-ranks", default="8,64", help="rank counts for the planner's estimate only (default 8,64; '' for none)"
    )
    p.add_argument("--worker", action="store_true", help=argparse_hidden())
    p.add_argument("--data", help=argparse_hidden())
    p.add_argument("--result", help=argparse_hidden())
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    with common.bench_run("scaling", args, warmup=(2, 10), iters=(3, 40)) as run:
        counts = rank_counts(args, run.cuda)
        wanted = stages(args)
        if counts[0] != 1:
            counts = [1, *counts]
        log = stage2_bench.stage2_log(run, args)
        child = drop_flag(drop_flag(argv, "--out"), "--work")
        rows: list[dict[str, Any]] = []
        for n in counts:
            path = run.work / f"scaling-{n}.json"
            path.unlink(missing_ok=True)
            print(f"[scaling] {n} rank(s) ...", flush=True)
            code = launch("benchmarks.scaling", [*child, "--worker", "--data", str(log.path), "--result", str(path)], n)
            if code != 0 or not path.is_file():
                raise IatError(f"scaling: the {n}-rank job failed (exit code {code}); its error is printed above")
            rows += json.loads(path.read_text())
        summary = []
        same_plan = True
        for stage in wanted:
            mine = [x for x in rows if x["stage"] == stage]
            base = mine[0]["samples_per_s"]
            for x in mine:
                x["speedup_vs_1"] = common.ratio(x["samples_per_s"], base)
                x["efficiency"] = x["speedup_vs_1"] / x["world_size"]
            same_plan &= all(x["plan_types"] == mine[0]["plan_types"] for x in mine)
            for x in mine[1:]:
                n = x["world_size"]
                key = (
                    "scaling_2gpu"
                    if (stage == 2 and n == 2)
                    else ("scaling_eff_8gpu" if (stage == 2 and n == 8) else None)
                )
                summary.append(
                    common.summary_item(
                        run,
                        f"stage {stage}: {n} / 1 rank samples/s",
                        x["samples_per_s"],
                        "samples/s",
                        "1 rank",
                        x["speedup_vs_1"] if key != "scaling_eff_8gpu" else x["efficiency"],
                        key,
                    )
                )
        worlds = [int(x) for x in str(args.plan_ranks).split(",") if x.strip()]
        estimates = planner_rows(run, log, rows, worlds) if worlds else []
        for x in estimates:
            if x["stage"] == 2 and x["world_size"] == 8:
                summary.append(
                    common.summary_item(
                        run,
                        "stage 2: 8 ranks, planner-estimated efficiency",
                        x["estimated_step_ms"],
                        "ms/step",
                        "1 rank (measured)",
                        x["estimated_efficiency"],
                    )
                )
        r, _, batch = stage2_bench.configs(args, run.tiny)
        config = {
            "ranks": counts,
            "plan_ranks": worlds,
            "planner_estimates": estimates,
            "stages": wanted,
            "per_rank_batch": batch,
            "max_len": r.max_len,
            "reader": r.reader,
            "stage2_history": "iat",
            "stage1_scheme": "temporal",
            "feature_sharding": args.feature_sharding,
            "backend": rows[0]["backend"],
            "bf16": rows[0]["bf16"],
            "same_plan_types": same_plan,
            "log_rows": log.rows,
            "scaling": "weak (fixed per-rank batch)",
        }
        columns = common.DEFAULT_COLUMNS + (("speedup", "speedup_vs_1", "x"), ("efficiency", "efficiency", "pct"))
        common.finish(
            run, config, rows, summary, columns, notes=[] if same_plan else ["the jobs' plans differ in sharding types"]
        )
    return 0


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    common.main_guard(main)
