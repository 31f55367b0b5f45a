"""What every throughput benchmark shares: device and library facts, the two roofline limits
measured in the same run, timing, peak memory, the JSON result and the printed table.

Limits (measured once per run, on the benchmark's device):

* copy bandwidth: one large device-to-device ``copy_`` of ``n`` bytes, counted as ``2 n``
  bytes moved (read + write), median over iterations;
* bf16 matmul peak: one large square bf16 matmul, ``2 n^3`` FLOPs, median over iterations.

Timing: ``time_fn`` runs ``warmup`` untimed calls, then ``iters`` timed ones. On CUDA every
call is bracketed by CUDA events on the current stream (one synchronize at the end), so a
step that the CPU cannot feed fast enough shows the GPU's idle time too; on CPU, by
``perf_counter``. The median is the headline; mean (wall clock over the timed loop), min and
max are kept.

The JSON of every benchmark has the keys in ``RESULT_KEYS``; each entry of ``rows`` has at
least ``ROW_KEYS``, each entry of ``summary`` the keys of ``SUMMARY_KEYS``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from iat_rec.dist.env import versions
from iat_rec.train.config import DEVICES

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULT_KEYS = ("benchmark", "created", "tiny", "device", "versions", "config", "limits", "rows", "summary", "seconds")
ROW_KEYS = ("case", "ms_per_step", "samples_per_s", "peak_mem_bytes")
SUMMARY_KEYS = ("metric", "value", "unit", "vs", "ratio", "target", "meets_target")

# Targets of the issue (H100/H200); a ratio is checked against one only on CUDA.
TARGETS = {
    "tbe_copy_ratio": 0.60,
    "tbe_copy_ratio_in_step": 0.50,
    "fetch_copy_ratio": 0.70,
    "fetch_copy_ratio_model_path": 0.85,
    "reader_mfu": 0.35,
    "scaling_2gpu": 1.8,
    "scaling_eff_8gpu": 0.85,
    "loader_vs_gpu": 2.0,
}


# ---------------------------------------------------------------------------------------
# Arguments


def base_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The flags every benchmark takes; each adds its own sizes (None = tiny or full default)."""
    p = argparse.ArgumentParser(
        prog=f"iat-rec bench {name}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", default=None, help=f"JSON file, or a directory for {name}-<device>.json (default benchmarks/results/)"
    )
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument(
        "--tiny",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CI-sized run (default: on for CPU, off for CUDA)",
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per case")
    p.add_argument("--iters", type=int, default=None, help="timed steps per case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="directory for the synthetic data (default: a temporary one)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 for tiny CPU runs, which share cores in CI; else torch's)",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="after timing each case, profile a few more steps with torch.profiler and write "
        "DIR/<benchmark>-<case>-profile.txt (the top kernels by self device time)",
    )
    return p


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        from iat_rec.errors import IatError

        raise IatError("--device cuda, but torch sees no CUDA device")
    return torch.device("cuda", torch.cuda.current_device()) if choice == "cuda" else torch.device("cpu")


def pick(value: Any, tiny: bool, tiny_default: Any, full_default: Any) -> Any:
    """A size flag's value: given, else the tiny or the full default."""
    if value is not None:
        return value
    return tiny_default if tiny else full_default


@dataclasses.dataclass
class Run:
    """One benchmark run: its arguments, device, sizes and limits."""

    name: str
    args: argparse.Namespace
    device: torch.device
    tiny: bool
    warmup: int
    iters: int
    work: Path
    limits: dict[str, float] = dataclasses.field(default_factory=dict)
    started: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


@contextlib.contextmanager
def bench_run(
    name: str,
    args: argparse.Namespace,
    warmup: tuple[int, int] = (1, 10),
    iters: tuple[int, int] = (3, 50),
    limits: bool = True,
) -> Iterator[Run]:
    """Device, tiny mode, a work directory and the limits; cleans the work directory up."""
    import tempfile

    from iat_rec.dist.env import quiet_third_party

    quiet_third_party()
    device = resolve_device(args.device)
    tiny = (device.type == "cpu") if args.tiny is None else bool(args.tiny)
    torch.manual_seed(args.seed)
    threads = args.threads if args.threads else (1 if tiny and device.type == "cpu" else None)
    with contextlib.ExitStack() as stack:
        if threads:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            stack.callback(torch.set_num_threads, before)
        if args.work:
            work = Path(args.work)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"iat-bench-{name}-")))
        run = Run(name, args, device, tiny, pick(args.warmup, tiny, *warmup), pick(args.iters, tiny, *iters), work)
        if limits:
            run.limits = measure_limits(device, tiny)
            print(
                f"[{name}] {device_name(device)}: copy {run.limits['copy_gbs']:.1f} GB/s, "
                f"bf16 matmul {run.limits['bf16_tflops']:.1f} TFLOP/s",
                flush=True,
            )
        yield run


