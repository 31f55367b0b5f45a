"""Loader: the CPU data path in samples per second per core, against what the GPU step
consumes (measured in the same run).

    iat-rec bench loader [--batch 8192] [--max-len 256] [--cores N] [--workers W]

Per core: one process, one torch thread, ``EpochLoader(BatchDataset, num_workers=0)`` (the
trainer's loader: StatefulDataLoader with a state snapshot per batch) pulling batches of

* ``stage1_temporal``: ``make_batch`` (KJT of every sparse feature, dense, labels),
* ``stage2_iat``: ``Stage2BatchMaker`` without hand-crafted features (history ranges, label
  and time-gap side info, and the KJT of history ids unless ``--token-fetch`` reads ranges),
* ``stage2_both``: ``Stage2BatchMaker`` with the hand-crafted sequence ids too.

``workers_W`` runs the stage-2 IAT loader with W worker processes (pinned memory on CUDA), to
check that throughput scales with cores. The GPU side is the compress (temporal) and rank
(IAT) steps on cached batches, as ``bench compress`` and ``bench rank`` measure them, same
batch and T, with the rank model flags given here (e.g. ``--token-fetch ranges --compile``).
The target (2x the GPU step) is checked on the W workers' measured rate. Per-core samples/s x
cores (``--cores``, default this host's cores / its GPUs) is reported beside it as a linear
estimate only: worker processes do not scale linearly (benchmarks/NOTES.md 29).
``cores_for_2x`` is the same estimate's core count for the target.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch

from benchmarks import common
from benchmarks import compress as compress_bench
from benchmarks import rank as stage2_bench
from iat_rec.batching.loaders import BatchDataset, EpochLoader, time_order
from iat_rec.data.instance_log import time_split


def time_loader(ds, batches: int, warmup: int, workers: int = 0, pin: bool = False) -> dict[str, float]:
    """Median seconds per batch (one process) or aggregate seconds per batch (workers)."""
    loader = EpochLoader(ds, num_workers=workers, pin_memory=pin)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    times = []
    t0 = time.perf_counter()
    for _ in range(batches):
        t = time.perf_counter()
        next(it)
        times.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    del it, loader
    return {"median_s": statistics.median(times), "mean_s": wall / batches, "batches": batches}


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser("loader", __doc__)
    stage2_bench.add_model_flags(p)
    p.set_defaults(bf16=None)
    p.add_argument("--loader-batches", type=int, default=None, help="timed batches per loader case (default 6; tiny 3)")
    p.add_argument("--cores", type=int, default=None, help="cores per GPU for the ratio (default: cores / GPUs)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes for the workers case (default min(8, cores); tiny 0 = skip)",
    )
    p.add_argument("--no-gpu-step", dest="gpu_step", action="store_false", help="skip measuring the GPU step")
    args = p.parse_args(argv)
    with common.bench_run("loader", args, warmup=(1, 5), iters=(3, 20)) as run, common.dist_env(run.device) as env:
        tiny = run.tiny
        bf16 = run.cuda if args.bf16 is None else args.bf16
        r, m, batch = stage2_bench.configs(args, tiny)
        log = stage2_bench.stage2_log(run, args)
        n = common.pick(args.loader_batches, tiny, 3, 6)
        gpus = torch.cuda.device_count() if run.cuda else 1
        cores = args.cores or max(1, (os.cpu_count() or 1) // max(1, gpus))
        workers = common.pick(args.workers, tiny, 0, min(8, os.cpu_count() or 1))

        token_ids = r.token_fetch == "lookup"
        datasets = {
            "stage1_temporal": BatchDataset(log, time_order(log, time_split(log)["train"]), batch),
            # the batches the GPU step below reads: no token id list where it reads ranges
            **{
                f"stage2_{h}": stage2_bench.stage2_dataset(log, h, batch, r, 0, 1, args.seed, token_ids)
                for h in ("iat", "both")
            },
        }
        rows: list[dict[str, Any]] = []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one core
        try:
            for name, ds in datasets.items():
                t = time_loader(ds, n, warmup=1)
                rows.append(
                    common.row(
                        name,
                        _timing(t),
                        batch,
                        common.peak_memory_bytes(run.device),
                        processes=1,
                        per_core_samples_per_s=batch / t["median_s"],
                    )
                )
        finally:
            torch.set_num_threads(threads)
        if workers > 0:
            t = time_loader(datasets["stage2_iat"], max(n, 2 * workers), warmup=workers, workers=workers, pin=run.cuda)
            agg = batch / t["mean_s"]
            rows.append(
                common.row(
                    f"workers_{workers}",
                    _timing(t, use_mean=True),
                    batch,
                    common.peak_memory_bytes(run.device),
                    processes=workers,
                    per_core_samples_per_s=agg / workers,
                    loader="stage2_iat",
                )
            )

        gpu: dict[str, float | None] = {"stage1_temporal": None, "stage2_iat": None}
        if args.gpu_step:
            s1 = compress_bench.measure_scheme(run, env, log, "temporal", batch, 1, m, bf16=bf16)
            gpu["stage1_temporal"] = s1["samples_per_s"]
            case = stage2_bench.build_case(run, env, log, "iat", r, m, batch, bf16)
            s2 = stage2_bench.measure_case(run, case)
            del case
            common.free(run.device)
            gpu["stage2_iat"] = s2["samples_per_s"]
            rows += [{**s1, "case": "gpu_step_compress_temporal"}, {**s2, "case": "gpu_step_rank_iat"}]
        for x in rows:
            peer = gpu.get(x.get("loader", x["case"]))
            if "per_core_samples_per_s" in x:
                x["gpu_samples_per_s"] = peer
                x["ratio_per_core"] = common.ratio(x["per_core_samples_per_s"], peer)
                x["ratio_cores"] = common.ratio(x["per_core_samples_per_s"] * cores, peer)
                x["cores_for_2x"] = common.ratio(2 * peer, x["per_core_samples_per_s"]) if peer else None
        by = {x["case"]: x for x in rows}
        summary = []
        for name in ("stage1_temporal", "stage2_iat"):  # an estimate: processes do not scale linearly
            x = by[name]
            summary.append(
                common.summary_item(
                    run,
                    f"loader {name}, one core x {cores} (linear estimate)",
                    x["per_core_samples_per_s"] * cores,
                    "samples/s",
                    "GPU step",
                    x["ratio_cores"],
                )
            )
        summary.append(
            common.summary_item(
                run,
                "loader stage2_iat per core",
                by["stage2_iat"]["per_core_samples_per_s"],
                "samples/s",
                "GPU step",
                by["stage2_iat"]["ratio_per_core"],
            )
        )
        if f"workers_{workers}" in by:
            w = by[f"workers_{workers}"]
            summary.append(
                common.summary_item(
                    run,
                    f"loader stage2_iat, {workers} workers",
                    w["samples_per_s"],
                    "samples/s",
                    f"{workers} x one core",
                    common.ratio(w["samples_per_s"], workers * by["stage2_iat"]["per_core_samples_per_s"]),
                )
            )
            # the target (2x the GPU step) on what was measured: the workers' rate, pinned batches included
            summary.append(
                common.summary_item(
                    run,
                    f"loader stage2_iat, {workers} workers, against the GPU step",
                    w["samples_per_s"],
                    "samples/s",
                    "GPU step",
                    common.ratio(w["samples_per_s"], gpu["stage2_iat"]),
                    "loader_vs_gpu",
                )
            )
        config = {
            "batch": batch,
            "max_len": r.max_len,
            "cores": cores,
            "gpus": gpus,
            "workers": workers,
            "loader_batches": n,
            "bf16_gpu_step": bf16,
            "log_rows": log.rows,
            "reader": r.reader,
        }
        columns = common.DEFAULT_COLUMNS + (
            ("per core", "per_core_samples_per_s", ""),
            ("GPU step", "gpu_samples_per_s", ""),
            ("ratio/core", "ratio_per_core", "x"),
            (f"x{cores} cores", "ratio_cores", "x"),
            ("cores for 2x", "cores_for_2x", ""),
        )
        common.finish(run, config, rows, summary, columns)
    return 0


def _timing(t: dict[str, float], use_mean: bool = False) -> common.Timing:
    ms = (t["mean_s"] if use_mean else t["median_s"]) * 1e3
    return common.Timing(ms, t["mean_s"] * 1e3, ms, ms, int(t["batches"]))


if __name__ == "__main__":
    common.main_guard(main)
