"""Summary statistics of an instance log: ``iat-rec data stats DIR [--json]``."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

import numpy as np

from iat_rec.data.instance_log import InstanceLog

QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}


def _iso(t: int) -> str:
    return dt.datetime.fromtimestamp(int(t), dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _distinct_items(log: InstanceLog) -> int | None:
    """Distinct ids of the sequence's first feature (the item), None without a sequence."""
    if not log.schema.sequence:
        return None
    ids = log.sparse[log.schema.sequence[0]]
    values = ids[0] if isinstance(ids, tuple) else ids
    return int(np.count_nonzero(np.bincount(np.asarray(values), minlength=1)))


def log_stats(log: InstanceLog) -> dict:
    """rows, users, items, history lengths, per-task label rates and delays, time range."""
    lengths = np.diff(np.asarray(log.user_offsets))
    ts = np.asarray(log.ts)
    labels = np.asarray(log.labels)
    delay = np.asarray(log.label_time) - ts[:, None]
    tasks = {}
    for k, name in enumerate(log.schema.task_names):
        tasks[name] = {
            "rate": float(labels[:, k].mean()),
            "positives": int(labels[:, k].sum()),
            "label_delay_s_p50": float(np.median(delay[:, k])),
            "label_delay_s_max": int(delay[:, k].max()),
        }
    t0, t1 = int(ts.min()), int(ts.max())
    return {
        "path": str(log.path),
        "fingerprint": log.fingerprint,
        "rows": int(log.rows),
        "users": int(log.users),
        "items": _distinct_items(log),
        "item_feature": log.schema.sequence[0] if log.schema.sequence else None,
        "sparse_features": len(log.schema.sparse),
        "dense_features": len(log.schema.dense),
        "history_length": {
            "min": int(lengths.min()),
            **{k: float(np.quantile(lengths, q)) for k, q in QUANTILES.items()},
            "max": int(lengths.max()),
            "mean": float(lengths.mean()),
        },
        "tasks": tasks,
        # rows sharing their timestamp with the previous row of the same user
        "tied_timestamps": int(np.count_nonzero((np.diff(ts) == 0) & (np.diff(np.asarray(log.user)) == 0))),
        "time_range": {"min": t0, "max": t1, "min_utc": _iso(t0), "max_utc": _iso(t1), "days": (t1 - t0) / 86_400},
    }


def format_stats(s: dict) -> str:
    h = s["history_length"]
    rows = [
        ("log", s["path"]),
        ("fingerprint", s["fingerprint"]),
        ("rows", f"{s['rows']:,}"),
        ("users", f"{s['users']:,}"),
        (f"items ({s['item_feature']})", "-" if s["items"] is None else f"{s['items']:,}"),
        ("features", f"{s['sparse_features']} sparse, {s['dense_features']} dense"),
        (
            "history length",
            " ".join(f"{k} {h[k]:,.0f}" for k in ("min", "p50", "p90", "p99", "max")) + f"  mean {h['mean']:,.1f}",
        ),
    ]
    for name, t in s["tasks"].items():
        rows.append(
            (
                f"task {name}",
                f"rate {t['rate']:.4f} ({t['positives']:,} positive), "
                f"label delay p50 {t['label_delay_s_p50']:,.0f}s max {t['label_delay_s_max']:,}s",
            )
        )
    tr = s["time_range"]
    rows.append(("time range", f"{tr['min_utc']} .. {tr['max_utc']} ({tr['days']:.1f} days)"))
    rows.append(("tied timestamps", f"{s['tied_timestamps']:,} rows"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cli(argv: list[str]) -> int:
    """``iat-rec data stats DIR [--json] [--verify]``"""
    p = argparse.ArgumentParser(prog="iat-rec data stats", description="Summarise an instance log.")
    p.add_argument("log", help="instance-log directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--verify",
        action="store_true",
        help="first check every file against the manifest (size, checksum) and the content fingerprint",
    )
    a = p.parse_args(argv)
    log = InstanceLog(a.log)
    if a.verify:
        log.verify()
        print(f"verified: {len(log.manifest['files'])} files, fingerprint {log.fingerprint}", file=sys.stderr)
    s = log_stats(log)
    print(json.dumps(s, indent=2) if a.json else format_stats(s))
    return 0
