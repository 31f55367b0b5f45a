"""Named resources for the iat-rec torchx components: what ``-h NAME`` asks of each node.

torchx's component best practices ask for named resources rather than cpu/gpu/memMB arguments:
the component names a node shape, and the site decides what the shape is. These are registered
under torchx's ``torchx.named_resources`` entry point group in setup.py (``pip install -e .``, which
``make install`` runs, writes the entry points into the installed metadata; after editing them,
run ``make install`` or ``pip install --no-deps -e .`` again). Every torchx command then knows
them, builtin components included (``torchx run dist.ddp -h iat.gpu.8 ...``).

- ``iat.cpu``: 2 CPUs, 8 GiB, no GPU. Laptops and CI: the components' default ``-j 1x2`` runs two
  gloo ranks, each with one intra-op thread (iat_rec.dist.env sets OMP_NUM_THREADS=1).
- ``iat.gpu.N`` (N = 1, 2, 4, 8): N GPUs, 11 CPUs and 64 GiB per GPU, i.e. one eighth of an
  8 x H100/H200 host per GPU, so that eight ``iat.gpu.1`` jobs, or one ``iat.gpu.8``, fill a host.
  88 CPUs and 512 GiB fit every 8-GPU Hopper host we know of, after the share the OS and the
  kubelet/slurmd keep: DGX H100/H200 (224 threads, 2 TiB), AWS p5/p5e (192 vCPUs, 2 TiB), GCP a3
  (208 vCPUs, 1.7 TiB), Azure ND H100/H200 v5 (96 vCPUs, 1.8 TiB: the CPU bound) and the 8 x H200
  hosts this project measures on (128 cores, 560 GiB: the memory bound). A rank needs far less:
  its CPUs are the training loop plus ``num_workers`` DataLoader workers (default 0; 11 leaves
  room for 8), and its host memory holds batches and pinned buffers, while the instance log and
  the token table are memory-mapped (page cache shared by the node's ranks) and DCP checkpoints
  copy one tensor at a time to host memory.

Kubernetes turns memMB into the pod's memory limit (torchx requests 1 GiB less): a job that needs
more host memory than its named resource gives is killed, not slowed. A site whose nodes differ
registers its own names under the same entry point group, in its own package; the components take
any registered name.
"""

from collections.abc import Callable

from torchx.specs import Resource, named_resources
from torchx.specs.named_resources_aws import NAMED_RESOURCES as AWS_NAMED_RESOURCES
from torchx.specs.named_resources_generic import NAMED_RESOURCES as GENERIC_NAMED_RESOURCES
from torchx.util.entrypoints import load_group

GiB = 1024  # memMB of one GiB

CPU_PER_GPU = 11
MEM_MB_PER_GPU = 64 * GiB

DEFAULT = "iat.cpu"

# torchx's own sentinels (Resource(-1, -1, -1)): registered, but not a size to run on
_SENTINELS = ("NULL", "MISSING")


def iat_cpu() -> Resource:
    """Laptops and CI: 2 CPUs, no GPU, 8 GiB (two gloo ranks of one thread each)."""
    return Resource(cpu=2, gpu=0, memMB=8 * GiB)


def _gpus(n: int) -> Resource:
    return Resource(cpu=CPU_PER_GPU * n, gpu=n, memMB=MEM_MB_PER_GPU * n)


def iat_gpu_1() -> Resource:
    """One GPU of an 8 x H100/H200 host: 11 CPUs, 64 GiB."""
    return _gpus(1)


def iat_gpu_2() -> Resource:
    """Two GPUs of an 8 x H100/H200 host: 22 CPUs, 128 GiB."""
    return _gpus(2)


def iat_gpu_4() -> Resource:
    """Half an 8 x H100/H200 host: 4 GPUs, 44 CPUs, 256 GiB."""
    return _gpus(4)


def iat_gpu_8() -> Resource:
    """A whole 8 x H100/H200 host: 8 GPUs, 88 CPUs, 512 GiB."""
    return _gpus(8)


# name -> factory; setup.py registers exactly these (tests/test_torchx.py checks the installed metadata)
NAMED_RESOURCES: dict[str, Callable[[], Resource]] = {
    "iat.cpu": iat_cpu,
    "iat.gpu.1": iat_gpu_1,
    "iat.gpu.2": iat_gpu_2,
    "iat.gpu.4": iat_gpu_4,
    "iat.gpu.8": iat_gpu_8,
}


def describe(resource: Resource) -> str:
    gpus = f"{resource.gpu} GPU{'s' if resource.gpu != 1 else ''}, " if resource.gpu else ""
    return f"{gpus}{resource.cpu} CPUs, {resource.memMB // GiB} GiB"


def registered() -> list[str]:
    """Every name torchx resolves, iat-rec's first: torchx's generic and AWS tables, then the
    ``torchx.named_resources`` entry points of every installed package (iat-rec's among them)."""
    names = [*GENERIC_NAMED_RESOURCES, *AWS_NAMED_RESOURCES, *load_group("torchx.named_resources", default={})]
    names = [n for n in dict.fromkeys(names) if n not in _SENTINELS]
    return [n for n in NAMED_RESOURCES if n in names] + [n for n in names if n not in NAMED_RESOURCES]


def resolve(h: str) -> Resource:
    """The Resource that torchx gives ``h``; an unregistered name (or one of iat-rec's names
    missing from the installed metadata) is a ValueError that lists the registered names."""
    names = registered()
    if h in names and h in named_resources:
        return named_resources[h]
    ours = ", ".join(f"{n} ({describe(f())})" for n, f in NAMED_RESOURCES.items())
    if h in NAMED_RESOURCES:
        raise ValueError(
            f"-h {h}: iat-rec's named resources are not registered with torchx in this environment "
            f"(stale install): run `make install` or `pip install --no-deps -e .` from the repo root"
        )
    others = ", ".join(n for n in names if n not in NAMED_RESOURCES)
    raise ValueError(
        f"-h {h!r} is not a registered named resource. iat-rec's: {ours}. "
        f"Also registered (torchx's and other packages'): {others}"
    )
