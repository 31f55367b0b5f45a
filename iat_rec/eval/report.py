"""The comparison report: a Markdown table of mean ± std per variant, PNG plots, stage-1
validation AUC and token health, stage times; ``results.json`` beside it (LogLoss in nats)."""

from __future__ import annotations

import json
import os
import platform
from collections import defaultdict
from pathlib import Path

import numpy as np

from iat_rec.dist.atomic import atomic_dir, finite_or_null

METRICS = ("auc", "gauc", "logloss", "ne")
LABELS = {"auc": "AUC", "gauc": "GAUC", "logloss": "LogLoss (nats)", "ne": "NE"}


def task_metrics(metrics: dict, task: str | None) -> dict:
    """A run's test metrics of ``task`` (None: the first task, also at the top level)."""
    return metrics if task is None or task == metrics["task"] else metrics["tasks"][task]


def tasks_of(results: list[dict]) -> list[str]:
    first = results[0]["metrics"]
    return list(first.get("tasks") or [first["task"]])


def summarise(results: list[dict], task: str | None = None) -> list[dict]:
    """Per variant (in first-seen order): mean and std over seeds of each test metric of
    ``task`` (default: the first task)."""
    by: dict[str, list[dict]] = defaultdict(list)
    several = len({r["reader"] for r in results if r["variant"] != "none"}) > 1
    for r in results:
        name = f"{r['variant']} ({r['reader']})" if several and r["variant"] != "none" else r["variant"]
        by[name].append(task_metrics(r["metrics"], task))
    rows = []
    for name, ms in by.items():
        row = {"variant": name, "seeds": len(ms)}
        for m in METRICS:
            xs = np.array([x[m] for x in ms], dtype=float)
            row[m] = {"mean": float(xs.mean()), "std": float(xs.std(ddof=1)) if len(xs) > 1 else 0.0}
        rows.append(row)
    return rows