@contextlib.contextmanager
def dist_env(device: torch.device):
    """The default process group (a private one-rank group when not launched); torn down
    at the end only if this call created it."""
    from iat_rec.dist.env import init_distributed

    created = not dist.is_initialized()
    env = init_distributed(device.type)
    try:
        yield env
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------
# Device and versions


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: torch.device) -> str:
    """File-name form of the device: 'nvidia-h100-80gb-hbm3', 'cpu'."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": device.type,
        "name": device_name(device),
        "slug": device_slug(device),
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            count=torch.cuda.device_count(),
            memory_bytes=props.total_memory,
            sm_count=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
        )
    return info


# ---------------------------------------------------------------------------------------
# Timing and memory


@dataclasses.dataclass
class Timing:
    median_ms: float
    mean_ms: float  # wall clock over the timed loop / iters
    min_ms: float
    max_ms: float
    iters: int

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> Timing:
    """Median time of ``fn()`` over ``iters`` calls after ``warmup`` (see module docstring)."""
    iters = max(1, iters)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        t0 = time.perf_counter()
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
        times = [s.elapsed_time(e) for s, e in events]
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        wall = time.perf_counter() - t0
    return Timing(statistics.median(times), wall * 1e3 / iters, min(times), max(times), iters)


def profile_case(run: Run, case: str, fn: Callable[[], Any], steps: int = 5) -> Path | None:
    """With ``--profile DIR``: ``steps`` more calls of ``fn`` under torch.profiler; the top ops by
    self device time (on a GPU, then by self CPU time too) go to DIR/<benchmark>-<case>-profile.txt.
    Untimed."""
    if not getattr(run.args, "profile", None) or (dist.is_initialized() and dist.get_rank() != 0):
        return None
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.cuda else [])
    fn()  # one untraced call, so lazily created state is not in the trace
    synchronize(run.device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        synchronize(run.device)
    events = prof.key_averages()
    sort = "self_cpu_time_total"
    if run.cuda:
        sort = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    path = Path(run.args.profile) / f"{run.name}-{case.replace('/', '_')}-profile.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"{run.name} {case}: {steps} steps, {device_name(run.device)}\n"
    text += events.table(sort_by=sort, row_limit=30, max_name_column_width=90)
    if run.cuda:  # the host's side too: a step the GPU waits on shows there, not in the device times
        text += "\nby self CPU time:\n" + events.table(
            sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90
        )
    path.write_text(text)
    print(f"[{run.name}] profile of {case}: {path}", flush=True)
    return path


def reset_peak_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max allocated since the last reset. CPU: the process's peak RSS (never reset)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)
    except (ImportError, OSError):
        return 0


def peak_memory_kind(device: torch.device) -> str:
    return "cuda_max_allocated" if device.type == "cuda" else "process_max_rss"


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# Limits


def copy_bandwidth_gbs(device: torch.device, nbytes: int | None = None, iters: int = 20) -> float:
    """GB/s (1e9 bytes) of one large device-to-device copy, read + write bytes counted."""
    if nbytes is None:
        nbytes = 2 * 1024**3 if device.type == "cuda" else 64 * 1024**2
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=3, iters=iters)
    src = dst = None  # the timed lambda holds them: release before free()
    free(device)
    return 2 * n * 4 / (t.median_ms * 1e-3) / 1e9


def bf16_matmul_tflops(device: torch.device, n: int | None = None, iters: int = 20) -> float:
    """TFLOP/s of one large square bf16 matmul (2 n^3 FLOPs)."""
    if n is None:
        n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, device=device).to(torch.bfloat16)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    t = time_fn(lambda: torch.matmul(a, b, out=out), device, warmup=3, iters=iters)
    a = b = out = None  # the timed lambda holds them: release before free()
    free(device)
    return 2.0 * n**3 / (t.median_ms * 1e-3) / 1e12


def measure_limits(device: torch.device, tiny: bool) -> dict[str, float]:
    iters = 5 if tiny else 20
    return {
        "copy_gbs": copy_bandwidth_gbs(device, iters=iters),
        "bf16_tflops": bf16_matmul_tflops(device, iters=iters),
    }


# ---------------------------------------------------------------------------------------
# Rows, summary, JSON, table


def row(case: str, timing: Timing | None, samples_per_step: float, peak: int, **extra: Any) -> dict[str, Any]:
    """A measurement: the ROW_KEYS plus the timing details and anything the benchmark adds."""
    out: dict[str, Any] = {"case": case}
    if timing is not None:
        out["ms_per_step"] = timing.median_ms
        out["samples_per_s"] = samples_per_step / (timing.median_ms * 1e-3) if timing.median_ms > 0 else None
        out["timing"] = timing.as_dict()
    else:
        out["ms_per_step"] = None
        out["samples_per_s"] = None
    out["samples_per_step"] = samples_per_step
    out["peak_mem_bytes"] = peak
    out.update(extra)
    return out


def summary_item(
    run: Run, metric: str, value: float | None, unit: str, vs: str, ratio: float | None, target_key: str | None = None
) -> dict[str, Any]:
    """One headline figure and its ratio to a limit or peer; targets apply on CUDA only."""
    target = TARGETS.get(target_key) if target_key else None
    meets = None if (target is None or ratio is None or not run.cuda) else bool(ratio >= target)
    return {
        "metric": metric,
        "value": value,
        "unit": unit,
        "vs": vs,
        "ratio": ratio,
        "target": target,
        "meets_target": meets,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def versus(run: Run, metric: str, by: dict[str, dict[str, Any]], case: str, peer: str) -> dict[str, Any]:
    """A summary item: ``case``'s samples/s and its ratio to ``peer``'s, measured in the same run."""
    value = by[case]["samples_per_s"]
    return summary_item(run, metric, value, "samples/s", peer, ratio(value, by[peer]["samples_per_s"]))


def out_path(name: str, out: str | None, device: torch.device) -> Path:
    """``--out``: a .json file as given; otherwise a directory for <name>-<device slug>.json."""
    if out and out.endswith(".json"):
        return Path(out)
    return Path(out or RESULTS_DIR) / f"{name}-{device_slug(device)}.json"


def finish(
    run: Run,
    config: dict[str, Any],
    rows: list[dict[str, Any]],
    summary: list[dict[str, Any]],
    columns: Iterable[tuple[str, str, str]] | None = None,
    notes: list[str] | None = None,
) -> Path | None:
    """Prints the table and writes the JSON (rank 0 only); returns its path."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    result = {
        "benchmark": run.name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tiny": run.tiny,
        "device": device_info(run.device),
        "versions": versions(),
        "config": {
            **config,
            "warmup": run.warmup,
            "iters": run.iters,
            "seed": run.args.seed,
            "torch_threads": torch.get_num_threads(),
            "peak_mem_kind": peak_memory_kind(run.device),
        },
        "limits": run.limits,
        "rows": rows,
        "summary": summary,
        "notes": notes or [],
        "seconds": time.perf_counter() - run.started,
    }
    path = out_path(run.name, run.args.out, run.device)
    from iat_rec.dist.atomic import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, _jsonable(result))
    print_table(run, rows, summary, columns)
    print(f"[{run.name}] wrote {path} ({result['seconds']:.1f} s)", flush=True)
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return None
    if hasattr(x, "item") and callable(x.item):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return x


