"""Stage 1 on CPU with gloo: training, exact resume, the saved plan, the stored token."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from iat_rec.batching.batch import make_batch
from iat_rec.batching.loaders import user_windows
from iat_rec.data.instance_log import InstanceLog, time_split
from iat_rec.dist import checkpoint as ckpt
from iat_rec.dist.env import DistEnv
from iat_rec.sharding.plan_json import load_plan, plan_to_json
from iat_rec.tokens.export import token_sources
from iat_rec.tokens.table import TokenTable
from iat_rec.train.config import CompressConfig, from_dict
from iat_rec.train.stage1 import (
    build_compressor,
    first_train_step,
    instances_per_batch,
    load_stage1,
    make_dataset,
    plan_batch,
)
from iat_rec.train.trainer import Trainer, make_optimizer, shard
from tests.helpers import STAGE1, on_ranks, run_cli, synth_log


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_one_rank_temporal_run_pipelines_both_sharded_inputs(tiny_log, tmp_path):
    """Learning is tested with margins in test_learning.py; here: the run's shape."""
    run = tmp_path / "t"
    run_cli(
        "compress",
        "--data",
        str(tiny_log),
        "--out",
        str(run),
        *"--nproc 1 --scheme temporal --batch-size 64 --steps 6".split(),
        *"--slices 3 --no-progress --emb-dim 8 --hidden 64".split(),
    )
    result = json.loads((run / "result.json").read_text())
    # the EBC and the shared-id EC inputs are both pipelined (a KJT changed in the model would not be)
    assert result["pipelined_modules"] == ["ShardedEmbeddingBagCollection", "ShardedEmbeddingCollection"]
    # time-consistent export's snapshots: the untrained model and 2 more over the epoch
    steps_per_epoch = len(
        make_dataset(
            InstanceLog(tiny_log),
            time_split(InstanceLog(tiny_log))["train"],
            from_dict(CompressConfig, json.loads((run / "run.json").read_text())["config"]),
            0,
            1,
        )
    )
    want = sorted({0, steps_per_epoch // 3, 2 * steps_per_epoch // 3} & set(range(6)))
    assert sorted(int(p.name[5:]) for p in (run / "snapshots").iterdir()) == want


def test_two_rank_user_order_run(stage1_run):
    result = json.loads((stage1_run / "result.json").read_text())
    assert result["steps"] == 12
    cfg = from_dict(CompressConfig, json.loads((stage1_run / "run.json").read_text())["config"])
    log = InstanceLog(cfg.data)
    valid_rows = sum(  # every real row of the 2 evaluated batches of each rank, padding left out
        float(make_dataset(log, time_split(log, cfg.split)["valid"], cfg, rank, 2)[i].weights.sum())
        for rank in (0, 1)
        for i in range(2)
    )
    assert result["valid"]["click"]["n"] == valid_rows
    assert (stage1_run / "checkpoints" / "latest").read_text().strip() == "step_00000012"
    assert list((stage1_run / "tb").iterdir()), "TensorBoard events written"


@pytest.mark.parametrize("replicate_rows", [0, 32])
def test_resume_continues_exactly(tiny_log, tmp_path, replicate_rows):
    """5 + 5 resumed steps equal 10, also with replicated tables (their optimizer state goes through DCP)."""
    args = ["--data", str(tiny_log), "--nproc", "2", *STAGE1, "--replicate-rows", str(replicate_rows)]
    i = args.index("--steps")
    del args[i : i + 2]
    full, part = tmp_path / "full", tmp_path / "part"
    run_cli("compress", *args, "--out", str(full), "--steps", "10")
    run_cli("compress", *args, "--out", str(part), "--steps", "5")
    run_cli("compress", *args, "--out", str(part), "--steps", "10", "--resume")
    assert losses(part)[-5:] == losses(full)[-5:]
    plan = json.loads((full / "plan.json").read_text())["plan"]["base.sparse"]
    replicated = {t for t, ps in plan.items() if ps["sharding_type"] == "data_parallel"}
    assert replicated, "the planner replicates the 4-row tables by itself; --replicate-rows adds more"
    if replicate_rows:
        assert replicated == {f"t_{f.name}" for f in InstanceLog(tiny_log).schema.sparse if f.num_embeddings <= 32}


def test_time_limited_jobs_resume_to_the_same_run(tiny_log, tmp_path):
    """--time-limit: a job stops after its current step once past the limit (one step at least),
    saves a checkpoint and exits 75 without result.json; --resume jobs finish the run as one
    uninterrupted run would (the same losses and the same time-consistent snapshots)."""
    from iat_rec.cli import main
    from iat_rec.train.trainer import EXIT_STOPPED, STOPPED

    args = ["--data", str(tiny_log), "--nproc", "2", *STAGE1, "--num-workers", "1"]
    i = args.index("--steps")
    args[i + 1] = "6"
    full, part = tmp_path / "full", tmp_path / "part"
    run_cli("compress", *args, "--out", str(full))
    assert main(["compress", *args, "--out", str(part), "--time-limit", "1e-9"]) == EXIT_STOPPED
    assert json.loads((part / STOPPED).read_text())["step"] == 1 and not (part / "result.json").exists()
    assert main(["compress", *args, "--out", str(part), "--time-limit", "1e-9", "--resume"]) == EXIT_STOPPED
    assert json.loads((part / STOPPED).read_text())["step"] == 2
    run_cli("compress", *args, "--out", str(part), "--resume")
    assert not (part / STOPPED).exists() and json.loads((part / "result.json").read_text())["steps"] == 6
    assert losses(part) == losses(full) and len(losses(full)) == 6
    snaps = sorted(p.name for p in (full / "snapshots").iterdir())
    assert snaps and snaps == sorted(p.name for p in (part / "snapshots").iterdir())
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    for name in snaps:
        weights = []
        for run in (full, part):
            dcp_to_torch_save(run / "snapshots" / name, tmp_path / f"{run.name}-{name}.pt")
            weights.append(torch.load(tmp_path / f"{run.name}-{name}.pt", weights_only=True)["model"])
        assert weights[0].keys() == weights[1].keys() and len(weights[0]) > 10
        for k, v in weights[0].items():
            assert torch.equal(v, weights[1][k]), (name, k)


def test_compiled_dense_part_trains_as_the_eager_one(tiny_log, tmp_path):
    """--compile (the dense part compiled in place, as CUDA graphs on a GPU): TorchRec's pipeline
    still traces the model and pipelines its sharded lookups, and the run's losses are the
    eager run's up to the compiled kernels' rounding."""
    args = ["--data", str(tiny_log), "--nproc", "2", *STAGE1]
    i = args.index("--steps")
    args[i + 1] = "4"
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    run_cli("compress", *args, "--out", str(eager))
    run_cli("compress", *args, "--out", str(compiled), "--compile")
    assert len(losses(eager)) == 4 and losses(compiled) == pytest.approx(losses(eager), rel=1e-4, abs=1e-5)
    result = json.loads((compiled / "result.json").read_text())
    assert result["pipelined_modules"] == json.loads((eager / "result.json").read_text())["pipelined_modules"]
    assert result["pipelined_modules"], "the sharded lookups are pipelined"


def test_saved_plan_reloads(stage1_run):
    plan = load_plan(stage1_run / "plan.json")
    assert "base.sparse" in plan.plan
    assert plan_to_json(plan) == json.loads((stage1_run / "plan.json").read_text())


def first_window_tokens(env: DistEnv, run: str, tokens: str) -> dict:
    """On one rank (run by on_ranks, a fresh process group): recomputes the tokens of the first
    user window with the stage-1 model the table says encoded them (time-consistent export: the
    snapshot before the window's training step), loaded on this world size, beside the token
    table's rows."""
    cfg, info, log = load_stage1(run)
    table = TokenTable(tokens)
    dmp, _ = shard(build_compressor(log, cfg), env, cfg, plan_out=None)
    start, n = user_windows(log, np.arange(log.rows), cfg.window)[0]
    sources, source_of_row = token_sources(run, cfg, info, log, table.manifest["tokens_from"])
    source = sources[source_of_row[start]]
    ckpt.load_weights(source, dmp)
    dmp.eval()
    model = dmp.module
    rows = np.full(cfg.window, -1)
    rows[:n] = np.arange(start, start + n)
    with torch.no_grad():
        batch = make_batch(log, rows)
        pre = model.encode(batch)
        valid = batch.weights.view(1, -1) > 0
        post = model.sit(pre.view(1, cfg.window, -1), valid)[0]
    stored = table.read_rows(int(start), int(start + n)).float()
    step = int(first_train_step(log, cfg, info["world_size"])[start])
    return {
        "pre_sit": pre[:n].tolist(),
        "post_sit": post[:n].tolist(),
        "stored": stored.tolist(),
        "source": source.name,
        "train_step": step,
    }


def test_stored_token_is_the_pre_sit_token_on_another_world_size(stage1_run, tokens):
    """Written by 2 ranks, recomputed by 1 rank with a new plan: the rows are the pre-SIT tokens."""
    (got,) = on_ranks(first_window_tokens, stage1_run, tokens, nproc=1)
    stored, pre, post = (np.array(got[k]) for k in ("stored", "pre_sit", "post_sit"))
    np.testing.assert_allclose(stored, pre, atol=1e-5)
    # a training row's token comes from the snapshot taken before the step that trained on it
    assert got["source"].startswith("step_") and int(got["source"][5:]) <= got["train_step"], got
    assert np.abs(stored - post).max() > 1e-3  # SIT changes the token; the table holds the one before


def test_streaming_prefixes_windows_with_frozen_earlier_tokens(tiny_log, tokens, tmp_path):
    run = tmp_path / "stream"
    run_cli(
        "compress",
        "--data",
        str(tiny_log),
        "--out",
        str(run),
        "--nproc",
        "2",
        *STAGE1,
        "--stream",
        "--tokens",
        str(tokens),
        "--prefix",
        "8",
    )
    result = json.loads((run / "result.json").read_text())
    assert result["pipelined_modules"] == [
        "ShardedEmbeddingBagCollection",
        "ShardedEmbeddingCollection",
        "ShardedEmbeddingCollection",
    ]
    assert all(np.isfinite(losses(run)))
    exported = tmp_path / "tok2"
    run_cli("export", "--stage1", str(run), "--out", str(exported), "--nproc", "2", "--no-progress")
    assert (exported / "manifest.json").is_file()


def test_streaming_refuses_a_table_of_another_log(tiny_log, tokens, tmp_path, capsys):
    from iat_rec.cli import main

    other = synth_log(tmp_path / "other", users=10, mean_instances=5, seed=3)
    assert (
        main(
            [
                "compress",
                "--data",
                str(other.path),
                "--out",
                str(tmp_path / "r"),
                *"--scheme user --stream --tokens".split(),
                str(tokens),
            ]
        )
        == 2
    )
    assert "was exported from instance log" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_batch_size_counts_instances_in_both_schemes(tiny_log):
    """One meaning of --batch-size: a temporal batch holds batch_size instances, a user-order
    batch batch_size // window windows of window instances (so one YAML gives both schemes
    the same instances a step, whether run by compress or by experiment)."""
    log = InstanceLog(tiny_log)
    train = time_split(log)["train"]
    sizes = {}
    for scheme in ("temporal", "user"):
        cfg = CompressConfig(data=str(tiny_log), scheme=scheme, window=8, batch_size=64)
        batch = make_dataset(log, train, cfg, 0, 1)[0]
        sizes[scheme] = batch.weights.numel()
    assert sizes == {"temporal": 64, "user": 64}
    small = CompressConfig(data=str(tiny_log), scheme="user", window=8, batch_size=5)  # less than a window: one
    assert make_dataset(log, train, small, 0, 1)[0].weights.numel() == 8


def replicated_tables_after_training(env: DistEnv, data: str, out: str) -> dict:
    """On each rank (run by on_ranks): stage 1 with --replicate-rows 32 for 6 steps; which tables
    the plan replicates, which optimizer steps them, and whether every rank's copy is the same."""
    cfg = from_dict(CompressConfig, {"data": data, "out": out, "scheme": "user", "window": 8, "batch_size": 64})
    cfg.steps, cfg.progress, cfg.replicate_rows, cfg.model.emb_dim, cfg.model.hidden = 6, False, 32, 8, 64
    torch.manual_seed(cfg.seed)
    log = InstanceLog(data)
    train_rows = time_split(log, cfg.split)["train"]
    dmp, plan = shard(build_compressor(log, cfg), env, cfg, plan_out=None, plan_batch=plan_batch(cfg))
    replicated = sorted(t for t, ps in plan.plan["base.sparse"].items() if ps.sharding_type == "data_parallel")
    keys = [f"base.sparse.embedding_bags.{t}.weight" for t in replicated]
    before = {k: dmp.state_dict()[k].detach().clone() for k in keys}
    optimizer = make_optimizer(dmp, cfg)
    ds = make_dataset(log, train_rows, cfg, env.rank, env.world_size)
    Trainer(env, cfg, dmp, optimizer, ds, None, list(log.schema.task_names), instances_per_batch(cfg)).fit()
    after = {k: dmp.state_dict()[k].detach() for k in keys}
    copies = [None] * env.world_size
    torch.distributed.all_gather_object(copies, {k: v.tolist() for k, v in after.items()})
    dense_state = optimizer.state_dict()["state"]
    return {
        "replicated": replicated,
        "rows": {t: int(before[f"base.sparse.embedding_bags.{t}.weight"].shape[0]) for t in replicated},
        "same_on_every_rank": all(c == copies[0] for c in copies),
        "trained": all(not torch.equal(before[k], after[k]) for k in keys),
        # RowWiseAdagrad (the sparse optimizer) keeps a per-row "sum"; Adam would keep exp_avg
        "sparse_optimizer_state": all(set(dense_state.get(k, {})) == {"step", "sum"} for k in keys),
        "fused": sorted(k for k, _ in dmp.fused_optimizer.optimizers),
    }


def test_small_tables_replicated_train_in_sync_with_the_dense_optimizer(tiny_log, tmp_path):
    """--replicate-rows: tables of <= 32 rows are data-parallel, DDP keeps every copy equal and
    the sparse optimizer (row-wise Adagrad, as for the fused tables) steps them after the
    all-reduce; the fused optimizers hold only the other tables."""
    got = on_ranks(replicated_tables_after_training, tiny_log, tmp_path / "r")
    small = {f"t_{f.name}" for f in InstanceLog(tiny_log).schema.sparse if f.num_embeddings <= 32}
    for rank in got:
        assert set(rank["replicated"]) == small and len(small) == 12, rank["replicated"]
        assert rank == {**rank, "same_on_every_rank": True, "trained": True, "sparse_optimizer_state": True}
        assert not any(t in k for t in small for k in rank["fused"]), rank["fused"]


def bf16_against_fp32(env: DistEnv, data: str, scheme: str) -> dict:
    """On one rank (run by on_ranks): one sharded compressor built with --bf16, run on one
    batch with its bf16 switch off and on; per output (token, logits, loss) its dtype with
    bf16, and how far the two results are apart."""
    log = InstanceLog(data)
    cfg = CompressConfig(data=data, scheme=scheme, window=8, batch_size=64, bf16=True)
    cfg.device = "cpu"
    dmp, _ = shard(build_compressor(log, cfg), env, cfg, plan_out=None)
    model, batch = dmp.module, make_dataset(log, time_split(log)["train"], cfg, 0, 1)[0]
    built, out = model.bf16, {}
    with torch.no_grad():
        for bf16 in (False, True):
            model.bf16 = bf16
            loss, (_, logits, *_) = model(batch)
            out[bf16] = {"token": model.encode(batch), "logits": logits, "loss": loss}
    return {
        k: {"dtype": str(out[True][k].dtype), "max_diff": float((out[True][k] - out[False][k]).abs().max())}
        for k in out[True]
    } | {"built_bf16": built}


def tbe_bounds_checks(env: DistEnv, data: str) -> dict:
    """On one rank (run by on_ranks): the bounds-check mode of every FBGEMM kernel of a sharded
    compressor, sharded as training does and as the benchmarks do (``bounds_check=False``)."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode

    log = InstanceLog(data)
    cfg = CompressConfig(data=data, batch_size=64, device="cpu")
    out = {}
    for check in (True, False):
        dmp, plan = shard(build_compressor(log, cfg), env, cfg, plan_out=None, bounds_check=check)
        base = dmp.module.base
        lookups = [lk for sharded in (base.sparse, base.shared) for lk in sharded._lookups]  # not submodules
        kernels = [m for lk in lookups for m in lk.modules() if hasattr(m, "bounds_check_mode_int")]
        out["on" if check else "off"] = [
            sorted({BoundsCheckMode(m.bounds_check_mode_int).name for m in kernels}),
            len(kernels),
        ]
    return out


def test_benchmarks_shard_with_fbgemms_bounds_check_off(tiny_log):
    got = on_ranks(tbe_bounds_checks, tiny_log, nproc=1)[0]
    assert got["on"][0] == ["WARNING"] and got["on"][1] > 0  # FBGEMM's default: ids checked, clamped
    assert got["off"] == [["NONE"], got["on"][1]]


@pytest.mark.parametrize("scheme", ["temporal", "user"])
def test_bf16_runs_the_dense_part_in_bf16_and_keeps_tokens_and_loss_fp32(tiny_log, scheme):
    """--bf16: the same weights give fp32 tokens, logits and loss that differ from fp32's by
    bf16 rounding only (so autocast is on, and nothing else changed)."""
    got = on_ranks(bf16_against_fp32, tiny_log, scheme, nproc=1)[0]
    assert got.pop("built_bf16") is True
    for what, r in got.items():
        assert r["dtype"] == "torch.float32", (what, r)
        assert 0 < r["max_diff"] < 0.05, (what, r)