def device_name() -> str:
    """What the runs ran on, for the results: the GPU's name, else the CPU's."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| variant | seeds | " + " | ".join(LABELS[m] for m in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for r in rows:
        cells = [f"{r[m]['mean']:.4f} ± {r[m]['std']:.4f}" for m in METRICS]
        lines.append(f"| {r['variant']} | {r['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _valid_curves(results: list[dict], task: str) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    curves: dict[str, list] = defaultdict(list)
    for r in results:
        hist = r.get("history") or []
        if not hist:
            continue
        steps = np.array([h["step"] for h in hist])
        auc = np.array([h["metrics"][task]["auc"] for h in hist])
        curves[r["variant"]].append((steps, auc))
    return curves


def plot(results: list[dict], task: str, out: Path) -> list[str]:
    """metrics_per_variant.png (one row of metrics per task) and valid_auc_over_steps.png (``task``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    tasks = tasks_of(results)
    fig, grid = plt.subplots(len(tasks), len(METRICS), figsize=(4 * len(METRICS), 3.6 * len(tasks)), squeeze=False)
    for t, axes in zip(tasks, grid):
        rows = summarise(results, t)
        names = [r["variant"] for r in rows]
        seeds = max(r["seeds"] for r in rows)
        for ax, m in zip(axes, METRICS):
            means = [r[m]["mean"] for r in rows]
            stds = [r[m]["std"] for r in rows]
            # points, not bars: a bar's length reads as the value from zero, and an axis cut to show
            # differences of 0.001 would make them look large; points with error bars read true
            for i, (mean, std) in enumerate(zip(means, stds)):
                ax.errorbar(i, mean, yerr=std, fmt="o", capsize=4, color=plt.cm.tab10(i % 10))
            ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
            ax.set_xlim(-0.5, len(rows) - 0.5)
            ax.set_ylabel(f"test {LABELS[m]}")
            ax.set_title(f"{LABELS[m]} of {t} ({'higher' if m in ('auc', 'gauc') else 'lower'} is better)", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"mean over {seeds} seed(s); error bars: std over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "metrics_per_variant.png", dpi=110)
    plt.close(fig)
    files.append("metrics_per_variant.png")

    curves = _valid_curves(results, task)
    if any(len(s) > 1 for runs in curves.values() for s, _ in runs):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for name, runs in curves.items():
            n = min(len(s) for s, _ in runs)
            steps = runs[0][0][:n]
            aucs = np.stack([a[:n] for _, a in runs])
            ax.plot(steps, aucs.mean(0), marker="o", ms=3, label=name)
            if len(runs) > 1:
                ax.fill_between(steps, aucs.min(0), aucs.max(0), alpha=0.15)
        ax.set_xlabel("stage-2 step")
        ax.set_ylabel(f"validation AUC ({task})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "valid_auc_over_steps.png", dpi=110)
        plt.close(fig)
        files.append("valid_auc_over_steps.png")
    return files


def stage1_table(stage1: dict[str, dict], task: str) -> str:
    """Per stage-1 run: its own validation AUC and each exported table's token health."""
    lines = [
        "| stage-1 run | valid AUC | tokens from | saturation | effective rank "
        "| probe AUC train / held-out | leak gap |",
        "|---|---|---|---|---|---|---|",
    ]
    for run, info in stage1.items():
        valid = (info.get("valid") or {}).get(task, {}).get("auc")
        for mode, h in info.items():
            if mode == "valid" or not h:
                continue
            p = h.get("probe") or {}
            fmt = lambda x, f="{:.4f}": "n/a" if x is None else f.format(x)  # noqa: E731
            lines.append(
                f"| {run} | {fmt(valid)} | {mode} | {fmt(h.get('saturation'))} "
                f"| {fmt(h.get('effective_rank'), '{:.1f}')} "
                f"| {fmt(p.get('auc_train'))} / {fmt(p.get('auc_heldout'))} | {fmt(p.get('leak_gap'), '{:+.4f}')} |"
            )
    return "\n".join(lines)


def results_json(
    title: str,
    dataset: str,
    command: str,
    task: str,
    rows: list[dict],
    results: list[dict],
    stage1: dict,
    seconds: dict,
) -> dict:
    """The committed form of an experiment: per variant mean and std of every test metric."""
    return {
        "title": title,
        "dataset": dataset,
        "command": command,
        "device": device_name(),
        "task": task,
        "seeds": sorted({r["seed"] for r in results}),
        "logloss_unit": "nats",
        "variants": {r["variant"]: {m: r[m] for m in METRICS} for r in rows},
        "stage1": stage1,
        "runs": results,
        "seconds": seconds,
    }


def write_report(
    out: str | Path,
    title: str,
    results: list[dict],
    seconds: dict[str, float],
    command: str,
    notes: str = "",
    dataset: str = "",
    stage1: dict | None = None,
) -> Path:
    """Writes report.md, results.json and plots into ``out`` (atomically); returns report.md."""
    out = Path(out)
    task = results[0]["metrics"]["task"]
    rows = summarise(results)
    data = results_json(title, dataset, command, task, rows, results, stage1 or {}, seconds)
    others = [t for t in tasks_of(results) if t != task]
    data["variants_by_task"] = {
        t: {r["variant"]: {m: r[m] for m in METRICS} for r in summarise(results, t)} for t in [task, *others]
    }
    with atomic_dir(out) as tmp:
        files = plot(results, task, tmp)
        (tmp / "results.json").write_text(
            json.dumps(finite_or_null(data), indent=2, allow_nan=False)
        )  # undefined: null
        md = [
            f"# {title}",
            "",
            f"Command: `{command}`",
            "",
            f"Device: {data['device']}",
            "",
            f"Test metrics of task `{task}` (mean ± std over seeds {data['seeds']}; LogLoss in nats):",
            "",
            markdown_table(rows),
            "",
        ]
        for t in others:
            md += [f"Task `{t}`:", "", markdown_table(summarise(results, t)), ""]
        if notes:
            md += [notes, ""]
        if stage1:
            md += ["## Stage 1: own validation AUC and token health", "", stage1_table(stage1, task), ""]
        md += ["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
        md += [f"| {k} | {v:.1f} |" for k, v in seconds.items()]
        md += [""] + [f"![{f}]({f})" for f in files] + [""]
        (tmp / "report.md").write_text("\n".join(md))
    return out / "report.md"