def fmt(v: Any, kind: str = "") -> str:
    if v is None:
        return "-"
    if kind == "bytes":
        return f"{v / 2**20:,.0f} MiB"
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if kind == "x":
        return f"{v:.2f}x"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


DEFAULT_COLUMNS = (
    ("case", "case", ""),
    ("ms/step", "ms_per_step", ""),
    ("samples/s", "samples_per_s", ""),
    ("peak mem", "peak_mem_bytes", "bytes"),
)


def print_table(
    run: Run,
    rows: list[dict[str, Any]],
    summary: list[dict[str, Any]],
    columns: Iterable[tuple[str, str, str]] | None = None,
) -> None:
    cols = list(columns or DEFAULT_COLUMNS)
    lines = [[h for h, _, _ in cols]] + [[fmt(r.get(k), kind) for _, k, kind in cols] for r in rows]
    print(f"\n{run.name} on {device_name(run.device)}{' (tiny)' if run.tiny else ''}")
    _print_grid(lines)
    if summary:
        print()
        grid = [["metric", "value", "unit", "vs", "ratio", "target", "met"]]
        for s in summary:
            kind = "pct" if s["unit"] in ("MFU",) else ""
            grid.append(
                [
                    s["metric"],
                    fmt(s["value"], kind),
                    s["unit"],
                    s["vs"],
                    fmt(s["ratio"], "x"),
                    fmt(s["target"], "x"),
                    fmt(s["meets_target"]),
                ]
            )
        _print_grid(grid)
    print(flush=True)


