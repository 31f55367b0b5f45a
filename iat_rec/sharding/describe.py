"""A plan described for people and for JSON: each table's sharding, kernel and memory per rank."""

from __future__ import annotations

import math
from typing import Any

from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.constants import UVM_CACHING_RATIO
from torchrec.distributed.types import ParameterSharding, ShardingPlan
from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS, BaseEmbeddingConfig

from iat_rec.errors import IatError
from iat_rec.sharding.planning import UVM_KERNELS, PlanResult
from iat_rec.tables import table_bytes

_CACHING_KERNELS = {"fused_uvm_caching", "quant_uvm_caching"}
_SSD_KERNELS = {"key_value", "ssd_virtual_table", "dram_virtual_table", "dram_ssd_virtual_table"}


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
        elif ps.compute_kernel in UVM_KERNELS:
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
