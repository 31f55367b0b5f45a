"""Peak memory of ``iat-rec data ingest`` against the number of rows (issue: own data in minutes).

    python -m benchmarks.ingest_memory --rows 1000000 10000000 --work /tmp/ingest --out benchmarks/results/

For each size a Parquet file of an ads-like log (examples/ads/schema.yaml: user, ISO time as
seconds, two labels, seven id features, two dense ones) is written in row groups, then
ingested by ``iat-rec data ingest`` in a child process; its peak resident set size
(the child's own ``ru_maxrss`` from ``os.wait4``) and wall time are recorded.
Ingest reads the file chunk by chunk and keeps only encoded int64/float32 columns, never
Python objects per row; the sort by (user, time) needs every row at once, so the peak grows
with the rows: bytes per row is the figure to read. JSON: ``ingest_memory-cpu.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from iat_rec.dist.env import versions

SCHEMA = Path(__file__).resolve().parent.parent / "examples" / "ads" / "schema.yaml"
GROUP = 1 << 20


def write_log(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` random impressions of 100 rows per user on average, in row groups of 1M."""
    rng = np.random.default_rng(seed)
    users = max(1, rows // 100)
    with pq.ParquetWriter(
        path,
        pa.schema(
            [
                ("user_id", pa.string()),
                ("time", pa.int64()),
                ("ad_id", pa.string()),
                ("campaign", pa.string()),
                ("advertiser", pa.string()),
                ("category", pa.string()),
                ("device", pa.string()),
                ("hour", pa.int64()),
                ("price", pa.float64()),
                ("position", pa.int64()),
                ("click", pa.int64()),
                ("conversion", pa.int64()),
                ("conversion_time", pa.int64()),
            ]
        ),
    ) as w:
        for lo in range(0, rows, GROUP):
            n = min(GROUP, rows - lo)
            t = 1_767_225_600 + np.sort(rng.integers(0, 60 * 86_400, n)) + lo  # distinct enough, increasing by group
            ad = rng.integers(0, 100_000, n)
            conv = rng.random(n) < 0.02
            w.write_table(
                pa.table(
                    {
                        "user_id": pa.array([f"user{u:07d}" for u in rng.integers(0, users, n)]),
                        "time": t,
                        "ad_id": pa.array([f"ad{a}" for a in ad]),
                        "campaign": pa.array([f"camp{a // 1000}" for a in ad]),
                        "advertiser": pa.array([f"adv{a // 10000}" for a in ad]),
                        "category": pa.array(np.array(["shoes", "phones", "books", "travel", "games", "food"])[ad % 6]),
                        "device": pa.array(np.array(["mobile", "desktop", "tablet"])[rng.integers(0, 3, n)]),
                        "hour": (t // 3600) % 24,
                        "price": rng.lognormal(2.0, 1.0, n),
                        "position": rng.integers(1, 11, n),
                        "click": (rng.random(n) < 0.05).astype(np.int64),
                        "conversion": conv.astype(np.int64),
                        "conversion_time": t + np.where(conv, rng.integers(60, 7 * 86_400, n), 0),
                    }
                )
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="benchmarks.ingest_memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--work", required=True, help="scratch directory (input files and logs; removed per size)")
    p.add_argument("--out", default="benchmarks/results", help="directory of the JSON result")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in sorted(args.rows):
        src, log = work / f"log-{rows}.parquet", work / f"log-{rows}"
        if not src.is_file():
            write_log(src, rows)
        start = time.perf_counter()
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "iat_rec.cli",
                "data",
                "ingest",
                "--input",
                str(src),
                "--schema",
                str(SCHEMA),
                "--out",
                str(log),
                "--overwrite",
            ]
        )
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the maximum over every child
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"ingest of {src} failed")
        peak = usage.ru_maxrss * 1024  # KiB on Linux
        row = {
            "rows": rows,
            "input_bytes": src.stat().st_size,
            "seconds": time.perf_counter() - start,
            "peak_rss_bytes": peak,
            "bytes_per_row": peak / rows,
            "log_bytes": sum(f.stat().st_size for f in log.iterdir()),
        }
        results.append(row)
        print(
            f"{rows:>12,} rows: {row['seconds']:.1f} s, peak RSS {peak / 2**30:.2f} GiB "
            f"({row['bytes_per_row']:.0f} B/row), "
            f"input {row['input_bytes'] / 2**20:.0f} MiB, log {row['log_bytes'] / 2**20:.0f} MiB",
            flush=True,
        )
    out = Path(args.out) / "ingest_memory-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "ingest_memory",
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "device": f"CPU: {platform.processor() or platform.machine()}",
                "versions": versions(),
                "command": "python -m benchmarks.ingest_memory " + " ".join(argv if argv is not None else sys.argv[1:]),
                "schema": str(SCHEMA.relative_to(SCHEMA.parent.parent.parent)),
                "rows": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