def _print_grid(lines: list[list[str]]) -> None:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for j, line in enumerate(lines):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


# ---------------------------------------------------------------------------------------
# Shared pieces of the training-step benchmarks


def synth_log(run: Run, name: str, users: int, mean_instances: float):
    """A synthetic instance log under the work directory (made once per work dir and size)."""
    from iat_rec.data.instance_log import InstanceLog
    from iat_rec.data.synth import generate

    path = run.work / f"{name}-u{users}-m{mean_instances:g}-s{run.args.seed}"
    if (path / "manifest.json").is_file():
        return InstanceLog(path)
    t = time.perf_counter()
    log = generate(path, users=users, mean_instances=mean_instances, seed=run.args.seed, progress=False)
    print(
        f"[{run.name}] synthetic log: {log.rows:,} rows, {log.users:,} users ({time.perf_counter() - t:.1f} s)",
        flush=True,
    )
    return log


def cached_batches(dataset, count: int, device: torch.device) -> list:
    """The first ``count`` batches of a BatchDataset, pinned on CUDA hosts (as the loader pins)."""
    n = min(count, len(dataset))
    batches = [dataset[i] for i in range(n)]
    if device.type == "cuda":
        batches = [b.pin_memory() for b in batches]
    return batches


def cycle(batches: list) -> Iterator:
    while True:
        yield from batches


def time_train_pipeline(run: Run, case: str, model, optimizer, batches: list) -> tuple[Timing, list[str]]:
    """Times ``TrainPipelineSparseDist.progress`` over cached batches (cycled): copy to the
    device, input dist, forward, backward, fused sparse and dense optimizer steps."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    pipeline = TrainPipelineSparseDist(model, optimizer, run.device, execute_all_batches=True)
    it = cycle(batches)
    timing = time_fn(lambda: pipeline.progress(it), run.device, run.warmup, run.iters)
    profile_case(run, case, lambda: pipeline.progress(it))
    pipelined = sorted(type(m).__name__ for m in getattr(pipeline, "_pipelined_modules", []))
    with contextlib.suppress(Exception):
        pipeline.detach()
    return timing, pipelined


def linear_flops(model: torch.nn.Module, batch, device: torch.device) -> float:
    """Forward matmul FLOPs of every nn.Linear in ``model`` on one batch (2 x rows x in x out),
    counted by hooks over one no-grad forward. Attention score matmuls and embedding lookups
    are not Linear layers and are not counted. Compiled parts run eagerly here: the hooks count
    as they would uncompiled, and no-grad graphs that the timed steps never run are not compiled."""
    total = [0.0]

    def hook(mod: torch.nn.Linear, inputs, _output) -> None:
        rows = inputs[0].numel() // mod.in_features
        total[0] += 2.0 * rows * mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            model(batch.to(device))
    finally:
        for h in handles:
            h.remove()
    return total[0]


def plan_summary(plan) -> dict[str, str]:
    """table -> 'sharding_type/compute_kernel' of a ShardingPlan."""
    out = {}
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():
            out[table] = f"{ps.sharding_type}/{ps.compute_kernel}"
    return out


def write_constraints(run: Run, name: str, spec: dict[str, dict]) -> str:
    """A constraints JSON file (what TrainConfig.constraints reads) in the work directory."""
    path = run.work / f"constraints-{name}.json"
    path.write_text(json.dumps(spec))
    return str(path)


def main_guard(main: Callable[[list[str]], int]) -> None:
    """``python -m benchmarks.NAME``: one error line and exit code 2 on IatError."""
    from iat_rec.errors import IatError

    try:
        sys.exit(main(sys.argv[1:]))
    except IatError as e:
        print(f"iat-rec: error: {e}", file=sys.stderr)
        sys.exit(2)
