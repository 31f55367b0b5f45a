"""``iat-rec demo``: the whole pipeline on the default synthetic data, with 2 ranks.

Generates the synthetic log (once), then runs the comparison experiment (none, labels only,
hand-crafted, IAT user-order, both) with the demo budgets in ``iat_rec/configs/demo_*.yaml``,
prints the table (LogLoss in nats) and the report's path.
"""

from __future__ import annotations

import argparse
from importlib.resources import files
from pathlib import Path

from iat_rec.data.instance_log import InstanceLog
from iat_rec.data.synth import generate
from iat_rec.train.config import DEVICES
from pipelines import experiment

DEMO_VARIANTS = "none,labels-only,handcrafted,iat-user,both-user"


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="iat-rec demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--users", type=int, default=2000, help="synthetic users (default 2000)")
    p.add_argument("--mean-instances", type=float, default=100.0)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", default="auto", choices=DEVICES)
    args = p.parse_args(argv)
    work = Path(args.work)
    data = work / "data"
    if (data / "manifest.json").is_file():
        print(f"using the synthetic log in {data} ({InstanceLog(data).rows} instances)")
    else:
        log = generate(data, users=args.users, mean_instances=args.mean_instances, seed=0)
        print(f"wrote the synthetic log {data}: {log.rows} instances, {log.users} users")
    configs = files("iat_rec") / "configs"
    return experiment.cli(
        [
            "--data",
            str(data),
            "--work",
            str(work / "runs"),
            "--seeds",
            str(args.seeds),
            "--variants",
            DEMO_VARIANTS,
            "--compress-config",
            str(configs / "demo_compress.yaml"),
            "--rank-config",
            str(configs / "demo_rank.yaml"),
            "--report",
            str(work / "report"),
            "--title",
            "iat-rec demo: history variants on synthetic data",
            "--nproc",
            str(args.nproc),
            "--device",
            args.device,
        ]
    )
