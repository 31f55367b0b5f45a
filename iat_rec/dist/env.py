"""The process group of a job, from the launcher's environment (torchrun, torchx dist.ddp).

World size and local world size always come from the launcher, so the planner's topology
(nodes x devices per node) matches the job on one machine or many.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from iat_rec import VERBOSE_ENV
from iat_rec.dist.atomic import write_text
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


# third-party messages that say nothing to a user of this program
_NOISE = (
    r"is_fx_tracing will return true",
    r"Using a non-tuple sequence for multidimensional indexing",
    r"torch\.set_vital",
    r"The given NumPy array is not writable",
    # fbgemm-gpu-cpu registers the data-parallel table's lookup under the CPU key with its own
    # autograd inside; its gradient matches nn.EmbeddingBag's (checked), the warning is noise
    r"dense_embedding_codegen_lookup_function: an autograd kernel was not registered",
    r"Please use DTensor instead and we are deprecating ShardedTensor",  # TorchRec's sharded tables are ShardedTensors
    r"'set_vital' is deprecated",  # torchdata's StatefulDataLoader
    r"`broadcast_buffers` is deprecated",  # TorchRec's DistributedDataParallel wrapping
)


class _RootNoise(logging.Filter):
    """TorchRec's plan check logs "Sharding spec not found for ..." on the root logger for
    every data-parallel table (they have no shards by design)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Sharding spec not found for ")


_NOISY_LOGGERS = (
    "torchrec.distributed.utils",  # "Sharding Type is data_parallel, caching params will be ignored", once per table
    "torchrec.distributed.planner.storage_reservations",  # "known issue with ... dense tensor size ... dry run"
    "torch.fx._symbolic_trace",  # "is_fx_tracing will return true for both ...", once per rank
)


def quiet_third_party() -> None:
    """Hides third-party warnings that say nothing to a user of this program (all of them
    with ``iat-rec --verbose``)."""
    if os.environ.get(VERBOSE_ENV):
        return
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=f".*{pattern}")
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings(
            "ignore", category=category, module=r"(torch|torchrec|fbgemm_gpu|torchmetrics|torchx)(\.|$)"
        )
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    root = logging.getLogger()
    if not any(isinstance(f, _RootNoise) for f in root.filters):
        root.addFilter(_RootNoise())


def init_distributed(device: str = "auto") -> DistEnv:
    """Joins (or, run alone, creates) the default process group: NCCL on GPUs, gloo on CPU."""
    quiet_third_party()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise IatError("--device cuda, but torch sees no CUDA device")
    alone = not launched()  # a single process started by hand: no launcher environment
    rank, world = (0, 1) if alone else (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    local_rank = 0 if alone else int(os.environ.get("LOCAL_RANK", 0))
    local_world = 1 if alone else int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        # alone: a private TCP rendezvous, leaving os.environ untouched so that child
        # processes (launched ranks, tools) never mistake themselves for rank 0 of this group
        init = f"tcp://127.0.0.1:{_free_port()}" if alone else "env://"
        dist.init_process_group(
            backend=backend, init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30)
        )
    return DistEnv(rank, world, local_rank, local_world, dev, backend)


def drop_flag(argv: list[str], flag: str) -> list[str]:
    """argv without ``flag VALUE`` / ``flag=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def run_ranks(module: str, argv: list[str], nproc: int | None, body: Callable[[], object]) -> int:
    """Runs ``body`` here when launched (or alone); otherwise launches ``nproc`` local ranks
    of ``python -m module`` (default: one per GPU, else 2 gloo ranks)."""
    if nproc is not None and nproc < 1:
        raise IatError(f"--nproc must be >= 1, not {nproc}")
    nproc = nproc or (torch.cuda.device_count() or 2)
    if launched() or nproc == 1:
        try:
            body()
            if dist.is_initialized() and dist.get_world_size() > 1:
                # every rank done before any tears its group down: a gloo group destroyed while a
                # peer still runs can abort that peer ("terminate called without an active exception")
                dist.barrier()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        return 0
    code = launch(module, drop_flag(argv, "--nproc"), nproc)
    if code != 0:
        raise IatError(f"{module} failed on a rank (exit code {code}); its traceback is printed above")
    return 0


def rank_main(cli: Callable[[list[str]], int]) -> None:
    """``python -m`` entry point of a launched rank: one error line, exit code 2, on IatError;
    exit 130 without a traceback on Ctrl-C (the launcher says "interrupted" once). A rank
    dies with its launcher: were the launcher killed, its agent could not stop the ranks,
    and they would go on training and writing to --out."""
    if launched():
        die_with_parent()
    # Ctrl-C reaches every rank at once. A rank unwinding a KeyboardInterrupt breaks the
    # collective its peers wait in, and they print that error: leave at once instead, with
    # nothing to unwind (artifacts are renamed into place only when complete)
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))
    try:
        sys.exit(cli(sys.argv[1:]))
    except IatError as e:
        errors = os.environ.get(ERRORS_ENV)
        if errors and os.path.isdir(errors):  # launched by launch(): it prints the error once
            write_text(Path(errors) / f"rank-{os.environ.get('RANK', '0')}.error", str(e))
        else:
            print(f"iat-rec: error: {e}", file=sys.stderr)
        sys.exit(2)


ERRORS_ENV = "IAT_REC_RANK_ERRORS"
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGKILL this process when its parent (the launcher's agent, or the job running a stage) dies (Linux prctl)."""
    if sys.platform != "linux":
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the launcher died before the prctl: nothing would stop this rank
        os._exit(1)


