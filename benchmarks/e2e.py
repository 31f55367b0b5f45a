"""End to end at scale: generate, stage 1, export, stage 2, each stage timed, with peak memory.

    python -m benchmarks.e2e --work DIR [--users 100000] [--mean-instances 100] [--out e2e.json]

Runs the real commands one after the other, as a user would (``iat-rec data synth``,
``compress``, ``export --dtype fp16``, ``rank``), with the quality configs of the synthetic
log (``iat_rec/configs/synthetic_*.yaml``: one epoch of user-order stage 1 with snapshots for
time-consistent export; stage 2 on the fast paths, ``synthetic_rank_fast.yaml``) and one
epoch of each stage. A stage whose output is already complete in DIR is not rerun.

Jobs of bounded time (``--job-s S``, e.g. 600 for 10-minute jobs): the job stops where its
time runs out and exits 75; the same command again resumes from the artifacts. Stage 1 and 2
get ``--time-limit`` (they checkpoint and stop after their current step) and ``--resume``
when an earlier job started them. Generation and export write atomically, so one cut at the
job's end starts again in the next job. Each stage's figures sum over its jobs.
Per stage: wall seconds, the child's peak host RSS (``getrusage``), the GPU's peak memory in
use (``nvidia-smi`` polled every 0.5 s; whole device, so it includes the CUDA context), and
at the end the token table's bytes on disk. Writes one JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from iat_rec.dist.atomic import write_json
from iat_rec.dist.env import die_with_parent
from iat_rec.train.trainer import EXIT_STOPPED  # iat-rec's code for a run stopped at its time limit; also this job's


def gpu_used_mib() -> int | None:
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True
    )
    values = [int(x) for x in out.stdout.split()] if out.returncode == 0 else []
    return max(values) if values else None


class GpuPeak:
    """Polls the GPU's memory in use while a stage runs; ``peak`` in MiB (None without nvidia-smi)."""

    def __init__(self, every: float = 0.5) -> None:
        self.every, self.peak, self._stop = every, None, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            used = gpu_used_mib()
            if used is not None:
                self.peak = max(self.peak or 0, used)
            self._stop.wait(self.every)

    def __enter__(self) -> GpuPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_stage(name: str, argv: list[str], done: Path, log: Path, timeout: float | None = None) -> dict:
    """Runs one stage (unless ``done`` exists), at most ``timeout`` seconds: past it the stage's
    process group is killed (``cut``). iat-rec's ranks run in sessions of their own and die
    with their launcher, the stage's process (PR_SET_PDEATHSIG)."""
    if done.exists():
        return {"stage": name, "skipped": f"{done} exists (finished by an earlier job)"}
    start = time.perf_counter()
    cut = False
    with GpuPeak() as gpu, log.open("a") as f:  # "a": a stage run over several jobs keeps each job's log
        f.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(argv)}\n")
        f.flush()
        # its own process group, so a cut reaches its children; and it dies with this job
        proc = subprocess.Popen(
            argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            cut = True
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        except BaseException:  # Ctrl-C, or SIGTERM (main turns it into SystemExit): the stage goes too
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    wall = time.perf_counter() - start
    # RUSAGE_CHILDREN: the largest peak RSS of any waited-for descendant so far (Linux: KiB)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    out = {"stage": name, "command": " ".join(argv), "wall_s": wall, "exit": code, "peak_gpu_mib": gpu.peak}
    out["peak_host_rss_bytes_so_far"] = rss
    if cut:
        out["cut"] = True
    elif code not in (0, EXIT_STOPPED):
        out["log_tail"] = log.read_text()[-2000:]
    return out


def merge(earlier: dict | None, now: dict) -> dict:
    """A stage's figures over its jobs: wall seconds summed, peaks the largest, the last exit."""
    if not earlier:
        return {**now, "jobs": 1}
    out = {**now, "jobs": earlier.get("jobs", 1) + 1, "wall_s": earlier["wall_s"] + now["wall_s"]}
    for k in ("peak_gpu_mib", "peak_host_rss_bytes_so_far"):
        out[k] = max((v for v in (earlier.get(k), now.get(k)) if v is not None), default=None)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__)
    p.add_argument("--work", required=True, help="directory of every artifact (reused by a later job)")
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--mean-instances", type=float, default=100.0)
    p.add_argument("--rank-batch", type=int, default=8192, help="stage-2 requests per step")
    p.add_argument("--workers", type=int, default=8, help="loader worker processes per stage")
    p.add_argument("--out", default=None, help="JSON path (default WORK/e2e.json)")
    p.add_argument("--job-s", type=float, default=0, help="this job's seconds (0: no limit); exit 75 when cut")
    p.add_argument(
        "--wind-down-s", type=float, default=120, help="of a stage's time, what startup, checkpoint and test take"
    )
    args = p.parse_args(argv)
    if args.job_s < 0 or args.wind_down_s < 0:
        p.error("--job-s and --wind-down-s take seconds >= 0")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a scheduler's stop: run_stage kills the stage
    t0 = time.perf_counter()
    w = Path(args.work)
    w.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "iat_rec.cli"]
    cfg = Path(__file__).resolve().parents[1] / "iat_rec" / "configs"
    common = ["--no-progress", "--num-workers", str(args.workers)]
    stages = [
        (
            "generate",
            [*cli, "data", "synth", "--out", str(w / "log"), "--users", str(args.users)]
            + ["--mean-instances", str(args.mean_instances), "--seed", "0"],
            w / "log" / "manifest.json",
        ),
        (
            "stage1",
            [*cli, "compress", "--data", str(w / "log"), "--out", str(w / "stage1"), "--scheme", "user"]
            + ["--config", str(cfg / "synthetic_compress.yaml"), "--epochs", "1", *common],
            w / "stage1" / "result.json",
        ),
        (
            "export",
            [*cli, "export", "--stage1", str(w / "stage1"), "--out", str(w / "tokens"), "--dtype", "fp16"]
            + ["--no-progress"],
            w / "tokens" / "manifest.json",
        ),
        (
            "stage2",
            [*cli, "rank", "--data", str(w / "log"), "--tokens", str(w / "tokens"), "--history", "iat"]
            + ["--config", str(cfg / "synthetic_rank_fast.yaml"), "--epochs", "1", "--early-stop", "0"]
            + ["--batch-size", str(args.rank_batch), "--eval-every", "0", "--out", str(w / "stage2"), *common],
            w / "stage2" / "metrics.json",
        ),
    ]
    out_path = Path(args.out) if args.out else w / "e2e.json"
    report = json.loads(out_path.read_text()) if out_path.exists() else {"stages": {}}
    report.update(users=args.users, mean_instances=args.mean_instances, gpu=gpu_used_mib() is not None)
    trainers = {"stage1": w / "stage1", "stage2": w / "stage2"}
    for name, argv_, done in stages:
        timeout = None
        if args.job_s:
            timeout = args.job_s - (time.perf_counter() - t0)
            if timeout < args.wind_down_s and not done.exists():
                print(f"{timeout:.0f} s of this job left: {name} goes on in the next job", flush=True)
                return EXIT_STOPPED
            if name in trainers:
                argv_ = argv_ + ["--time-limit", str(max(1, round(timeout - args.wind_down_s)))]
        if name in trainers and (trainers[name] / "run.json").exists():
            argv_ = argv_ + ["--resume"]  # an earlier job started it
        elif name in trainers and trainers[name].exists():
            shutil.rmtree(trainers[name])  # cut before its run.json: a plan at most, and not a run to resume
        result = run_stage(name, argv_, done, w / f"{name}.log", timeout)
        if "skipped" not in result:
            report["stages"][name] = merge(report["stages"].get(name), result)
        print(json.dumps({k: v for k, v in result.items() if k != "log_tail"}), flush=True)
        write_json(out_path, report)
        if result.get("cut") or result.get("exit") == EXIT_STOPPED:
            print(f"{name} stopped at this job's time: run the same command again to go on", flush=True)
            return EXIT_STOPPED
        if result.get("exit"):
            print(result["log_tail"], file=sys.stderr)
            return 1
    if (w / "log" / "manifest.json").exists():
        report["rows"] = json.loads((w / "log" / "manifest.json").read_text())["rows"]
    if (w / "tokens").exists():
        report["token_table_bytes"] = dir_bytes(w / "tokens" / "table")
    if (w / "stage2" / "metrics.json").exists():
        report["stage2_test"] = json.loads((w / "stage2" / "metrics.json").read_text())
    done = [s for s in ("generate", "stage1", "export", "stage2") if s in report["stages"]]
    report["e2e_wall_s"] = sum(report["stages"][s]["wall_s"] for s in done) if len(done) == 4 else None
    write_json(out_path, report)
    print(json.dumps({k: report.get(k) for k in ("rows", "token_table_bytes", "e2e_wall_s")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
