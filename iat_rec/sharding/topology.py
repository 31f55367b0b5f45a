"""The planner's topology: world size, ranks per host, each device's real HBM and host memory."""

from __future__ import annotations

import os

import torch
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.constants import DDR_CAP

from iat_rec.errors import IatError

GB = 1024**3


def build_topology(
    world_size: int,
    local_world_size: int,
    compute_device: str,
    hbm_gb: float | None = None,
    ddr_gb: float | None = None,
) -> Topology:
    """The planner's picture of the cluster: ``world_size`` ranks, ``local_world_size`` per host.

    HBM: ``hbm_gb`` per GPU, else the memory of the visible GPU; never TorchRec's silent 32 GB.
    DDR: ``ddr_gb`` per rank, else this host's memory / local_world_size when planning for the
    local hardware, else TorchRec's default (128 GB) for hypothetical GPUs (see ddr_source).
    """
    if compute_device not in ("cuda", "cpu"):
        raise IatError(f"compute device '{compute_device}' not in ['cpu', 'cuda']")
    if world_size < 1 or local_world_size < 1 or world_size % local_world_size:
        raise IatError(f"world size {world_size} must be a positive multiple of local world size {local_world_size}")
    hbm = _hbm_bytes(compute_device, hbm_gb)
    ddr = _ddr_bytes(compute_device, local_world_size, ddr_gb)
    return _make_topology(world_size, local_world_size, compute_device, hbm, ddr)


def ddr_source(compute_device: str, ddr_gb: float | None) -> str:
    """Where build_topology takes the DDR figure from: 'given', 'host' or 'torchrec_default'."""
    if ddr_gb is not None:
        return "given"
    if compute_device == "cpu" or torch.cuda.is_available():
        return "host" if _host_memory_bytes() else "torchrec_default"
    return "torchrec_default"


def _hbm_bytes(compute_device: str, hbm_gb: float | None) -> int | None:
    if compute_device != "cuda":
        return None
    if hbm_gb is not None:
        if hbm_gb <= 0:
            raise IatError(f"HBM per GPU must be > 0 GB (got {hbm_gb})")
        return int(hbm_gb * GB)
    if not torch.cuda.is_available():
        raise IatError(
            "no GPU is visible to read its memory: give the HBM per GPU (--hbm-gb); "
            "TorchRec would otherwise assume 32 GB"
        )
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def _ddr_bytes(compute_device: str, local_world_size: int, ddr_gb: float | None) -> int:
    if ddr_gb is not None:
        if ddr_gb <= 0:
            raise IatError(f"DDR per rank must be > 0 GB (got {ddr_gb})")
        return int(ddr_gb * GB)
    if ddr_source(compute_device, None) == "host":
        return _host_memory_bytes() // local_world_size
    return DDR_CAP


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _make_topology(world_size: int, local_world_size: int, device: str, hbm: int | None, ddr: int) -> Topology:
    # TopologyFactory exists in torchrec 1.6.1 and 1.8.0; a Topology built directly logs a
    # warning on 1.8. Fall back to the constructor on releases without the factory.
    try:
        from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
    except ImportError:
        return Topology(
            world_size=world_size,
            local_world_size=local_world_size,
            compute_device=device,
            hbm_cap=hbm,
            ddr_cap=ddr,
        )
    trainer = TrainerConfig(
        world_size=world_size, local_world_size=local_world_size, hbm_cap_bytes=hbm, ddr_cap_bytes=ddr
    )
    return TopologyFactory.create_topology(trainer_config=trainer, kernel_config=KernelConfig(compute_device=device))
