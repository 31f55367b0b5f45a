"""Plans saved as JSON (never pickle) that load back into a ``ShardingPlan`` which
``DistributedModelParallel(plan=...)`` accepts unchanged.
"""

from __future__ import annotations

import os
from typing import Any

from torchrec.distributed.types import (
    BoundsCheckMode,
    CacheAlgorithm,
    CacheParams,
    EmbeddingModuleShardingPlan,
    EnumerableShardingSpec,
    ParameterSharding,
    ShardingPlan,
    ShardMetadata,
)
from torchrec.modules.embedding_configs import DataType

from iat_rec.dist.atomic import read_json, write_json
from iat_rec.errors import IatError

PLAN_FORMAT = "iat-rec-sharding-plan"
PLAN_VERSION = 1


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
    d = read_json(path, f"sharding plan not found: {path}")
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
            [
                ShardMetadata(shard_offsets=s["offsets"], shard_sizes=s["sizes"], placement=s["placement"])
                for s in shards
            ]
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
