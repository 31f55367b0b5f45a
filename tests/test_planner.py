"""Planner helpers, `iat-rec plan` and the planner sweep, all on CPU with meta tensors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig

from iat_rec import tables as T
from iat_rec.cli import main
from iat_rec.data.schema import Schema
from iat_rec.errors import IatError
from iat_rec.sharding import plan_cli
from iat_rec.sharding.constraints import parse_constraints, placement_constraints
from iat_rec.sharding.describe import describe_plan
from iat_rec.sharding.plan_json import PLAN_FORMAT, PLAN_VERSION, load_plan, plan_from_json, plan_to_json, save_plan
from iat_rec.sharding.planning import make_plan, make_plan_with_stats, quiet_planner_logs
from iat_rec.sharding.topology import GB, build_topology
from tests.helpers import REPO

SCHEMA = {
    "user": "user_id",
    "timestamp": "ts",
    "labels": [{"name": "click", "column": "click"}],
    "sparse": [
        {"name": "user_id", "column": "user_id", "hash": 1_000_000},
        {"name": "item_id", "column": "item_id", "hash": 5_000_000},
        {"name": "genre", "column": "genre", "vocab": ["a", "b", "c"], "separator": "|"},
    ],
}
TWO_NODES = dict(world_size=16, local_world_size=8, compute_device="cuda", hbm_gb=80, ddr_gb=128)


@pytest.fixture(scope="module")
def tables():
    features = T.feature_table_configs(Schema.from_dict(SCHEMA), 32)
    token = T.token_table_config(10**9, 64, "fp16")
    return features, token


@pytest.fixture(scope="module")
def two_node_plan(tables):
    features, token = tables
    topology = build_topology(**TWO_NODES)
    module = T.build_tables_module(features, token)
    constraints = parse_constraints({T.TOKEN_TABLE: {"pooling_factors": [256]}})
    with quiet_planner_logs():
        result = make_plan_with_stats(module, topology, 1024, constraints)
    return result, topology


def test_table_configs(tables):
    features, token = tables
    assert [t.name for t in features] == ["t_user_id", "t_item_id", "t_genre"]
    assert [t.feature_names for t in features] == [["user_id"], ["item_id"], ["genre"]]
    assert [t.num_embeddings for t in features] == [1_000_000, 5_000_000, 3]
    assert {t.embedding_dim for t in features} == {32}
    assert (token.name, token.feature_names, token.num_embeddings) == (T.TOKEN_TABLE, [T.TOKEN_FEATURE], 10**9)
    assert token.data_type == DataType.FP16
    with pytest.raises(IatError, match="token dtype"):
        T.token_table_config(10, 8, "int8")


def test_two_node_plan_places_every_table(two_node_plan, tables):
    result, topology = two_node_plan
    features, token = tables
    plan = result.plan.plan
    assert set(plan) == {T.FEATURES_PATH, T.TOKENS_PATH}
    assert set(plan[T.FEATURES_PATH]) == {t.name for t in features}
    tok = plan[T.TOKENS_PATH][T.TOKEN_TABLE]
    assert tok.sharding_type == "row_wise" and len(tok.ranks) == 16
    # Row-wise shards tile the table's rows exactly, one per rank of both hosts.
    shards = sorted(tok.sharding_spec.shards, key=lambda s: s.shard_offsets[0])
    assert sum(s.shard_sizes[0] for s in shards) == token.num_embeddings
    assert all(a.shard_offsets[0] + a.shard_sizes[0] == b.shard_offsets[0] for a, b in zip(shards, shards[1:]))
    assert {s.placement.rank() for s in shards} == set(range(16))
    assert str(shards[9].placement) == f"rank:{shards[9].placement.rank()}/cuda:{shards[9].placement.rank() % 8}"
    # Estimates and the stats table came back from the planner.
    assert result.perf_ms and result.perf_ms > 0 and len(result.rank_perf_ms) == 16
    assert "Planner Statistics" in result.stats_text


def test_describe_plan_counts_every_weight(two_node_plan, tables):
    result, topology = two_node_plan
    features, token = tables
    d = describe_plan(result.plan, topology, features + [token], result)
    assert {t["name"] for t in d["tables"]} == {t.name for t in features + [token]}
    assert len(d["per_rank"]["hbm_bytes"]) == 16
    expected = 0
    for t in d["tables"]:
        replicas = len(t["ranks"]) if t["sharding_type"] == "data_parallel" else 1
        factor = 1 + (t["cache_load_factor"] or 0)
        expected += t["bytes"] * replicas * factor
    total = sum(d["per_rank"]["hbm_bytes"]) + sum(d["per_rank"]["ddr_bytes"])
    assert math.isclose(total, expected, rel_tol=1e-6)
    assert d["summary"]["hbm_bytes"]["max"] <= topology.devices[0].storage.hbm
    assert d["estimate"]["perf_ms"] == result.perf_ms


def test_uvm_caching_when_hbm_is_short():
    token = T.token_table_config(10**10, 64, "fp16")  # 1.19 TB
    topology = build_topology(16, 8, "cuda", hbm_gb=80, ddr_gb=256)
    module = T.build_tables_module([], token)
    with quiet_planner_logs():
        plan = make_plan(module, topology, 1024, {})
    ps = plan.plan[T.TOKENS_PATH][T.TOKEN_TABLE]
    assert ps.sharding_type == "row_wise" and ps.compute_kernel in ("fused_uvm_caching", "fused_uvm")
    d = describe_plan(plan, topology, [token])
    # 74.5 GB of rows per rank exceed the 68 GB of HBM left after the 15% reservation.
    assert d["summary"]["ddr_bytes"]["max"] == 10**10 // 16 * 64 * 2
    assert d["summary"]["hbm_bytes"]["max"] < 0.85 * 80 * GB < d["summary"]["ddr_bytes"]["max"]


def test_too_big_is_one_clear_error(tables):
    features, _ = tables
    token = T.token_table_config(10**12, 64, "fp16")  # 119 TB on 16 GPUs
    module = T.build_tables_module(features, token)
    topology = build_topology(**TWO_NODES)
    with quiet_planner_logs(), pytest.raises(IatError) as err:
        make_plan(module, topology, 1024, {})
    msg = str(err.value)
    assert "\n" not in msg
    for part in (
        "no sharding plan fits",
        "iat_tokens (1000000000000x64 fp16",
        "per rank HBM 80.0 GB",
        "DDR 128.0 GB",
        "over 16 ranks",
        "more ranks",
        "smaller embedding dim",
    ):
        assert part in msg, part


def test_constraints_parsing():
    c = parse_constraints(
        {
            "t_a": {
                "sharding_types": "row_wise",
                "compute_kernels": ["fused_uvm_caching"],
                "cache_load_factor": 0.3,
                "pooling_factors": [2.5],
            }
        }
    )
    assert c["t_a"].sharding_types == ["row_wise"] and c["t_a"].compute_kernels == ["fused_uvm_caching"]
    assert c["t_a"].cache_params.load_factor == 0.3 and c["t_a"].pooling_factors == [2.5]
    assert parse_constraints(None) == {}
    bad = [
        ({"t": {"sharding": ["row_wise"]}}, "unknown keys \\['sharding'\\]"),
        ({"t": {"sharding_types": ["rowwise"]}}, "unknown values \\['rowwise'\\]"),
        ({"t": {"compute_kernels": ["uvm"]}}, "compute_kernels: unknown values"),
        ({"t": {"cache_load_factor": 1.5}}, "strictly between 0 and 1"),
        ({"t": {"min_partition": "8"}}, "expected int"),
        ({"t": {"sharding_types": []}}, "non-empty list"),
        ({"t": ["row_wise"]}, "expected a mapping"),
        (["t"], "expected a mapping"),
    ]
    for spec, match in bad:
        with pytest.raises(IatError, match=match):
            parse_constraints(spec)


def test_constraints_must_name_known_tables(tables):
    features, token = tables
    module = T.build_tables_module(features, token)
    topology = build_topology(**TWO_NODES)
    with pytest.raises(IatError, match="unknown tables \\['t_nope'\\]"):
        make_plan(module, topology, 1024, parse_constraints({"t_nope": {}}))
    twrw = {T.TOKEN_TABLE: {"sharding_types": ["table_row_wise"]}}  # unpooled tables lack it
    with pytest.raises(IatError, match="not supported by EmbeddingCollectionSharder"):
        make_plan(module, topology, 1024, parse_constraints(twrw))
    impossible = {"t_genre": {"sharding_types": ["data_parallel"], "compute_kernels": ["fused"]}}
    with quiet_planner_logs(), pytest.raises(IatError, match="no \\(sharding type, compute kernel\\) pair"):
        make_plan(module, topology, 1024, parse_constraints(impossible))


def test_topology_memory():
    topo = build_topology(16, 8, "cuda", hbm_gb=141, ddr_gb=64)
    assert topo.devices[5].storage.hbm == 141 * GB and topo.devices[5].storage.ddr == 64 * GB
    assert topo.local_world_size == 8
    with pytest.raises(IatError, match="multiple of local world size"):
        build_topology(12, 8, "cuda", hbm_gb=80)
    if not torch.cuda.is_available():
        with pytest.raises(IatError, match="32 GB"):
            build_topology(8, 8, "cuda")


def test_plan_json_round_trip(two_node_plan, tmp_path):
    plan = two_node_plan[0].plan
    d = json.loads(json.dumps(plan_to_json(plan)))
    assert d["format"] == PLAN_FORMAT and d["version"] == PLAN_VERSION
    tok = d["plan"][T.TOKENS_PATH][T.TOKEN_TABLE]
    assert set(tok) >= {"sharding_type", "compute_kernel", "ranks", "shards"}
    assert set(tok["shards"][0]) == {"offsets", "sizes", "placement"}
    assert plan_from_json(d) == plan
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    assert load_plan(path) == plan
    assert not list(tmp_path.glob(".plan.json.*"))  # no temporary left behind
    tok["shards"][0]["placement"] = "rank:5/cuda:5"
    assert plan_from_json(d) != plan
    tok["shards"][0]["sizes"][0] += 1
    with pytest.raises(IatError, match="overlap"):
        plan_from_json(d)
    with pytest.raises(IatError, match="not a sharding plan"):
        plan_from_json({"plan": {}})


def test_loaded_plan_drives_distributed_model_parallel(tmp_path):
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    features = T.feature_table_configs(Schema.from_dict(SCHEMA), 8)
    token = T.token_table_config(1000, 8)
    cfg = {"cache_load_factor": 0.5}  # exercises cache_params in the JSON
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdzv", rank=0, world_size=1)
    try:
        module = T.build_tables_module(features, token)
        topology = build_topology(1, 1, "cpu", ddr_gb=4)
        with quiet_planner_logs():
            plan = make_plan(module, topology, 16, parse_constraints({"t_user_id": cfg}), pg=dist.group.WORLD)
        save_plan(plan, tmp_path / "plan.json")
        loaded = load_plan(tmp_path / "plan.json")
        assert loaded == plan
        dmp = DistributedModelParallel(module, device=torch.device("cpu"), plan=loaded)
        ids = KeyedJaggedTensor.from_lengths_sync(
            keys=[T.TOKEN_FEATURE], values=torch.tensor([1, 2, 999]), lengths=torch.tensor([2, 1])
        )
        assert dmp.module.tokens(ids)[T.TOKEN_FEATURE].values().shape == (3, 8)
    finally:
        dist.destroy_process_group()


def _cli_json(capsys, *args: str) -> dict:
    rc = plan_cli.cli([*args, "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


def test_cli_json_schema(tmp_path, capsys):
    schema = tmp_path / "schema.yaml"
    schema.write_text(json.dumps(SCHEMA))  # JSON is YAML
    r = _cli_json(
        capsys,
        "--schema",
        str(schema),
        *"--world-size 16 --local-world-size 8 --hbm-gb 80".split(),
        *"--token-rows 1e9 --token-dtype fp16 --save".split(),
        str(tmp_path / "plan.json"),
    )
    assert set(r) == {
        "format",
        "version",
        "inputs",
        "topology",
        "tables",
        "per_rank",
        "summary",
        "estimate",
        "stats_text",
        "plan_file",
    }
    assert (r["format"], r["version"]) == (plan_cli.REPORT_FORMAT, 1)
    assert set(r["inputs"]) == {
        "schema_source",
        "dim",
        "token_rows",
        "token_dim",
        "token_dtype",
        "history_len",
        "batch_size",
        "constraints",
    }
    assert set(r["topology"]) == {
        "world_size",
        "local_world_size",
        "compute_device",
        "hbm_bytes_per_rank",
        "ddr_bytes_per_rank",
        "hbm_bytes_total",
        "ddr_bytes_total",
        "ddr_source",
    }
    assert r["topology"]["ddr_source"] == "torchrec_default"
    assert set(r["tables"][0]) == {
        "name",
        "module",
        "rows",
        "dim",
        "dtype",
        "bytes",
        "sharding_type",
        "compute_kernel",
        "ranks",
        "num_shards",
        "cache_load_factor",
    }
    assert set(r["summary"]["hbm_bytes"]) == {"min", "max", "mean"}
    assert set(r["estimate"]) == {
        "perf_ms",
        "rank_perf_ms",
        "table_perf_ms",
        "hbm_bytes",
        "ddr_bytes",
        "num_proposals",
        "num_plans",
        "planning_seconds",
    }
    assert r["inputs"]["constraints"] == {T.TOKEN_TABLE: {"pooling_factors": [256.0]}}
    tok = next(t for t in r["tables"] if t["name"] == T.TOKEN_TABLE)
    assert (tok["rows"], tok["dtype"]) == (10**9, "fp16")
    assert load_plan(tmp_path / "plan.json").plan[T.TOKENS_PATH][T.TOKEN_TABLE]


def test_cli_data_dir_and_text(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": SCHEMA, "rows": 123_456}))
    args = [
        "--data",
        str(tmp_path),
        *"--world-size 8 --local-world-size 8 --hbm-gb 40".split(),
        "--constraints",
        '{"t_item_id": {"sharding_types": ["row_wise"]}}',
    ]
    r = _cli_json(capsys, *args)
    by_name = {t["name"]: t for t in r["tables"]}
    assert by_name[T.TOKEN_TABLE]["rows"] == 123_456  # from the manifest
    assert by_name["t_item_id"]["sharding_type"] == "row_wise"
    assert plan_cli.cli([*args, "--no-stats"]) == 0
    out = capsys.readouterr().out
    assert "t_item_id" in out and "row_wise" in out and "estimated sparse time per step" in out
    assert main(["plan", *args[:-2], "--constraints", '{"t_item_id": {"kernel": "x"}}']) == 2  # like every command
    assert "iat-rec: error: " in (err := capsys.readouterr().err) and "unknown keys ['kernel']" in err
    assert plan_cli.cli(["--world-size", "8"]) == 2  # usage error
    capsys.readouterr()


def test_quick_sweep_runs(tmp_path):
    from benchmarks import planner_sweep

    assert planner_sweep.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "planner_sweep.json").read_text())
    assert len(data["results"]) == 4 and all(r["feasible"] for r in data["results"])
    assert "| world |" in (tmp_path / "planner_sweep.md").read_text()
    for name in ("planner_memory.png", "planner_step_time.png", "planner_time.png"):
        assert 0 < (tmp_path / name).stat().st_size < 200_000
    (tmp_path / "planner_sweep.md").unlink()
    assert planner_sweep.main(["--render-only", "--out", str(tmp_path)]) == 0  # redraws from the JSON
    assert "| world |" in (tmp_path / "planner_sweep.md").read_text()


def test_the_token_table_alone_plans_without_a_schema(capsys):
    r = _cli_json(capsys, *"--token-rows 1e9 --world-size 8 --local-world-size 8".split(), *"--hbm-gb 80".split())
    assert [t["name"] for t in r["tables"]] == [T.TOKEN_TABLE] and r["inputs"]["schema_source"] is None
    assert main([*"plan --world-size 8 --local-world-size 8 --hbm-gb 80".split()]) == 2
    assert "give its --token-rows" in capsys.readouterr().err


def test_the_shipped_demo_schema_is_the_demo_logs():
    from iat_rec.data.schema import load_schema
    from iat_rec.data.synth import SynthConfig, synth_schema

    shipped = load_schema(REPO / "iat_rec" / "configs" / "demo_schema.yaml")
    assert shipped == synth_schema(SynthConfig(users=2000, mean_instances=100.0, seed=0))


def test_placement_constraints_replicate_small_tables_and_keep_fp16_tables_fused():
    def table(name: str, rows: int, dtype=DataType.FP32) -> EmbeddingBagConfig:
        return EmbeddingBagConfig(
            name=name, feature_names=[name], num_embeddings=rows, embedding_dim=8, data_type=dtype
        )

    given = {"t_named": ParameterConstraints(sharding_types=["table_wise"])}
    tables = [table("t_small", 10), table("t_named", 5), table("t_big", 10_000), table("t_half", 10_000, DataType.FP16)]
    got = placement_constraints(tables, 32, given)
    assert got["t_small"].sharding_types == ["data_parallel"] and got["t_named"] is given["t_named"]
    assert "t_big" not in got and "data_parallel" not in got["t_half"].sharding_types
    assert placement_constraints(tables[2:3], 0, None) is None
    with pytest.raises(IatError, match="fp16 tables \\['t_tiny'\\]"):
        placement_constraints([table("t_tiny", 4, DataType.FP16)], 32, None)
