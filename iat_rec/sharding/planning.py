"""Sharding plans for the feature tables and the token table.

One place builds the table configs, the topology and the TorchRec planner, so the training
programs and the ``iat-rec plan`` command agree on what a plan is. Plans are saved as JSON
(never pickle) and load back into a ``ShardingPlan`` that ``DistributedModelParallel(plan=...)``
accepts unchanged.

Memory figures use TorchRec's convention: 1 GB = 1024**3 bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.constants import DDR_CAP, UVM_CACHING_RATIO
from torchrec.distributed.planner.proposers import (
    MAX_PROPOSALS,
    GreedyProposer,
    GridSearchProposer,
    UniformProposer,
)
from torchrec.distributed.planner.stats import EmbeddingStats
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import PlannerError, Proposer, ShardingOption, StorageReservation
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import (
    BoundsCheckMode,
    CacheAlgorithm,
    CacheParams,
    EmbeddingModuleShardingPlan,
    EnumerableShardingSpec,
    ModuleSharder,
    ParameterSharding,
    ShardingPlan,
    ShardingType,
    ShardMetadata,
)
from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS, BaseEmbeddingConfig, DataType

from iat_rec.dist.atomic import write_json
from iat_rec.errors import IatError
from iat_rec.tables import module_table_configs, table_bytes

PLAN_FORMAT = "iat-rec-sharding-plan"
PLAN_VERSION = 1

GB = 1024**3
SHARDING_TYPES = tuple(t.value for t in ShardingType)
COMPUTE_KERNELS = tuple(k.value for k in EmbeddingComputeKernel)
# Kernels whose weights live in host memory (UVM); the caching ones keep a cache in HBM.
_UVM_KERNELS = {"fused_uvm", "quant_uvm", "fused_uvm_caching", "quant_uvm_caching"}
_CACHING_KERNELS = {"fused_uvm_caching", "quant_uvm_caching"}
_SSD_KERNELS = {"key_value", "ssd_virtual_table", "dram_virtual_table", "dram_ssd_virtual_table"}
# TorchRec's default planner reservation: 15% of HBM plus dense parameters and KJT buffers.
DEFAULT_RESERVE_PERCENT = 0.15
# Grid-search proposals x ranks the planner may spend (see default_proposers).
GRID_BUDGET = 50_000


# ---------------------------------------------------------------------------------------
# Topology


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
        raise IatError(
            f"world size {world_size} must be a positive multiple of local world size {local_world_size}"
        )
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
            world_size=world_size, local_world_size=local_world_size, compute_device=device,
            hbm_cap=hbm, ddr_cap=ddr,
        )
    trainer = TrainerConfig(
        world_size=world_size, local_world_size=local_world_size, hbm_cap_bytes=hbm, ddr_cap_bytes=ddr
    )
    return TopologyFactory.create_topology(trainer_config=trainer, kernel_config=KernelConfig(compute_device=device))


# ---------------------------------------------------------------------------------------
# Constraints

_CONSTRAINT_KEYS = {
    "sharding_types": "list of " + ", ".join(SHARDING_TYPES),
    "compute_kernels": "list of " + ", ".join(COMPUTE_KERNELS),
    "min_partition": "int, smallest column-wise shard width",
    "pooling_factors": "list of float, mean ids per sample for each feature of the table",
    "num_poolings": "list of float",
    "batch_sizes": "list of int, per feature",
    "cache_load_factor": "float in (0, 1), share of rows cached in HBM with UVM caching",
    "enforce_hbm": "bool",
    "stochastic_rounding": "bool",
}


def parse_constraints(spec: dict[str, dict] | None) -> dict[str, ParameterConstraints]:
    """Table name -> ParameterConstraints from plain JSON-like data.

    Example: ``{"t_item_id": {"sharding_types": ["row_wise"], "compute_kernels": ["fused_uvm_caching"]}}``.
    A single string is accepted where a list is expected.
    """
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise IatError("constraints: expected a mapping of table name -> constraints")
    return {str(table): _parse_table_constraints(str(table), c) for table, c in spec.items()}


def _parse_table_constraints(table: str, c: Any) -> ParameterConstraints:
    where = f"constraints[{table!r}]"
    if not isinstance(c, dict):
        raise IatError(f"{where}: expected a mapping with keys {sorted(_CONSTRAINT_KEYS)}")
    unknown = sorted(set(c) - set(_CONSTRAINT_KEYS))
    if unknown:
        allowed = "; ".join(f"{k} ({v})" for k, v in _CONSTRAINT_KEYS.items())
        raise IatError(f"{where}: unknown keys {unknown}; allowed: {allowed}")
    kw: dict[str, Any] = {}
    if "sharding_types" in c:
        kw["sharding_types"] = _choices(c["sharding_types"], SHARDING_TYPES, f"{where}.sharding_types")
    if "compute_kernels" in c:
        kw["compute_kernels"] = _choices(c["compute_kernels"], COMPUTE_KERNELS, f"{where}.compute_kernels")
    if "min_partition" in c:
        kw["min_partition"] = _number(c["min_partition"], int, f"{where}.min_partition", low=1)
    for key, typ in (("pooling_factors", float), ("num_poolings", float), ("batch_sizes", int)):
        if key in c:
            kw[key] = [_number(v, typ, f"{where}.{key}", low=0) for v in _as_list(c[key], f"{where}.{key}")]
    for key in ("enforce_hbm", "stochastic_rounding"):
        if key in c:
            if not isinstance(c[key], bool):
                raise IatError(f"{where}.{key}: expected true or false, got {c[key]!r}")
            kw[key] = c[key]
    if "cache_load_factor" in c:
        clf = _number(c["cache_load_factor"], float, f"{where}.cache_load_factor", low=0)
        if not 0 < clf < 1:
            raise IatError(f"{where}.cache_load_factor: must be strictly between 0 and 1, got {clf}")
        kw["cache_params"] = CacheParams(load_factor=clf)
    return ParameterConstraints(**kw)


def _as_list(v: Any, where: str) -> list:
    if isinstance(v, (str, int, float)) and not isinstance(v, bool):
        return [v]
    if isinstance(v, (list, tuple)) and v:
        return list(v)
    raise IatError(f"{where}: expected a non-empty list, got {v!r}")


def _choices(v: Any, allowed: tuple[str, ...], where: str) -> list[str]:
    values = _as_list(v, where)
    bad = [x for x in values if x not in allowed]
    if bad:
        raise IatError(f"{where}: unknown values {bad}; allowed: {list(allowed)}")
    return [str(x) for x in values]


def _number(v: Any, typ: type, where: str, low: float) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (typ is int and not float(v).is_integer()):
        raise IatError(f"{where}: expected {typ.__name__}, got {v!r}")
    if v < low:
        raise IatError(f"{where}: must be >= {low}, got {v}")
    return typ(v)


# ---------------------------------------------------------------------------------------
# Planning


@dataclasses.dataclass
class PlanResult:
    """A plan and what the planner estimated for it (on the planning rank only)."""

    plan: ShardingPlan
    seconds: float
    perf_ms: float | None = None  # planner rating: the slowest rank's estimated time per step
    rank_perf_ms: list[float] | None = None
    table_perf_ms: dict[str, float] | None = None
    rank_hbm_bytes: list[int] | None = None  # planner estimate incl. optimizer, IO, cache state
    rank_ddr_bytes: list[int] | None = None
    num_proposals: int | None = None
    num_plans: int | None = None
    stats_text: str = ""


def make_plan(
    tables_module: nn.Module,
    topology: Topology,
    batch_size: int,
    constraints: dict[str, ParameterConstraints] | None,
    sharders: list[ModuleSharder[nn.Module]] | None = None,
    pg: dist.ProcessGroup | None = None,
    storage_reservation: StorageReservation | None = None,
) -> ShardingPlan:
    """Plans ``tables_module`` (its embedding collections) for ``topology``.

    ``batch_size`` is the per-rank batch. With ``pg``, rank 0 plans and every rank gets the
    plan (or the same IatError: TorchRec's collective_plan leaves the others waiting forever
    when rank 0 fails). Raises IatError when no plan fits.
    """
    return make_plan_with_stats(
        tables_module, topology, batch_size, constraints, sharders, pg, storage_reservation
    ).plan


def make_plan_with_stats(
    tables_module: nn.Module,
    topology: Topology,
    batch_size: int,
    constraints: dict[str, ParameterConstraints] | None,
    sharders: list[ModuleSharder[nn.Module]] | None = None,
    pg: dist.ProcessGroup | None = None,
    storage_reservation: StorageReservation | None = None,
    debug: bool = True,
) -> PlanResult:
    """make_plan, returning the planner's estimates and its stats table too."""
    constraints = dict(constraints or {})
    _check_constraint_tables(tables_module, constraints)
    sharders = sharders if sharders is not None else get_default_sharders()
    _check_sharding_types_supported(tables_module, constraints, sharders, topology.compute_device)
    if pg is None or pg.size() == 1:
        return _plan_here(tables_module, topology, batch_size, constraints, sharders, storage_reservation, debug)
    return _plan_on_rank0(pg, tables_module, topology, batch_size, constraints, sharders, storage_reservation, debug)


