"""One day's token refresh against a full re-export, on the synthetic log (issue: day-by-day operation).

    python -m benchmarks.day_refresh --users 10000 --mean-instances 100 --work /tmp/refresh --out benchmarks/results/

The synthetic log is cut before its last day: version 1 holds every earlier day, and
``append_columns`` (what ``iat-rec data append`` runs on a file) writes version 2 with the
last day merged in. Stage 1 trains briefly on version 1 (the refresh's cost does not depend on
how well), then continues on the rows after its training split (``compress --resume-from``).
Timed, each as the user runs it (``iat-rec`` subprocesses, so process start and rank launch
count): the append of the log, the continued stage 1, ``export --append`` (the rows after the
old table's only) and a full ``export`` of the same run (every row), both ``--tokens-from
final``. JSON: ``day_refresh-<device>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from iat_rec.data.ingest import append_columns
from iat_rec.data.instance_log import write_instance_log
from iat_rec.data.synth import SynthConfig, build_columns, synth_schema
from iat_rec.dist.env import versions
from iat_rec.tables import TOKEN_DTYPES

DAY = 86_400


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "iat_rec.cli", *argv], check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="benchmarks.day_refresh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--mean-instances", type=float, default=100.0)
    p.add_argument("--work", required=True, help="scratch directory (logs, runs, tables)")
    p.add_argument("--out", default="benchmarks/results", help="directory of the JSON result")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--stage1-steps", type=int, default=50)
    p.add_argument("--dtype", default="fp16", choices=sorted(TOKEN_DTYPES))
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = SynthConfig(users=args.users, mean_instances=args.mean_instances, seed=0)
    cols, schema = build_columns(cfg, progress=False), synth_schema(cfg)
    cut = (int(cols.ts.max()) // DAY) * DAY  # the last day
    v1 = write_instance_log(work / "v1", schema, cols.take(cols.ts < cut), source="synthetic, every day but the last")
    start = time.perf_counter()
    v2 = append_columns(v1, cols.take(cols.ts >= cut), work / "v2", source="synthetic, the last day")
    seconds = {"data_append": time.perf_counter() - start}
    new = int((np.asarray(v2.segment) == 1).sum())
    # the last day must reach stage 1's training split: train on all but the last 0.2% of time
    split = ["--split", "0.998", "0.999"]
    stage1 = [
        "--scheme",
        "user",
        "--steps",
        str(args.stage1_steps),
        "--eval-batches",
        "2",
        "--no-progress",
        "--nproc",
        str(args.nproc),
        *split,
    ]
    # both exports from the final checkpoint: a like-for-like timing (a continued run's full export
    # may not be time-consistent, as its first model trained on the old rows' labels)
    export = ["--dtype", args.dtype, "--tokens-from", "final", "--no-progress", "--nproc", str(args.nproc)]
    timed(["compress", "--data", str(v1.path), "--out", str(work / "run1"), "--overwrite", *stage1])
    timed(["export", "--stage1", str(work / "run1"), "--out", str(work / "tok1"), "--overwrite", *export])
    seconds["compress_resume_from"] = timed(
        [
            "compress",
            "--data",
            str(v2.path),
            "--out",
            str(work / "run2"),
            "--overwrite",
            "--resume-from",
            str(work / "run1"),
            *stage1,
        ]
    )
    seconds["export_append"] = timed(
        [
            "export",
            "--stage1",
            str(work / "run2"),
            "--append",
            str(work / "tok1"),
            "--out",
            str(work / "tok2"),
            "--overwrite",
            *export,
        ]
    )
    seconds["export_full"] = timed(
        ["export", "--stage1", str(work / "run2"), "--out", str(work / "full"), "--overwrite", *export]
    )
    result = {
        "benchmark": "day_refresh",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU: {platform.processor() or platform.machine()}, {args.nproc} gloo ranks",
        "versions": versions(),
        "config": {**vars(args), "log_rows": v2.rows, "appended_rows": new, "split": split[1:]},
        "seconds": seconds,
        "refresh_vs_full_export": seconds["export_append"] / seconds["export_full"],
    }
    out = Path(args.out) / "day_refresh-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(result["seconds"], indent=2),
        f"\nappended {new:,} of {v2.rows:,} rows; export --append / full export: "
        f"{result['refresh_vs_full_export']:.3f}\n{out}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