def launched() -> bool:
    """True inside a rank started by a launcher (torchrun, torchx)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(module: str, argv: list[str], nproc: int) -> int:
    """Runs ``python -m module argv`` on ``nproc`` local ranks (torchrun's elastic agent).

    The agent is called as a library, not through the torchrun command line, whose parser
    would take program flags such as ``--run`` for abbreviations of its own.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # the agent's own log directory (by default a torchelastic_* left in /tmp by every launch)
    logs = tempfile.mkdtemp(prefix="iat-rec-launch-")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"iat-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{_free_port()}",
        max_restarts=0,
        logs_specs=DefaultLogsSpecs(log_dir=logs),
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ[ERRORS_ENV] = logs  # a rank's IatError goes there, for the launcher to print once
    elastic_log = logging.getLogger("torch.distributed.elastic")
    level = elastic_log.level
    elastic_log.setLevel(logging.CRITICAL)  # its report of a failed rank is ours to give
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", module, *argv)
    except ChildFailedError as e:
        errors = sorted(Path(logs).glob("rank-*.error"), key=lambda p: int(p.stem.split("-")[1]))
        if errors:
            raise IatError(errors[0].read_text()) from None
        return next(iter(e.failures.values())).exitcode or 1
    except SignalException as e:  # the agent turns Ctrl-C (and SIGTERM) into this, after stopping the ranks
        raise KeyboardInterrupt from e
    finally:
        elastic_log.setLevel(level)
        os.environ.pop(ERRORS_ENV, None)
        shutil.rmtree(logs, ignore_errors=True)
    return 0


def versions() -> dict[str, str | None]:
    """The stack's versions: python, torch, torchrec, fbgemm-gpu (and which package), numpy,
    CUDA and cuDNN."""
    import importlib.metadata as md
    import platform

    import numpy
    import torchrec

    def dist_version(*names: str) -> str | None:
        for n in names:
            try:
                return md.version(n)
            except md.PackageNotFoundError:
                continue
        return None

    fbgemm = None
    try:
        import fbgemm_gpu

        fbgemm = getattr(fbgemm_gpu, "__version__", None)
    except Exception:  # noqa: BLE001 - a missing or broken fbgemm is a fact to record
        pass
    return {
        "python": platform.python_version(),
        "iat-rec": dist_version("iat-rec"),
        "torch": torch.__version__,
        "torchrec": getattr(torchrec, "__version__", None) or dist_version("torchrec"),
        "fbgemm_gpu": fbgemm or dist_version("fbgemm-gpu", "fbgemm-gpu-cpu", "fbgemm-gpu-nightly"),
        "fbgemm_package": "fbgemm-gpu-cpu" if dist_version("fbgemm-gpu-cpu") else "fbgemm-gpu",
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "cudnn": str(torch.backends.cudnn.version()) if torch.cuda.is_available() else None,
    }


def provenance() -> dict:
    """What made a run, for its run.json: the command line, the code's git commit (and whether
    the tree had changes), the versions and the host."""
    import subprocess

    repo = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    return {
        "argv": list(sys.argv),
        "git_commit": commit,
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None,
        "versions": versions(),
        "host": socket.gethostname(),
    }