def default_storage_reservation(percentage: float = DEFAULT_RESERVE_PERCENT) -> StorageReservation:
    """TorchRec's default: ``percentage`` of HBM plus dense parameters (x6) and KJT buffers."""
    with warnings.catch_warnings():
        # torchrec 1.8 warns about dry runs of lazily built dense modules; our modules are built.
        warnings.simplefilter("ignore", FutureWarning)
        return HeuristicalStorageReservation(percentage=percentage)


def default_proposers(world_size: int) -> list[Proposer]:
    """TorchRec's default proposers, with the exhaustive grid search budgeted by world size.

    Each proposal is partitioned over every rank, so a grid of N proposals costs about
    N x world_size: with 3 tables on 512 ranks TorchRec's full grid (2,560 proposals) took 35 s.
    Capping it at 50k / world_size proposals keeps the grid to a few seconds at any size
    (unchanged up to 8 ranks); the greedy and uniform proposers still search every option.
    """
    grid_budget = max(1, min(MAX_PROPOSALS, GRID_BUDGET // world_size))
    return [GridSearchProposer(max_proposals=grid_budget), GreedyProposer(), GreedyProposer(use_depth=False), UniformProposer()]


def _plan_here(
    module: nn.Module,
    topology: Topology,
    batch_size: int,
    constraints: dict[str, ParameterConstraints],
    sharders: list[ModuleSharder[nn.Module]],
    storage_reservation: StorageReservation | None,
    debug: bool,
) -> PlanResult:
    reservation = storage_reservation or default_storage_reservation()
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        constraints=constraints or None,
        storage_reservation=reservation,
        proposer=default_proposers(topology.world_size),
        stats=EmbeddingStats(),
        debug=debug,
    )
    start = time.perf_counter()
    with _capture_stats() as lines:
        try:
            plan = planner.plan(module, sharders)
        except PlannerError as e:
            kind = getattr(getattr(e, "error_type", None), "value", "other")
            if kind in ("insufficient_storage", "strict_constraints"):  # nothing fit
                raise IatError(_no_plan_message(module, topology, reservation, constraints, kind)) from None
            raise IatError(f"TorchRec planner error [{kind}]: {' '.join(str(e).split())}") from None
        except RuntimeError as e:
            # The enumerator raises RuntimeError when constraints leave a table no option.
            if "No available sharding type" not in str(e):
                raise
            raise IatError(
                "constraints leave a table no (sharding type, compute kernel) pair its sharder supports on "
                f"{topology.compute_device} (data_parallel only runs the dense kernel; UVM kernels need cuda): "
                + str(e).split(" To debug")[0]
            ) from None
    result = PlanResult(plan=plan, seconds=time.perf_counter() - start, stats_text=_tidy_stats(lines))
    best = getattr(planner, "_best_plan", None)  # private, but the only handle on estimates
    if best:
        _fill_estimates(result, best, topology.world_size)
    result.num_proposals = getattr(planner, "_num_proposals", None)
    result.num_plans = getattr(planner, "_num_plans", None)
    return result


def _plan_on_rank0(pg: dist.ProcessGroup, *args: Any) -> PlanResult:
    payload: list[Any] = [None]
    result: PlanResult | None = None
    if pg.rank() == 0:
        try:
            result = _plan_here(*args)
            payload[0] = ("ok", plan_to_json(result.plan))
        except IatError as e:
            payload[0] = ("error", str(e))
        except Exception as e:  # noqa: BLE001 - every rank must leave the broadcast
            payload[0] = ("error", f"planning failed on rank 0: {type(e).__name__}: {e}")
    dist.broadcast_object_list(payload, src=dist.get_global_rank(pg, 0), group=pg)
    status, body = payload[0]
    if status == "error":
        raise IatError(body)
    return result if result is not None else PlanResult(plan=plan_from_json(body), seconds=0.0)


@contextlib.contextmanager
def quiet_planner_logs() -> Iterator[None]:
    """Keeps the console to errors while planning: TorchRec warns about dry runs and
    data-parallel tables (some on the root logger) on every plan, which buries reports."""
    loggers = [logging.getLogger(), logging.getLogger("torchrec")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved):
            lg.setLevel(level)


@contextlib.contextmanager
def _capture_stats() -> Iterator[list[str]]:
    """Collects what EmbeddingStats logs (its stats table) instead of letting it print."""
    lines: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    stats_logger = logging.getLogger(EmbeddingStats.__module__)
    handler = _Collect(level=logging.INFO)
    saved = stats_logger.level, stats_logger.propagate
    stats_logger.addHandler(handler)
    stats_logger.setLevel(logging.INFO)
    stats_logger.propagate = False
    try:
        yield lines
    finally:
        stats_logger.removeHandler(handler)
        stats_logger.setLevel(saved[0])
        stats_logger.propagate = saved[1]


def _tidy_stats(lines: list[str]) -> str:
    """EmbeddingStats pads every row to its widest one inside a '#' box; drop the padding."""
    out = []
    for line in lines:
        if not line.strip("#"):
            line = line[:100]
        elif line.endswith("#"):
            line = line[:-1].rstrip()
        out.append(line.rstrip())
    return "\n".join(out)


def _fill_estimates(result: PlanResult, best: list[ShardingOption], world_size: int) -> None:
    perf = [0.0] * world_size
    hbm = [0] * world_size
    ddr = [0] * world_size
    table_perf: dict[str, float] = {}
    for so in best:
        table_perf[so.name] = table_perf.get(so.name, 0.0) + float(so.total_perf)
        for shard in so.shards:
            if shard.rank is None:
                continue
            if shard.perf is not None:
                perf[shard.rank] += float(shard.perf.total)
            if shard.storage is not None:
                hbm[shard.rank] += int(shard.storage.hbm)
                ddr[shard.rank] += int(shard.storage.ddr)
    result.perf_ms = max(perf) if perf else None
    result.rank_perf_ms = perf
    result.table_perf_ms = table_perf
    result.rank_hbm_bytes = hbm
    result.rank_ddr_bytes = ddr


def _check_constraint_tables(module: nn.Module, constraints: dict[str, ParameterConstraints]) -> None:
    names = {c.name for c in module_table_configs(module)}
    unknown = sorted(set(constraints) - names)
    if unknown:
        raise IatError(f"constraints name unknown tables {unknown}; tables are {sorted(names)}")


def _check_sharding_types_supported(
    module: nn.Module,
    constraints: dict[str, ParameterConstraints],
    sharders: list[ModuleSharder[nn.Module]],
    device: str,
) -> None:
    """A table constrained only to sharding types its sharder lacks (table_row_wise for the
    unpooled token table, say) fails deep in the enumerator; say so plainly instead."""
    by_type = {s.module_type: s for s in sharders}
    for m in module.modules():
        sharder = by_type.get(type(m))
        if sharder is None:
            continue
        supported = sharder.sharding_types(device)
        for name in sharder.shardable_parameters(m):
            wanted = constraints[name].sharding_types if name in constraints else None
            if wanted and not set(wanted) & set(supported):
                raise IatError(
                    f"constraints[{name!r}]: sharding types {wanted} are not supported by "
                    f"{type(sharder).__name__} on {device} (supported: {supported})"
                )


def _no_plan_message(
    module: nn.Module,
    topology: Topology,
    reservation: StorageReservation,
    constraints: dict[str, ParameterConstraints],
    kind: str,
) -> str:
    """One line: what did not fit, against what memory, and what to change."""
    tables = sorted(module_table_configs(module), key=table_bytes, reverse=True)
    total = sum(table_bytes(t) for t in tables)
    shown = ", ".join(
        f"{t.name} ({t.num_embeddings}x{t.embedding_dim} {t.data_type.value.lower()}, {_gb(table_bytes(t))})"
        for t in tables[:5]
    ) + (f" and {len(tables) - 5} more" if len(tables) > 5 else "")
    n = topology.world_size
    dev = topology.devices[0].storage
    reserved = getattr(reservation, "last_reserved_topology", None)
    if reserved is None:  # the reservation itself failed before any table was placed
        dense = getattr(reservation, "_dense_storage", None)
        pct = getattr(reservation, "_percentage", None)
        return (
            f"no sharding plan fits [{kind}]: the HBM reserved per rank for the dense model (parameters x6 "
            f"for optimizer and DDP{f', {_gb(dense.hbm)}' if dense is not None else ''}), the input buffers "
            f"and the {f'{pct:.0%} ' if pct is not None else ''}margin exceed the {_gb(dev.hbm)} of HBM per rank, before "
            f"any table ({shown}); change: a smaller dense model or local batch, or GPUs with more HBM"
        )
    hbm_free = max(reserved.devices[0].storage.hbm, 0)
    memory = (
        f"per rank HBM {_gb(dev.hbm)} ({_gb(hbm_free)} left for tables after the reservation), "
        f"DDR {_gb(dev.ddr)}; over {n} ranks HBM {_gb(dev.hbm * n)} ({_gb(hbm_free * n)} for tables), "
        f"DDR {_gb(dev.ddr * n)}"
    )
    # One table uses one kernel on all its shards: HBM-resident rows are bounded by the
    # free HBM, UVM rows by the DDR, so a rank holds at most max(HBM free, DDR) of it.
    need = math.ceil(total / max(1, dev.ddr, hbm_free))
    fixes = [f"more ranks (at least ~{need} at this memory per rank, big tables row-wise)"]
    no_uvm = sorted(t for t, c in constraints.items() if c.compute_kernels and not set(c.compute_kernels) & _UVM_KERNELS)
    if no_uvm:  # unconstrained tables already had UVM caching in the planner's search
        fixes.append(f'UVM caching for {no_uvm} (compute_kernels: ["fused_uvm_caching"]) so rows live in DDR')
    if any(t.data_type == DataType.FP32 for t in tables[:1]):
        fixes.append(f"fp16 weights for {tables[0].name}")
    fixes.append("a smaller embedding dim")
    if any(c.sharding_types or c.compute_kernels for c in constraints.values()):
        fixes.append(f"looser constraints (given for {sorted(constraints)})")
    else:
        fixes.append("more memory per rank (check the HBM/DDR figures above)")
    return f"no sharding plan fits [{kind}]: tables {shown}, total {_gb(total)}; {memory}; change: {'; or '.join(fixes)}"


def _gb(n: float) -> str:
    return f"{n / GB:,.1f} GB"


# ---------------------------------------------------------------------------------------
# Plan <-> JSON


def plan_to_json(plan: ShardingPlan) -> dict[str, Any]:
    """``{"format", "version", "plan": {module path: {parameter: sharding}}}``, JSON-ready.

    A sharding is ``{sharding_type, compute_kernel, ranks, shards: [{offsets, sizes,
    placement}] | null}`` plus the optional per-table settings the planner may set
    (cache_params, enforce_hbm, stochastic_rounding, bounds_check_mode, output_dtype).
    """
    out: dict[str, Any] = {}
    for path, module_plan in plan.plan.items():
        out[path] = {name: _sharding_to_json(f"{path}.{name}", ps) for name, ps in module_plan.items()}
    return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "plan": out}


