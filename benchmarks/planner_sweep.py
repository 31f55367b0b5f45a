"""Planner sweep: how the token table shards as the cluster, the table and the constraints grow.

    python -m benchmarks.planner_sweep [--out benchmarks/results] [--quick]

For every (world size, token rows, token dim, constraint on the token table) it plans a
small fixed set of feature tables plus the fp16 token table on meta tensors for hypothetical
GPUs, and records the placement, the per-rank memory, the planner's estimated time per step
and how long planning took. "auto" leaves the planner free; the other modes restrict the
token table's sharding type, or its kernel (fused_uvm_caching). Writes planner_sweep.json,
planner_sweep.md and three PNGs to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

from iat_rec.data.schema import Schema
from iat_rec.dist.atomic import write_json
from iat_rec.errors import IatError
from iat_rec.sharding.constraints import parse_constraints
from iat_rec.sharding.describe import describe_plan
from iat_rec.sharding.planning import make_plan_with_stats, quiet_planner_logs
from iat_rec.sharding.topology import GB, build_topology
from iat_rec.tables import TOKEN_TABLE, build_tables_module, feature_table_configs, token_table_config

CONSTRAINT_MODES: dict[str, dict[str, Any]] = {
    "auto": {},
    "table_wise": {"sharding_types": ["table_wise"]},
    "row_wise": {"sharding_types": ["row_wise"]},
    "column_wise": {"sharding_types": ["column_wise"]},
    "table_row_wise": {"sharding_types": ["table_row_wise"]},
    "fused_uvm_caching": {"compute_kernels": ["fused_uvm_caching"]},
}

# Feature tables of a typical ranker, small beside the token table.
FEATURES = Schema.from_dict(
    {
        "user": "user_id",
        "timestamp": "ts",
        "labels": [{"name": "click", "column": "click"}],
        "sparse": [
            {"name": "user_id", "column": "user_id", "hash": 10_000_000},
            {"name": "item_id", "column": "item_id", "hash": 10_000_000},
            {"name": "author_id", "column": "author_id", "hash": 1_000_000},
            {"name": "category", "column": "category", "hash": 10_000},
            {"name": "hour", "column": "hour", "hash": 24},
        ],
    }
)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    world_sizes: tuple[int, ...]
    token_rows: tuple[int, ...]
    dims: tuple[int, ...]
    modes: tuple[str, ...]
    local_world_size: int = 8
    hbm_gb: float = 80.0  # H100
    ddr_gb: float = 128.0  # 1 TB hosts with 8 GPUs
    feature_dim: int = 64
    token_dtype: str = "fp16"
    history_len: int = 256
    batch_size: int = 8192


FULL = SweepConfig(
    world_sizes=(8, 16, 32, 64, 128, 256, 512),
    token_rows=(10**8, 10**9, 10**10),
    dims=(32, 64, 128),
    modes=tuple(CONSTRAINT_MODES),
)
QUICK = SweepConfig(world_sizes=(8, 16), token_rows=(10**8,), dims=(64,), modes=("auto", "row_wise"))


def plan_one(cfg: SweepConfig, world_size: int, rows: int, dim: int, mode: str) -> dict[str, Any]:
    """Plans one point; an infeasible point is a result too (feasible=False and why)."""
    features = feature_table_configs(FEATURES, cfg.feature_dim)
    token = token_table_config(rows, dim, cfg.token_dtype)
    spec = {TOKEN_TABLE: {**CONSTRAINT_MODES[mode], "pooling_factors": [float(cfg.history_len)]}}
    topology = build_topology(world_size, cfg.local_world_size, "cuda", cfg.hbm_gb, cfg.ddr_gb)
    module = build_tables_module(features, token)
    point: dict[str, Any] = {"world_size": world_size, "token_rows": rows, "dim": dim, "mode": mode}
    start = time.perf_counter()
    try:
        with quiet_planner_logs():
            result = make_plan_with_stats(module, topology, cfg.batch_size, parse_constraints(spec), debug=False)
    except IatError as e:
        kind = re.search(r"\[(\w+)\]", str(e))
        reason = kind.group(1) if kind else "unsupported" if "not supported" in str(e) else "error"
        return {
            **point,
            "feasible": False,
            "reason": reason,
            "message": str(e),
            "planning_seconds": time.perf_counter() - start,
        }
    d = describe_plan(result.plan, topology, features + [token], result)
    tok = next(t for t in d["tables"] if t["name"] == TOKEN_TABLE)
    est = d["estimate"] or {}
    return {
        **point,
        "feasible": True,
        "token_sharding": tok["sharding_type"],
        "token_kernel": tok["compute_kernel"],
        "token_shards": tok["num_shards"],
        "hbm_max": d["summary"]["hbm_bytes"]["max"],
        "hbm_mean": d["summary"]["hbm_bytes"]["mean"],
        "ddr_max": d["summary"]["ddr_bytes"]["max"],
        "ddr_mean": d["summary"]["ddr_bytes"]["mean"],
        "planner_hbm_max": est.get("hbm_bytes", {}).get("max"),
        "planner_ddr_max": est.get("ddr_bytes", {}).get("max"),
        "perf_ms": est.get("perf_ms"),
        "planning_seconds": time.perf_counter() - start,
    }


def run_sweep(cfg: SweepConfig, log=print) -> list[dict[str, Any]]:
    points = list(itertools.product(cfg.world_sizes, cfg.token_rows, cfg.dims, cfg.modes))
    results = []
    for i, (ws, rows, dim, mode) in enumerate(points, 1):
        r = plan_one(cfg, ws, rows, dim, mode)
        results.append(r)
        what = f"{r['token_sharding']}/{r['token_kernel']}" if r["feasible"] else f"no plan ({r['reason']})"
        log(f"[{i}/{len(points)}] ws={ws} rows={rows:.0e} dim={dim} {mode}: {what} ({r['planning_seconds']:.2f} s)")
    return results


# ---------------------------------------------------------------------------------------
# Outputs


def write_markdown(
    path: Path, cfg: SweepConfig, results: list[dict[str, Any]], env: dict[str, Any] | None = None
) -> None:
    gb = GB
    lines = [
        "# Planner sweep",
        "",
        f"Token table fp16, looked up {cfg.history_len} ids per sample; feature tables "
        f"{', '.join(f.name for f in FEATURES.sparse)} at dim {cfg.feature_dim}. Hypothetical GPUs with "
        f"{cfg.hbm_gb:g} GB HBM and {cfg.ddr_gb:g} GB DDR per rank, {cfg.local_world_size} per host, "
        f"batch {cfg.batch_size} per rank. HBM/DDR: table weights per rank, max over ranks (UVM caching "
        "adds its HBM cache). Step: the TorchRec planner's estimate for the slowest rank (sparse part only). "
        "Mode: constraint on the token table (auto = none; table_row_wise is not offered for unpooled "
        "tables like the token table). Planning times: wall seconds, one thread, on the machine that ran the sweep"
        + (
            f" (torchrec {env['torchrec']}, torch {env['torch']}, {env['cpu_count']} CPUs, load average "
            f"{env['load_average_1m']:.1f} at the start and {env['load_average_1m_after']:.1f} at the end)."
            if env
            else "."
        ),
        "",
    ]
    slowest = max(results, key=lambda r: r["planning_seconds"])
    lines += [
        f"Slowest planning: {slowest['planning_seconds']:.2f} s (world size {slowest['world_size']}, "
        f"{slowest['token_rows']:.0e} rows, dim {slowest['dim']}, {slowest['mode']}).",
        "",
    ]
    lines += _summary_table(cfg, results)
    for dim in cfg.dims:
        lines += [
            f"## Token dim {dim}",
            "",
            "| world | rows | mode | token sharding | kernel | HBM max | DDR max | step ms | plan s |",
            "|---:|---:|---|---|---|---:|---:|---:|---:|",
        ]
        for r in (r for r in results if r["dim"] == dim):
            head = f"| {r['world_size']} | {r['token_rows']:.0e} | {r['mode']} |"
            if r["feasible"]:
                lines.append(
                    f"{head} {r['token_sharding']} | {r['token_kernel']} | {r['hbm_max'] / gb:.1f} GB | "
                    f"{r['ddr_max'] / gb:.1f} GB | {r['perf_ms']:.1f} | {r['planning_seconds']:.2f} |"
                )
            else:
                lines.append(
                    f"{head} no plan ({r['reason'].replace('_', ' ')}) | | | | | {r['planning_seconds']:.2f} |"
                )
        lines.append("")
    path.write_text("\n".join(lines))


_ABBR = {
    "row_wise": "RW",
    "table_wise": "TW",
    "column_wise": "CW",
    "table_row_wise": "TWRW",
    "data_parallel": "DP",
    "fused": "HBM",
    "fused_uvm_caching": "UVM cache",
    "fused_uvm": "UVM",
}


def _summary_table(cfg: SweepConfig, results: list[dict[str, Any]]) -> list[str]:
    """The planner's free choice at the middle dim: token rows x world size."""
    dim = 64 if 64 in cfg.dims else cfg.dims[0]
    cell = {(r["token_rows"], r["world_size"]): r for r in results if r["mode"] == "auto" and r["dim"] == dim}
    lines = [
        f"## Summary: auto plan of the token table (dim {dim}), placement and estimated ms per step",
        "",
        "| rows | " + " | ".join(str(w) for w in cfg.world_sizes) + " |",
        "|---:|" + "---|" * len(cfg.world_sizes),
    ]
    for rows in cfg.token_rows:
        cells = []
        for ws in cfg.world_sizes:
            r = cell.get((rows, ws))
            if r is None:
                cells.append("")
            elif not r["feasible"]:
                cells.append("no plan")
            else:
                cells.append(
                    f"{_ABBR.get(r['token_sharding'], r['token_sharding'])} "
                    f"{_ABBR.get(r['token_kernel'], r['token_kernel'])}, {r['perf_ms']:.0f} ms"
                )
        lines.append(f"| {rows:.0e} | " + " | ".join(cells) + " |")
    planning_s: dict[int, float] = {}
    for r in results:
        planning_s[r["world_size"]] = max(planning_s.get(r["world_size"], 0.0), r["planning_seconds"])
    lines += [
        "",
        "Planning time, max per world size: "
        + ", ".join(f"{ws}: {planning_s[ws]:.1f} s" for ws in sorted(planning_s))
        + ".",
        "",
    ]
    return lines


