"""Scaling: the stage-2 (IAT) training step on 1 and then 2 ranks, samples/s ratio.

    iat-rec bench scaling [--batch 8192] [--max-len 256] [--feature-sharding row_wise]

The benchmark launches itself through the elastic agent (``iat_rec.distenv.launch``, as
``--nproc`` does for the training programs) on 1 and then 2 local ranks: NCCL on GPUs (needs
2 visible GPUs), gloo on CPU. Weak scaling: every rank trains ``--batch`` requests per step,
so the ideal 2-rank figure is 2x. Both jobs get the same plan *shape*: the token table
row-wise (table-wise on CPU, where TorchRec has no row-wise) and every feature table
``--feature-sharding`` (default row_wise on GPU, table_wise on CPU); the JSON records both
plans. A job's step time is the slowest rank's median; samples/s = batch x ranks / step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchrec.distributed.planner.types import ParameterConstraints

from benchmarks import common
from benchmarks import rank as rank_bench
from iat_rec.distenv import drop_flag, init_distributed, launch
from iat_rec.errors import IatError
from iat_rec.instance_log import InstanceLog
from iat_rec.planning import TOKEN_TABLE


def scaling_constraints(log, device_type: str, feature_sharding: str) -> dict[str, ParameterConstraints]:
    token = ["row_wise"] if device_type == "cuda" else ["table_wise"]
    if feature_sharding == "auto":
        features = None
    elif feature_sharding == "default":
        features = ["row_wise"] if device_type == "cuda" else ["table_wise"]
    else:
        features = [feature_sharding]
    out = {TOKEN_TABLE: ParameterConstraints(sharding_types=token)}
    if features:
        out.update({f"t_{f.name}": ParameterConstraints(sharding_types=features) for f in log.schema.sparse})
    return out


def worker(args) -> int:
    """One rank of a launched job: build, time, reduce over ranks, rank 0 writes --result."""
    env = init_distributed(args.device)
    try:
        tiny = (env.device.type == "cpu") if args.tiny is None else bool(args.tiny)
        if args.threads or (tiny and env.device.type == "cpu"):
            torch.set_num_threads(args.threads or 1)
        run = common.Run("scaling", args, env.device, tiny, common.pick(args.warmup, tiny, 2, 10),
                         common.pick(args.iters, tiny, 3, 40), Path(args.result).parent)
        torch.manual_seed(args.seed)
        r, m, batch = rank_bench.configs(args, tiny)
        bf16 = env.device.type == "cuda" if args.bf16 is None else args.bf16
        log = InstanceLog(args.data)
        cons = scaling_constraints(log, env.device.type, args.feature_sharding)
        case = rank_bench.build_case(run, env, log, "iat", r, m, batch, bf16, constraints=cons)
        row = rank_bench.measure_case(run, case)
        stats = torch.tensor([row["ms_per_step"], float(row["peak_mem_bytes"]), row["mean_history_len"]],
                             dtype=torch.float64, device=env.device)
        per_rank = [torch.zeros_like(stats) for _ in range(env.world_size)]
        dist.all_gather(per_rank, stats)
        per_rank = [t.cpu().tolist() for t in per_rank]
        if env.is_main:
            step_ms = max(p[0] for p in per_rank)
            result = {
                "case": f"{env.world_size}_rank" + ("s" if env.world_size > 1 else ""),
                "world_size": env.world_size,
                "backend": env.backend,
                "ms_per_step": step_ms,
                "samples_per_s": batch * env.world_size / (step_ms * 1e-3),
                "samples_per_step": batch * env.world_size,
                "per_rank_batch": batch,
                "peak_mem_bytes": int(max(p[1] for p in per_rank)),
                "rank_ms_per_step": [p[0] for p in per_rank],
                "mean_history_len": sum(p[2] for p in per_rank) / len(per_rank),
                "timing": row["timing"],
                "plan": case.plan,
                "plan_types": sorted(set(case.plan.values())),
                "pipelined_modules": row["pipelined_modules"],
                "bf16": bf16,
            }
            Path(args.result).write_text(json.dumps(result))
        del case
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = common.base_parser("scaling", __doc__)
    rank_bench.add_model_flags(p)
    p.set_defaults(bf16=None)
    p.add_argument("--feature-sharding", default="default",
                   choices=["default", "auto", "row_wise", "table_wise", "data_parallel"],
                   help="feature tables' sharding on both jobs (default: row_wise on GPU, table_wise on CPU; auto: planner)")
    p.add_argument("--worker", action="store_true", help=argparse_hidden())
    p.add_argument("--data", help=argparse_hidden())
    p.add_argument("--result", help=argparse_hidden())
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    with common.bench_run("scaling", args, warmup=(2, 10), iters=(3, 40)) as run:
        if run.cuda and torch.cuda.device_count() < 2:
            raise IatError(f"scaling needs 2 GPUs; torch sees {torch.cuda.device_count()}")
        log = rank_bench.rank_log(run, args)
        child = drop_flag(drop_flag(argv, "--out"), "--work")
        results: dict[int, dict[str, Any]] = {}
        for n in (1, 2):
            path = run.work / f"scaling-{n}.json"
            path.unlink(missing_ok=True)
            print(f"[scaling] {n} rank(s) ...", flush=True)
            code = launch("benchmarks.scaling", [*child, "--worker", "--data", str(log.path), "--result", str(path)], n)
            if code != 0 or not path.is_file():
                raise IatError(f"scaling: the {n}-rank job failed (exit code {code}); its error is printed above")
            results[n] = json.loads(path.read_text())
        one, two = results[1], results[2]
        speedup = common.ratio(two["samples_per_s"], one["samples_per_s"])
        same_plan = one["plan_types"] == two["plan_types"]
        for x in (one, two):
            x["speedup_vs_1"] = common.ratio(x["samples_per_s"], one["samples_per_s"])
            x["efficiency"] = x["speedup_vs_1"] / x["world_size"]
        r, _, batch = rank_bench.configs(args, run.tiny)
        config = {"per_rank_batch": batch, "max_len": r.max_len, "reader": r.reader, "history": "iat",
                  "feature_sharding": args.feature_sharding, "backend": one["backend"], "bf16": one["bf16"],
                  "same_plan_types": same_plan, "log_rows": log.rows, "scaling": "weak (fixed per-rank batch)"}
        summary = [common.summary_item(run, "2 / 1 rank samples/s", two["samples_per_s"], "samples/s", "1 rank", speedup,
                                       "scaling_2gpu")]
        columns = common.DEFAULT_COLUMNS + (("speedup", "speedup_vs_1", "x"), ("efficiency", "efficiency", "pct"))
        common.finish(run, config, [one, two], summary, columns,
                      notes=[] if same_plan else ["the 1- and 2-rank plans differ in sharding types"])
    return 0


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    common.main_guard(main)