def plan_from_json(d: dict[str, Any]) -> ShardingPlan:
    if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
        raise IatError(f"not a sharding plan (format {d.get('format') if isinstance(d, dict) else None!r})")
    if d.get("version") != PLAN_VERSION:
        raise IatError(f"sharding plan version {d.get('version')} is not supported (expected {PLAN_VERSION})")
    plan: dict[str, EmbeddingModuleShardingPlan] = {}
    modules = d.get("plan")
    if not isinstance(modules, dict) or not all(isinstance(v, dict) for v in modules.values()):
        raise IatError("sharding plan: 'plan' must map module paths to objects of parameter -> sharding")
    for path, params in modules.items():
        module_plan = EmbeddingModuleShardingPlan()
        for name, ps in params.items():
            try:
                module_plan[name] = _sharding_from_json(ps)
            except (KeyError, TypeError, ValueError, AttributeError) as e:  # ValueError: overlapping shards
                raise IatError(f"sharding plan: {path}.{name}: {type(e).__name__}: {e}") from None
        plan[path] = module_plan
    return ShardingPlan(plan)


def save_plan(plan: ShardingPlan, path: str | os.PathLike) -> None:
    """Writes the plan as JSON through a temporary sibling and an atomic rename."""
    write_json(path, plan_to_json(plan))