def write_plots(out: Path, cfg: SweepConfig, results: list[dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    dim = 64 if 64 in cfg.dims else cfg.dims[0]
    modes = list(cfg.modes)
    colors = dict(zip(CONSTRAINT_MODES, plt.get_cmap("tab10").colors))
    markers = dict(zip(CONSTRAINT_MODES, "osD^vP"))
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    paths = []

    def feasible(rows: int, mode: str, d: int = dim) -> list[dict[str, Any]]:
        pts = [r for r in results if r["token_rows"] == rows and r["mode"] == mode and r["dim"] == d and r["feasible"]]
        return sorted(pts, key=lambda r: r["world_size"])

    def draw(ax, mode: str, pts: list[dict[str, Any]], y: list[float]) -> None:
        # Modes often pick the same plan; earlier modes are drawn wider so ties stay visible.
        k = modes.index(mode)
        x = [r["world_size"] for r in pts]
        ax.plot(x, y, color=colors[mode], lw=max(1.0, 7.0 - 1.2 * k), alpha=0.8, label=mode, zorder=2 + k)
        for xi, yi, r in zip(x, y, pts):  # hollow marker: the token table runs from UVM (DDR)
            uvm = r["token_kernel"] in ("fused_uvm_caching", "fused_uvm")
            ax.plot(
                [xi],
                [yi],
                marker=markers[mode],
                ms=5,
                color=colors[mode],
                zorder=10 + k,
                markerfacecolor="white" if uvm else colors[mode],
            )

    def style(ax, title: str, ylabel: str, log_y: bool = True) -> None:
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(cfg.world_sizes), [str(w) for w in cfg.world_sizes])
        ax.set_xlim(cfg.world_sizes[0] / 1.3, cfg.world_sizes[-1] * 1.3)
        if log_y:  # ticks at 1, 2, 5 x 10^k in plain numbers, also on narrow ranges
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
        ax.tick_params(labelsize=8)

    # 1. Per-rank memory vs world size: HBM (top, log) and DDR (bottom), one column per table size.
    n = len(cfg.token_rows)
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 6.6), squeeze=False)
    for j, rows in enumerate(cfg.token_rows):
        for i, (key, cap, tier) in enumerate((("hbm_max", cfg.hbm_gb, "HBM"), ("ddr_max", cfg.ddr_gb, "DDR"))):
            ax = axes[i][j]
            for mode in modes:
                pts = feasible(rows, mode)
                if pts:
                    draw(ax, mode, pts, [max(r[key] / GB, 0.01) if i == 0 else r[key] / GB for r in pts])
            ax.axhline(cap, color="k", ls="--", lw=0.8)
            ax.annotate(
                f"{tier} per rank ({cap:g} GB)",
                (0.02, cap),
                xycoords=("axes fraction", "data"),
                xytext=(0, 3),
                textcoords="offset points",
                fontsize=7,
            )
            style(ax, f"{rows:.0e} tokens x {dim} fp16: {tier}", f"{tier} per rank, max (GB)", log_y=i == 0)
            if i == 1:
                ax.set_ylim(bottom=-0.04 * cap, top=cap * 1.15)
                ax.set_xlabel("world size (GPUs)", fontsize=9)
    _figure_legend(fig, axes[0][0])
    fig.suptitle(
        "Per-rank table memory vs world size (hollow marker: token table in DDR via UVM; missing: no plan fits)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    paths.append(_save(fig, out / "planner_memory.png"))

    # 2. Estimated time per step vs world size, one panel per table size, plus token dims.
    fig, axes = plt.subplots(1, n + 1, figsize=(4.2 * (n + 1), 3.7), squeeze=False)
    for j, rows in enumerate(cfg.token_rows):
        ax = axes[0][j]
        for mode in modes:
            pts = feasible(rows, mode)
            if pts:
                draw(ax, mode, pts, [r["perf_ms"] for r in pts])
        style(ax, f"{rows:.0e} tokens x {dim} fp16", "estimated ms per step")
        ax.set_xlabel("world size (GPUs)", fontsize=9)
    _figure_legend(fig, axes[0][0])
    ax = axes[0][n]
    rows = cfg.token_rows[-1]
    for k, d in enumerate(cfg.dims):
        pts = feasible(rows, "auto", d)
        if pts:
            ax.plot(
                [r["world_size"] for r in pts],
                [r["perf_ms"] for r in pts],
                marker="os^"[k % 3],
                ms=4,
                lw=1.3,
                label=f"dim {d}",
            )
    style(ax, f"{rows:.0e} tokens, auto, by token dim", "estimated ms per step")
    ax.set_xlabel("world size (GPUs)", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(
        "TorchRec planner estimate of the sparse step time, slowest rank (hollow marker: token table via UVM)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    paths.append(_save(fig, out / "planner_step_time.png"))

    # 3. Planning time vs world size (rank 0 plans before training starts).
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for mode in modes:
        ran = [r for r in results if r["mode"] == mode and r.get("reason") != "unsupported"]
        by_ws: dict[int, float] = {}
        for r in ran:
            by_ws[r["world_size"]] = max(by_ws.get(r["world_size"], 0.0), r["planning_seconds"])
        if by_ws:
            xs = sorted(by_ws)
            ax.plot(xs, [by_ws[x] for x in xs], marker=markers[mode], color=colors[mode], ms=4, lw=1.3, label=mode)
    style(ax, "Planning time, 6 tables (max over table sizes and dims)", "seconds")
    ax.set_xlabel("world size (GPUs)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, out / "planner_time.png"))
    plt.close("all")
    return paths


def _figure_legend(fig, ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="lower center",
        ncol=len(labels),
        fontsize=8,
        frameon=False,
        title="constraint on the token table",
        title_fontsize=8,
    )


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=90)
    return path


def environment() -> dict[str, Any]:
    """What the planning times depend on: the planner's version and how busy the CPU was."""
    from importlib.metadata import version

    return {
        "python": platform.python_version(),
        "torch": version("torch"),
        "torchrec": version("torchrec"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.planner_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results", help="output directory (default benchmarks/results)")
    p.add_argument("--quick", action="store_true", help="a tiny sweep (for CI)")
    p.add_argument(
        "--render-only",
        action="store_true",
        help="redraw the table and plots from OUT/planner_sweep.json without planning again",
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        data = json.loads((out / "planner_sweep.json").read_text())
        cfg = SweepConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["config"].items()})
    else:
        cfg = QUICK if args.quick else FULL
        env_before, start = environment(), time.perf_counter()
        results = run_sweep(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
        data = {
            "benchmark": "planner_sweep",
            "config": dataclasses.asdict(cfg),
            "features": FEATURES.to_dict()["sparse"],
            "environment": {**env_before, "load_average_1m_after": os.getloadavg()[0]},
            "results": results,
            "seconds": time.perf_counter() - start,
        }
        write_json(out / "planner_sweep.json", data)
    write_markdown(out / "planner_sweep.md", cfg, data["results"], data.get("environment"))
    pngs = write_plots(out, cfg, data["results"])
    print(f"wrote {out / 'planner_sweep.json'}, {out / 'planner_sweep.md'}, " + ", ".join(str(p) for p in pngs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
