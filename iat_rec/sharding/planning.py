"""Sharding plans for the feature tables and the token table: TorchRec's planner, run once (on rank 0
of a job) with this project's proposers and storage reservation; its statistics captured and tidied.

Memory figures use TorchRec's convention: 1 GB = 1024**3 bytes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist
from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.proposers import MAX_PROPOSALS, GreedyProposer, GridSearchProposer, UniformProposer
from torchrec.distributed.planner.stats import EmbeddingStats
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import PlannerError, Proposer, ShardingOption, StorageReservation
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import BoundsCheckMode, ModuleSharder, ShardingPlan
from torchrec.modules.embedding_configs import DataType

from iat_rec.errors import IatError
from iat_rec.sharding.plan_json import plan_from_json, plan_to_json
from iat_rec.sharding.topology import GB
from iat_rec.tables import module_table_configs, table_bytes

# Kernels whose weights live in host memory (UVM); the caching ones keep a cache in HBM.
UVM_KERNELS = {"fused_uvm", "quant_uvm", "fused_uvm_caching", "quant_uvm_caching"}
# TorchRec's default planner reservation: 15% of HBM plus dense parameters and KJT buffers.
DEFAULT_RESERVE_PERCENT = 0.15
# Grid-search proposals x ranks the planner may spend (see default_proposers).
GRID_BUDGET = 50_000


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


def without_bounds_check(plan: ShardingPlan) -> ShardingPlan:
    """A copy of ``plan`` with FBGEMM's check of every id against its table's rows off (it is
    on by default: out-of-range ids are clamped, with a warning). For benchmarks, whose ids are
    in range by construction: they time the kernels, not the check."""
    plan = copy.deepcopy(plan)
    for module_plan in plan.plan.values():
        for sharding in module_plan.values():
            sharding.bounds_check_mode = BoundsCheckMode.NONE
    return plan


def make_plan(
    tables_module: nn.Module,
    topology: Topology,
    batch_size: int,
    constraints: dict[str, ParameterConstraints] | None,
    sharders: list[ModuleSharder[nn.Module]] | None = None,
    pg: dist.ProcessGroup | None = None,
) -> ShardingPlan:
    """Plans ``tables_module`` (its embedding collections) for ``topology``.

    ``batch_size`` is the per-rank batch. With ``pg``, rank 0 plans and every rank gets the
    plan (or the same IatError: TorchRec's collective_plan leaves the others waiting forever
    when rank 0 fails). Raises IatError when no plan fits.
    """
    return make_plan_with_stats(tables_module, topology, batch_size, constraints, sharders, pg).plan


def make_plan_with_stats(
    tables_module: nn.Module,
    topology: Topology,
    batch_size: int,
    constraints: dict[str, ParameterConstraints] | None,
    sharders: list[ModuleSharder[nn.Module]] | None = None,
    pg: dist.ProcessGroup | None = None,
    debug: bool = True,
) -> PlanResult:
    """make_plan, returning the planner's estimates and its stats table too."""
    constraints = dict(constraints or {})
    _check_constraint_tables(tables_module, constraints)
    sharders = sharders if sharders is not None else get_default_sharders()
    _check_sharding_types_supported(tables_module, constraints, sharders, topology.compute_device)
    if pg is None or pg.size() == 1:
        return _plan_here(tables_module, topology, batch_size, constraints, sharders, debug)
    return _plan_on_rank0(pg, tables_module, topology, batch_size, constraints, sharders, debug)


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
    return [
        GridSearchProposer(max_proposals=grid_budget),
        GreedyProposer(),
        GreedyProposer(use_depth=False),
        UniformProposer(),
    ]


def _plan_here(
    module: nn.Module,
    topology: Topology,
    batch_size: int,
    constraints: dict[str, ParameterConstraints],
    sharders: list[ModuleSharder[nn.Module]],
    debug: bool,
) -> PlanResult:
    reservation = default_storage_reservation()
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
            f"and the {f'{pct:.0%} ' if pct is not None else ''}margin exceed the {_gb(dev.hbm)} of HBM per rank, "
            f"before any table ({shown}); change: a smaller dense model or local batch, or GPUs with more HBM"
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
    no_uvm = sorted(t for t, c in constraints.items() if c.compute_kernels and not set(c.compute_kernels) & UVM_KERNELS)
    if no_uvm:  # unconstrained tables already had UVM caching in the planner's search
        fixes.append(f'UVM caching for {no_uvm} (compute_kernels: ["fused_uvm_caching"]) so rows live in DDR')
    if any(t.data_type == DataType.FP32 for t in tables[:1]):
        fixes.append(f"fp16 weights for {tables[0].name}")
    fixes.append("a smaller embedding dim")
    if any(c.sharding_types or c.compute_kernels for c in constraints.values()):
        fixes.append(f"looser constraints (given for {sorted(constraints)})")
    else:
        fixes.append("more memory per rank (check the HBM/DDR figures above)")
    return (
        f"no sharding plan fits [{kind}]: tables {shown}, total {_gb(total)}; {memory}; change: {'; or '.join(fixes)}"
    )


def _gb(n: float) -> str:
    return f"{n / GB:,.1f} GB"