def load_plan(path: str | os.PathLike) -> ShardingPlan:
    path = Path(path)
    if not path.is_file():
        raise IatError(f"sharding plan not found: {path}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise IatError(f"{path}: not valid JSON: {e}") from None
    try:
        return plan_from_json(d)
    except IatError as e:
        raise IatError(f"{path}: {e}") from None


def _sharding_to_json(where: str, ps: ParameterSharding) -> dict[str, Any]:
    if ps.key_value_params is not None:
        raise IatError(f"{where}: key-value (SSD) parameters cannot be saved in a JSON plan")
    spec = ps.sharding_spec
    if spec is not None and not isinstance(spec, EnumerableShardingSpec):
        raise IatError(f"{where}: sharding spec {type(spec).__name__} cannot be saved in a JSON plan")
    d: dict[str, Any] = {
        "sharding_type": ps.sharding_type,
        "compute_kernel": ps.compute_kernel,
        "ranks": list(ps.ranks) if ps.ranks is not None else None,
        "shards": None
        if spec is None
        else [
            {"offsets": list(s.shard_offsets), "sizes": list(s.shard_sizes), "placement": str(s.placement)}
            for s in spec.shards
        ],
    }
    if ps.cache_params is not None:
        d["cache_params"] = _cache_params_to_json(where, ps.cache_params)
    for key in ("enforce_hbm", "stochastic_rounding"):
        if getattr(ps, key) is not None:
            d[key] = getattr(ps, key)
    if ps.bounds_check_mode is not None:
        d["bounds_check_mode"] = ps.bounds_check_mode.name
    if ps.output_dtype is not None:
        d["output_dtype"] = ps.output_dtype.value
    return d


def _sharding_from_json(d: dict[str, Any]) -> ParameterSharding:
    shards = d.get("shards")
    spec = (
        None
        if shards is None
        else EnumerableShardingSpec(
            [ShardMetadata(shard_offsets=s["offsets"], shard_sizes=s["sizes"], placement=s["placement"]) for s in shards]
        )
    )
    return ParameterSharding(
        sharding_type=d["sharding_type"],
        compute_kernel=d["compute_kernel"],
        ranks=d.get("ranks"),
        sharding_spec=spec,
        cache_params=_cache_params_from_json(d["cache_params"]) if d.get("cache_params") else None,
        enforce_hbm=d.get("enforce_hbm"),
        stochastic_rounding=d.get("stochastic_rounding"),
        bounds_check_mode=BoundsCheckMode[d["bounds_check_mode"]] if d.get("bounds_check_mode") else None,
        output_dtype=DataType(d["output_dtype"]) if d.get("output_dtype") else None,
    )


def _cache_params_to_json(where: str, cp: CacheParams) -> dict[str, Any]:
    if cp.stats is not None or cp.multipass_prefetch_config is not None:
        raise IatError(f"{where}: cache statistics / multipass prefetch cannot be saved in a JSON plan")
    d: dict[str, Any] = {}
    if cp.algorithm is not None:
        d["algorithm"] = cp.algorithm.name
    for key in ("load_factor", "reserved_memory", "prefetch_pipeline"):
        if getattr(cp, key) is not None:
            d[key] = getattr(cp, key)
    if cp.precision is not None:
        d["precision"] = cp.precision.value
    return d


def _cache_params_from_json(d: dict[str, Any]) -> CacheParams:
    return CacheParams(
        algorithm=CacheAlgorithm[d["algorithm"]] if d.get("algorithm") else None,
        load_factor=d.get("load_factor"),
        reserved_memory=d.get("reserved_memory"),
        precision=DataType(d["precision"]) if d.get("precision") else None,
        prefetch_pipeline=d.get("prefetch_pipeline"),
    )


# ---------------------------------------------------------------------------------------
# Describing a plan


def describe_plan(
    plan: ShardingPlan,
    topology: Topology,
    tables: list[BaseEmbeddingConfig],
    result: PlanResult | None = None,
) -> dict[str, Any]:
    """A JSON-ready summary: per table placement, per rank memory, planner estimates.

    Per-rank ``hbm_bytes``/``ddr_bytes`` count table weights only (shard sizes x dtype):
    fused kernels keep them in HBM (DDR on CPU), UVM kernels in DDR, and UVM caching adds
    a cache of load_factor x the shard in HBM (TorchRec's default factor when unset).
    The planner's own estimate (weights + optimizer + IO buffers + cache state) is under
    ``estimate`` when ``result`` is given.
    """
    by_name = {t.name: t for t in tables}
    n = topology.world_size
    hbm, ddr = [0] * n, [0] * n
    rows: list[dict[str, Any]] = []
    for path, module_plan in plan.plan.items():
        for name, ps in module_plan.items():
            cfg = by_name.get(name)
            if cfg is None:
                raise IatError(f"plan has table '{name}' (at {path}) that is not among the tables given")
            clf = _cache_load_factor(ps)
            _add_table_memory(ps, cfg, topology.compute_device, clf, hbm, ddr)
            rows.append(
                {
                    "name": name,
                    "module": path,
                    "rows": cfg.num_embeddings,
                    "dim": cfg.embedding_dim,
                    "dtype": cfg.data_type.value.lower(),
                    "bytes": table_bytes(cfg),
                    "sharding_type": ps.sharding_type,
                    "compute_kernel": ps.compute_kernel,
                    "ranks": list(ps.ranks or []),
                    "num_shards": len(ps.sharding_spec.shards) if ps.sharding_spec is not None else len(ps.ranks or []),
                    "cache_load_factor": clf,
                }
            )
    dev = topology.devices[0].storage
    return {
        "topology": {
            "world_size": n,
            "local_world_size": topology.local_world_size,
            "compute_device": topology.compute_device,
            "hbm_bytes_per_rank": dev.hbm,
            "ddr_bytes_per_rank": dev.ddr,
            "hbm_bytes_total": dev.hbm * n,
            "ddr_bytes_total": dev.ddr * n,
        },
        "tables": rows,
        "per_rank": {"hbm_bytes": hbm, "ddr_bytes": ddr},
        "summary": {"hbm_bytes": _min_max_mean(hbm), "ddr_bytes": _min_max_mean(ddr)},
        "estimate": _estimate_json(result),
    }


def _cache_load_factor(ps: ParameterSharding) -> float | None:
    if ps.compute_kernel not in _CACHING_KERNELS:
        return None
    clf = ps.cache_params.load_factor if ps.cache_params is not None else None
    return clf if clf is not None else UVM_CACHING_RATIO


def _add_table_memory(
    ps: ParameterSharding, cfg: BaseEmbeddingConfig, device: str, clf: float | None, hbm: list[int], ddr: list[int]
) -> None:
    elem = DATA_TYPE_NUM_BITS[cfg.data_type] // 8
    if ps.sharding_spec is None:  # data parallel: a full replica on every rank
        placed = [(r, table_bytes(cfg)) for r in ps.ranks or []]
    else:
        placed = [(s.placement.rank(), math.prod(s.shard_sizes) * elem) for s in ps.sharding_spec.shards]
    for rank, nbytes in placed:
        if ps.compute_kernel in _SSD_KERNELS:
            continue  # key-value tables (SSD/DRAM stores) sit outside the TBE weights counted here
        if device == "cpu":
            ddr[rank] += nbytes
        elif ps.compute_kernel in _UVM_KERNELS:
            ddr[rank] += nbytes
            if clf is not None:
                hbm[rank] += math.ceil(nbytes * clf)
        else:
            hbm[rank] += nbytes


def _min_max_mean(xs: list[int]) -> dict[str, float]:
    if not xs:
        return {"min": 0, "max": 0, "mean": 0.0}
    return {"min": min(xs), "max": max(xs), "mean": sum(xs) / len(xs)}


def _estimate_json(result: PlanResult | None) -> dict[str, Any] | None:
    if result is None or result.perf_ms is None:
        return None
    return {
        "perf_ms": result.perf_ms,
        "rank_perf_ms": _min_max_mean(result.rank_perf_ms or []),
        "table_perf_ms": result.table_perf_ms,
        "hbm_bytes": _min_max_mean(result.rank_hbm_bytes or []),
        "ddr_bytes": _min_max_mean(result.rank_ddr_bytes or []),
        "num_proposals": result.num_proposals,
        "num_plans": result.num_plans,
        "planning_seconds": result.seconds,
    }
