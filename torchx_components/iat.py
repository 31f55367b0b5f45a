# NOTE: no ``from __future__ import annotations`` here: torchx reads the annotations at run
# time (inspect.signature) and its linter accepts only typing's Optional/List/Dict spellings.
"""torchx components for the iat-rec stages: compress, export, rank and the whole pipeline.

Each component is one ``torchx.components.dist.ddp`` job that runs ``python -m pipelines.<stage>``
on every rank (torchrun sets RANK, WORLD_SIZE, LOCAL_WORLD_SIZE; the program reads them, so the
TorchRec planner sees the job's real topology of nodes x processes per node). Only the scheduler
changes between a laptop and a cluster::

    torchx run -s local_cwd  torchx_components/iat.py:compress -j 1x2 --data LOG --out RUN
    torchx run -s slurm      torchx_components/iat.py:compress -j 2x8 -h iat.gpu.8 --data LOG --out RUN
    torchx run -s kubernetes torchx_components/iat.py:compress -j 2x8 -h iat.gpu.8 --image REPO/iat-rec:cuda ...

What each node gets is a named resource, ``-h NAME`` (torchx_components/resources.py, registered
with torchx in setup.py): ``iat.cpu`` (the default: 2 CPUs, 8 GiB) or ``iat.gpu.{1,2,4,8}``, or any
other name registered with torchx. With GPUs, ``-j``'s processes per node must not exceed them.

Program options that a component does not name go after ``--`` and reach the program unchanged
(``... --out RUN -- --emb-dim 32 --eval-every 500``); they come last, so they win over the named ones.
A named program option left at ``None`` is not passed at all: the program's default, or the
``--config`` YAML, applies.

Every program flag also passes through torchrun's own argument parser, which rejects a flag that
abbreviates two of its options (``--run``: --run-path/--run_path; likewise ``--nproc``, ``--log``,
``--max``, ``--node``, ``--master``, ``--local``, ``--rdzv``): the programs' flags avoid them.
"""

from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components.dist import ddp, parse_nnodes

# absolute: torchx loads this file by its path, not as part of the package
from torchx_components import resources

# The images that run the programs on container schedulers (kubernetes), built by docker/Dockerfile:
# the Makefile's pinned stack (CPU: torch's CPU build + fbgemm-gpu-cpu; CUDA: PyPI's CUDA torch +
# fbgemm-gpu) plus this repository, in the image's working directory. local_cwd and slurm ignore
# the image (they run in the working dir). Push them to your registry and pass --image REGISTRY/...
#   docker build -f docker/Dockerfile --build-arg VARIANT=cpu  -t iat-rec:cpu  .
#   docker build -f docker/Dockerfile --build-arg VARIANT=cuda -t iat-rec:cuda .
IMAGE_CPU = "iat-rec:cpu"
IMAGE_CUDA = "iat-rec:cuda"


def default_image(resource: specs.Resource) -> str:
    """The CUDA image for a named resource with GPUs, else the CPU one: a CPU-only torch on a GPU
    node would train on the CPU and leave the GPUs idle."""
    return IMAGE_CUDA if resource.gpu > 0 else IMAGE_CPU


