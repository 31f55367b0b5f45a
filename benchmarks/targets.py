"""Targets: the throughput targets of one device, side by side, from the benchmark JSONs of one run.

    python -m benchmarks.targets DIR --command "..." [--out benchmarks/results/]

DIR holds the JSONs that ``benchmarks/gpu_targets.sh`` writes in one device call (``fetch``,
``rank-*``, ``compress-*``). Each metric names the file, case and field it comes from; a
metric whose benchmark did not run (or is not measured yet) is ``null`` with the reason, so a
missed or missing target is never hidden. Writes ``targets-<device>.json``:
``{"device", "command", "metrics": {key: value}, "targets", "met", "sources", "missing"}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# key -> (file stem in DIR, case, field, target, what the target asks)
METRICS: dict[str, tuple[str, str, str, float, str]] = {
    "fetch_copy_ratio_model_path": (
        "fetch",
        "model_ranges",
        "copy_ratio",
        0.85,
        "token fetch in the model's path (--token-fetch ranges) >= 0.85 of copy bandwidth",
    ),
    # the fastest stage-2 configuration whose quality was checked (results/quality/packed.md)
    "stage2_samples_per_s": (
        "rank-packed",
        "iat",
        "samples_per_s",
        300_000,
        "stage 2 at T 256, d 64, batch 8192: >= 300k samples/s per GPU",
    ),
    "reader_mfu_d64": ("rank-packed", "iat", "reader_mfu", 0.10, "reader MFU in the step >= 10% at d 64"),
    "reader_mfu_d128": ("rank-d128", "iat", "reader_mfu", 0.20, "reader MFU in the step >= 20% at d 128"),
    # at stage 1's fast batch (compress-fast: 32768) with 4x the rows, so rows repeat no more
    # than at 8192 (NOTES 3 and 36; the 8192 step: tbe.json)
    "tbe_copy_ratio_in_step": (
        "tbe-batch32k",
        "wide/pipelined_step",
        "copy_ratio",
        0.50,
        "TBE (wide tables) inside the pipelined training step >= 0.50 of copy",
    ),
    "stage1_temporal_samples_per_s": (
        "compress-fast",
        "temporal",
        "samples_per_s",
        1_500_000,
        "stage 1 temporal order >= 1.5M samples/s",
    ),
    "stage1_user_samples_per_s": (
        "compress-fast",
        "user",
        "samples_per_s",
        1_000_000,
        "stage 1 user order >= 1.0M samples/s",
    ),
    # benchmarks/e2e.py's JSON: a top-level figure (case ""), no target, the size in its "rows"
    "e2e_100m_wall_s": ("e2e", "", "e2e_wall_s", float("nan"), "100M instances end to end on one GPU (report)"),
}


def compose(results: Path, command: str) -> dict[str, Any]:
    metrics, sources, met, missing, targets, notes = {}, {}, {}, {}, {}, {}
    device = None
    for key, (stem, case, field, target, what) in METRICS.items():
        targets[key] = {"value": None if target != target else target, "what": what}
        path = results / f"{stem}.json"
        metrics[key], met[key] = None, None
        if not path.exists():
            missing[key] = f"{stem}.json not in this run (not measured)"
            continue
        data = json.loads(path.read_text())
        if data.get("tiny"):
            missing[key] = f"{stem}.json is a --tiny run: code paths only, never a target figure"
            continue
        device = device or data.get("device")
        rows = {r["case"]: r for r in data["rows"]} if isinstance(data.get("rows"), list) else {}
        value = data.get(field) if not case else rows.get(case, {}).get(field)
        if value is None:
            missing[key] = f"{stem}.json has no {field}" + (f" for case {case!r}" if case else "")
            continue
        metrics[key] = value
        sources[key] = {"file": path.name, "case": case, "field": field, "config": data.get("config")}
        if not case:  # e2e.json: its log's size and every stage
            sources[key].update(rows=data.get("rows"), stages=data.get("stages"))
            if key == "e2e_100m_wall_s" and (data.get("rows") or 0) < 100_000_000:
                notes[key] = f"measured at {data.get('rows'):,} instances, not 100M (shrunk to fit the device time)"
        if target == target:
            met[key] = bool(metrics[key] >= target)
    return {
        "device": device,
        "command": command,
        "metrics": metrics,
        "targets": targets,
        "met": met,
        "missing": missing,
        "notes": notes,
        "sources": sources,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.targets", description=__doc__)
    p.add_argument("results", help="directory with the run's benchmark JSONs")
    p.add_argument("--command", required=True, help="the command that made the run (recorded)")
    p.add_argument("--out", default="benchmarks/results", help="directory for targets-<device>.json")
    args = p.parse_args(argv)
    out = compose(Path(args.results), args.command)
    path = Path(args.out) / f"targets-{out['device']['slug'] if out['device'] else 'unknown'}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    for key, value in out["metrics"].items():
        target = out["targets"][key]["value"]
        state = {True: "met", False: "MISSED", None: "-"}[out["met"][key]]
        shown = "null" if value is None else f"{value:,.4g}"
        print(f"{key:32s} {shown:>12s}  target {target if target is not None else '-':>10}  {state}")
        for why in (out["missing"].get(key), out["notes"].get(key)):
            if why:
                print(f"{'':32s} ({why})")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
