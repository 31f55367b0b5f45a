"""Per-table planner constraints from JSON (``--constraints``), checked with one clear error per bad key."""

from __future__ import annotations

from typing import Any

from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import ParameterConstraints
from torchrec.distributed.types import CacheParams, ShardingType
from torchrec.modules.embedding_configs import BaseEmbeddingConfig, DataType

from iat_rec.errors import IatError

SHARDING_TYPES = tuple(t.value for t in ShardingType)
COMPUTE_KERNELS = tuple(k.value for k in EmbeddingComputeKernel)


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


def placement_constraints(
    tables: list[BaseEmbeddingConfig], max_rows: int, constraints: dict[str, ParameterConstraints] | None
) -> dict[str, ParameterConstraints] | None:
    """``constraints`` plus data-parallel for each table of at most ``max_rows`` rows that
    ``constraints`` does not name (``--replicate-rows``; 0 adds nothing), and never
    data-parallel for an fp16 table: a data-parallel table is stepped by a plain torch
    optimizer, which needs fp32 weights (Adam's eps underflows in fp16: NaN at step 2), where
    FBGEMM's fused optimizers update fp16 rows with stochastic rounding."""
    given = constraints or {}
    small = [t.name for t in tables if 0 < t.num_embeddings <= max_rows and t.name not in given]
    half = [t.name for t in tables if t.name in small and t.data_type == DataType.FP16]
    if half:
        raise IatError(
            f"--replicate-rows {max_rows} would make the fp16 tables {half} data-parallel: a plain torch optimizer "
            "steps a data-parallel table and needs fp32 weights: lower --replicate-rows, or --table-dtype fp32"
        )
    fused = [t.value for t in ShardingType if t != ShardingType.DATA_PARALLEL]
    out = {t: ParameterConstraints(sharding_types=[ShardingType.DATA_PARALLEL.value]) for t in small}
    out |= {t.name: ParameterConstraints(sharding_types=fused) for t in tables if t.data_type == DataType.FP16}
    return {**out, **given} or None


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