def _flags(**options: object) -> List[str]:
    """``--name value`` for each option given; a True bool is a bare ``--name``; None/False are left out."""
    argv: List[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def _job(
    module: str,
    program_args: List[str],
    extra: List[str],
    image: Optional[str],
    name: str,
    j: str,
    h: str,
    env: Optional[Dict[str, str]],
    max_retries: int,
    max_restarts: int,
    rdzv_backend: str,
    rdzv_port: int,
    mounts: Optional[List[str]],
) -> specs.AppDef:
    resource = resources.resolve(h)
    _, _, nproc_per_node, _ = parse_nnodes(j)
    if resource.gpu > 0 and nproc_per_node > resource.gpu:
        gpus = f"{resource.gpu} GPU{'s' if resource.gpu > 1 else ''}"
        raise ValueError(
            f"-j {j} starts {nproc_per_node} ranks per node, but -h {h} gives each node {gpus} and each "
            f"rank takes the GPU of its LOCAL_RANK: use -j <nnodes>x{resource.gpu} or a larger -h"
        )
    app = ddp(
        *program_args,
        *extra,
        m=module,
        image=image or default_image(resource),
        name=name,
        j=j,
        h=h,
        env=dict(env or {}),
        max_retries=max_retries,
        rdzv_backend=rdzv_backend,
        rdzv_port=rdzv_port,
        mounts=mounts,
    )
    return _with_restarts(app, max_restarts)


def _with_restarts(app: specs.AppDef, max_restarts: int) -> specs.AppDef:
    """Adds torchrun's ``--max_restarts``, which dist.ddp does not pass: restarts inside the
    running job, on every scheduler (local_cwd has no job retries: it ignores max_retries)."""
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
    if max_restarts:
        (role,) = app.roles
        torchrun, rest = role.args[1].split(" ", 1)
        assert torchrun == "torchrun", role.args[1]
        role.args[1] = f"torchrun --max_restarts {max_restarts} {rest}"
        # The ranks' process group would otherwise share the agent's store, which keeps the
        # previous attempt's keys: restarted ranks then read dead peers' addresses and fail
        # to connect (pytorch/pytorch#135712). Unshared, each attempt gets a fresh store.
        role.env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    return app


def compress(
    *extra: str,
    data: str,
    out: str,
    scheme: Optional[str] = None,
    steps: Optional[int] = None,
    epochs: Optional[float] = None,
    batch_size: Optional[int] = None,
    config: Optional[str] = None,
    resume: bool = False,
    image: Optional[str] = None,
    name: str = "/",
    j: str = "1x2",
    h: str = resources.DEFAULT,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_backend: str = "c10d",
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """
    Stage 1: trains the instance compressor (python -m pipelines.compress) on every rank.

    Writes RUN/run.json, RUN/plan.json, RUN/checkpoints/step_*/ (DCP), RUN/tb/ and RUN/result.json.

    Args:
        extra: further pipelines.compress options, after ``--`` (e.g. -- --emb-dim 32 --window 64)
        data: instance log directory, as seen by every node (shared filesystem or mount)
        out: run directory to write, as seen by every node
        scheme: temporal | user (default: the program's or the config's)
        steps: training steps (default: --epochs)
        epochs: epochs over the train split, used when steps is not given
        batch_size: instances per rank and step, both schemes (user order: batch_size // window windows)
        config: YAML with any pipelines.compress option (flags override it)
        resume: continue from the latest checkpoint in out (none yet: start fresh); set it with max_restarts or
            max_retries, so that a restarted job resumes
        image: container image (kubernetes): default iat-rec:cuda if -h has GPUs, else iat-rec:cpu (docker/Dockerfile);
            ignored by local_cwd and slurm
        name: job name: {experimentname}/{runname}, {experimentname}/, /{runname} or {runname}
        j: {nnodes}x{nproc_per_node}, e.g. 1x2 on a CPU host, 2x8 for two 8-GPU nodes (with -h iat.gpu.8)
        h: named resource per node: iat.cpu (2 CPUs, 8 GiB), iat.gpu.N for N = 1, 2, 4, 8 (11 CPUs, 64 GiB per GPU), or
            any name registered with torchx
        env: environment variables for every rank (e.g. NCCL_DEBUG=INFO,OMP_NUM_THREADS=4)
        max_retries: scheduler retries of the whole job (slurm, kubernetes; local_cwd has none)
        max_restarts: torchrun restarts inside the job, on every scheduler: when a rank fails, every rank of the node
            stops and starts again
        rdzv_backend: torchrun rendezvous backend (multi-node only)
        rdzv_port: port of the c10d rendezvous store on the first node (multi-node only)
        mounts: mounts for container schedulers (e.g. type=bind,src=/data,dst=/data)
    """
    args = _flags(
        data=data,
        out=out,
        scheme=scheme,
        steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        config=config,
        resume=resume,
    )
    return _job(
        "pipelines.compress",
        args,
        list(extra),
        image,
        name,
        j,
        h,
        env,
        max_retries,
        max_restarts,
        rdzv_backend,
        rdzv_port,
        mounts,
    )


def export(
    *extra: str,
    stage1: str,
    out: str,
    dtype: Optional[str] = None,
    batch_size: Optional[int] = None,
    image: Optional[str] = None,
    name: str = "/",
    j: str = "1x2",
    h: str = resources.DEFAULT,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_backend: str = "c10d",
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """
    Export: writes every instance's token into the sharded token table (python -m pipelines.export).

    The stage-1 run goes as --stage1, never --run: torchrun's own parser rejects --run as an
    ambiguous abbreviation of its --run-path/--run_path, even after the module name.

    Args:
        extra: further pipelines.export options, after ``--``
        stage1: stage-1 run directory (from the compress component), passed as --stage1
        out: token table directory to write, as seen by every node
        dtype: fp32 | fp16 (default: the program's)
        batch_size: instances per rank per forward pass
        image: container image (kubernetes): default iat-rec:cuda if -h has GPUs, else iat-rec:cpu (docker/Dockerfile);
            ignored by local_cwd and slurm
        name: job name: {experimentname}/{runname}, {experimentname}/, /{runname} or {runname}
        j: {nnodes}x{nproc_per_node}, e.g. 1x2 on a CPU host, 2x8 for two 8-GPU nodes (with -h iat.gpu.8)
        h: named resource per node: iat.cpu (2 CPUs, 8 GiB), iat.gpu.N for N = 1, 2, 4, 8 (11 CPUs, 64 GiB per GPU), or
            any name registered with torchx
        env: environment variables for every rank (e.g. NCCL_DEBUG=INFO,OMP_NUM_THREADS=4)
        max_retries: scheduler retries of the whole job (slurm, kubernetes; local_cwd has none)
        max_restarts: torchrun restarts inside the job, on every scheduler: when a rank fails, every rank of the node
            stops and starts again
        rdzv_backend: torchrun rendezvous backend (multi-node only)
        rdzv_port: port of the c10d rendezvous store on the first node (multi-node only)
        mounts: mounts for container schedulers (e.g. type=bind,src=/data,dst=/data)
    """
    args = _flags(stage1=stage1, out=out, dtype=dtype, batch_size=batch_size)
    return _job(
        "pipelines.export",
        args,
        list(extra),
        image,
        name,
        j,
        h,
        env,
        max_retries,
        max_restarts,
        rdzv_backend,
        rdzv_port,
        mounts,
    )


def rank(
    *extra: str,
    data: str,
    tokens: str,
    out: str,
    history: Optional[str] = None,
    reader: Optional[str] = None,
    stage1: Optional[str] = None,
    warm_start: bool = False,
    steps: Optional[int] = None,
    epochs: Optional[float] = None,
    batch_size: Optional[int] = None,
    config: Optional[str] = None,
    resume: bool = False,
    image: Optional[str] = None,
    name: str = "/",
    j: str = "1x2",
    h: str = resources.DEFAULT,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_backend: str = "c10d",
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """
    Stage 2: trains the downstream ranker over the IAT sequence (python -m pipelines.rank).

    Args:
        extra: further pipelines.rank options, after ``--``
        data: instance log directory, as seen by every node
        tokens: token table directory (from the export component)
        out: run directory to write, as seen by every node
        history: none | handcrafted | iat | both
        reader: transformer | din | longer
        stage1: stage-1 run directory whose sharding plan (and, with warm_start, tables) stage 2 reuses
        warm_start: initialise the shared feature tables from the stage1 checkpoint
        steps: training steps (default: --epochs)
        epochs: epochs over the train split, used when steps is not given
        batch_size: requests per rank per step
        config: YAML with any pipelines.rank option (flags override it)
        resume: continue from the latest checkpoint in out (none yet: start fresh); set it with max_restarts or
            max_retries, so that a restarted job resumes
        image: container image (kubernetes): default iat-rec:cuda if -h has GPUs, else iat-rec:cpu (docker/Dockerfile);
            ignored by local_cwd and slurm
        name: job name: {experimentname}/{runname}, {experimentname}/, /{runname} or {runname}
        j: {nnodes}x{nproc_per_node}, e.g. 1x2 on a CPU host, 2x8 for two 8-GPU nodes (with -h iat.gpu.8)
        h: named resource per node: iat.cpu (2 CPUs, 8 GiB), iat.gpu.N for N = 1, 2, 4, 8 (11 CPUs, 64 GiB per GPU), or
            any name registered with torchx
        env: environment variables for every rank (e.g. NCCL_DEBUG=INFO,OMP_NUM_THREADS=4)
        max_retries: scheduler retries of the whole job (slurm, kubernetes; local_cwd has none)
        max_restarts: torchrun restarts inside the job, on every scheduler: when a rank fails, every rank of the node
            stops and starts again
        rdzv_backend: torchrun rendezvous backend (multi-node only)
        rdzv_port: port of the c10d rendezvous store on the first node (multi-node only)
        mounts: mounts for container schedulers (e.g. type=bind,src=/data,dst=/data)
    """
    args = _flags(
        data=data,
        tokens=tokens,
        out=out,
        history=history,
        reader=reader,
        stage1=stage1,
        warm_start=warm_start,
        steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        config=config,
        resume=resume,
    )
    return _job(
        "pipelines.rank",
        args,
        list(extra),
        image,
        name,
        j,
        h,
        env,
        max_retries,
        max_restarts,
        rdzv_backend,
        rdzv_port,
        mounts,
    )


def pipeline(
    *extra: str,
    data: str,
    work: str,
    scheme: Optional[str] = None,
    history: Optional[str] = None,
    reader: Optional[str] = None,
    seed: Optional[int] = None,
    dtype: Optional[str] = None,
    compress_config: Optional[str] = None,
    rank_config: Optional[str] = None,
    image: Optional[str] = None,
    name: str = "/",
    j: str = "1x2",
    h: str = resources.DEFAULT,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_backend: str = "c10d",
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """
    All stages in order in one job: compress, export, rank (python -m pipelines.pipeline).

    Steps, batch sizes and every other stage option come from the two YAML files.

    Args:
        extra: further pipelines.pipeline options, after ``--``
        data: instance log directory, as seen by every node
        work: work directory for every stage's output, as seen by every node
        scheme: stage-1 scheme: temporal | user
        history: stage-2 history: iat | both
        reader: stage-2 reader: transformer | din | longer
        seed: seed of both stages
        dtype: token table dtype: fp32 | fp16
        compress_config: YAML of pipelines.compress options for stage 1 (e.g. steps, batch_size)
        rank_config: YAML of pipelines.rank options for stage 2
        image: container image (kubernetes): default iat-rec:cuda if -h has GPUs, else iat-rec:cpu (docker/Dockerfile);
            ignored by local_cwd and slurm
        name: job name: {experimentname}/{runname}, {experimentname}/, /{runname} or {runname}
        j: {nnodes}x{nproc_per_node}, e.g. 1x2 on a CPU host, 2x8 for two 8-GPU nodes (with -h iat.gpu.8)
        h: named resource per node: iat.cpu (2 CPUs, 8 GiB), iat.gpu.N for N = 1, 2, 4, 8 (11 CPUs, 64 GiB per GPU), or
            any name registered with torchx
        env: environment variables for every rank (e.g. NCCL_DEBUG=INFO,OMP_NUM_THREADS=4)
        max_retries: scheduler retries of the whole job (slurm, kubernetes; local_cwd has none)
        max_restarts: torchrun restarts inside the job, on every scheduler: when a rank fails, every rank of the node
            stops and starts again
        rdzv_backend: torchrun rendezvous backend (multi-node only)
        rdzv_port: port of the c10d rendezvous store on the first node (multi-node only)
        mounts: mounts for container schedulers (e.g. type=bind,src=/data,dst=/data)
    """
    args = _flags(
        data=data,
        work=work,
        scheme=scheme,
        history=history,
        reader=reader,
        seed=seed,
        dtype=dtype,
        compress_config=compress_config,
        rank_config=rank_config,
    )
    return _job(
        "pipelines.pipeline",
        args,
        list(extra),
        image,
        name,
        j,
        h,
        env,
        max_retries,
        max_restarts,
        rdzv_backend,
        rdzv_port,
        mounts,
    )
