"""The process group of a job, from the launcher's environment (torchrun, torchx dist.ddp).

World size and local world size always come from the launcher, so the planner's topology
(nodes x devices per node) matches the job on one machine or many.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist

from iat_rec.errors import IatError


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str = "auto") -> DistEnv:
    """Joins (or, run alone, creates) the default process group: NCCL on GPUs, gloo on CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise IatError("--device cuda, but torch sees no CUDA device")
    if "RANK" not in os.environ:  # a single process started by hand
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistEnv(rank, world, local_rank, local_world, dev, backend)


def launched() -> bool:
    """True inside a rank started by a launcher (torchrun, torchx)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(module: str, argv: list[str], nproc: int) -> int:
    """Runs ``python -m module argv`` on ``nproc`` local ranks through torchrun."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", module, *argv,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(cmd, env=env)
