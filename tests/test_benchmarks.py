"""Every throughput benchmark runs at tiny size on CPU through ``iat-rec bench NAME`` and
writes a JSON with the documented keys. No timing assertions: CI machines share cores."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.common import RESULT_KEYS, ROW_KEYS, SUMMARY_KEYS
from iat_rec.cli import main
from tests.helpers import REPO, synth_log

TINY = [*"--device cpu --tiny --warmup 1 --iters 2".split()]


def bench(name: str, out: Path, *extra: str) -> dict:
    assert main(["bench", name, *TINY, "--out", str(out), *extra]) == 0
    path = out / f"{name}-cpu.json"
    assert path.is_file(), f"{name} wrote no {path.name}"
    data = json.loads(path.read_text())
    assert set(RESULT_KEYS) <= set(data), f"{name}: missing {set(RESULT_KEYS) - set(data)}"
    assert data["benchmark"] == name and data["tiny"] is True
    assert {"name", "slug", "type"} <= set(data["device"]) and data["device"]["slug"] == "cpu"
    assert {"torch", "torchrec", "fbgemm_gpu"} <= set(data["versions"]) and data["versions"]["torchrec"]
    assert data["limits"]["copy_gbs"] > 0 and data["limits"]["bf16_tflops"] > 0
    assert data["rows"] and data["summary"]
    for row in data["rows"]:
        assert set(ROW_KEYS) <= set(row), f"{name}: row {row.get('case')} lacks {set(ROW_KEYS) - set(row)}"
        assert row["ms_per_step"] > 0 and math.isfinite(row["samples_per_s"]) and row["samples_per_s"] > 0
    for item in data["summary"]:
        assert set(SUMMARY_KEYS) <= set(item)
        assert item["meets_target"] is None  # targets are for GPUs
    return data


def cases(data: dict) -> dict[str, dict]:
    return {r["case"]: r for r in data["rows"]}


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the scaling benchmark launches `python -m benchmarks.scaling`


def test_bench_list(capsys):
    assert main(["bench", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("tbe", "compress", "fetch", "rank", "loader", "scaling"))
    assert main(["bench", "nope"]) == 2


def test_tbe(tmp_path):
    data = bench("tbe", tmp_path)
    rows = cases(data)
    steps = ("forward", "forward_backward", "pipelined_step")
    assert set(rows) == {f"{s}/{c}" for s in ("stage1", "wide") for c in steps}
    for r in rows.values():
        assert r["gbs"] > 0 and r["copy_ratio"] > 0 and r["plan"] == ["table_wise/fused"]
    # the trainer's pipeline drives the step, with the sharded EBC pipelined
    assert rows["wide/pipelined_step"]["pipelined_modules"] == ["ShardedEmbeddingBagCollection"]
    assert rows["wide/pipelined_step"]["bytes_per_step"] == rows["wide/forward_backward"]["bytes_per_step"]


def test_tbe_fp16_weights_count_half_the_row_bytes(tmp_path):
    fp32 = cases(bench("tbe", tmp_path / "a", *"--sets wide".split()))["wide/forward"]
    data = bench("tbe", tmp_path / "b", *"--sets wide --weights fp16".split())
    fp16 = cases(data)["wide/forward"]
    pooled_out = fp32["bytes_per_step"] - fp32["lookups_per_step"] * fp32["dim"] * 4  # B x T x D x 4, unchanged
    assert fp16["bytes_per_step"] == fp32["lookups_per_step"] * fp32["dim"] * 2 + pooled_out
    assert data["config"]["wide"]["table_bytes"] == fp16["rows_total"] * fp16["dim"] * 2


def test_compress(tmp_path):
    rows = cases(bench("compress", tmp_path))
    assert set(rows) == {"temporal", "user"}
    assert rows["temporal"]["samples_per_step"] == rows["user"]["samples_per_step"]
    assert all(
        r["pipelined_modules"] == ["ShardedEmbeddingBagCollection", "ShardedEmbeddingCollection"] for r in rows.values()
    )
    assert 0 < rows["user"]["valid_fraction"] <= 1
    assert all(r["dense_flops_fwd"] > 0 and r["dense_mfu"] > 0 for r in rows.values())


def test_compress_replicated_small_tables_and_fp16_weights(tmp_path):
    rows = cases(bench("compress", tmp_path / "a", *"--schemes temporal --replicate-rows 32".split()))
    assert "data_parallel/dense" in rows["temporal"]["plan"]
    data = bench("compress", tmp_path / "b", *"--schemes temporal --table-dtype fp16".split())
    assert data["config"]["model"]["table_dtype"] == "fp16"
    assert "data_parallel/dense" not in cases(data)["temporal"]["plan"]


def test_fetch(tmp_path):
    data = bench("fetch", tmp_path)
    rows = cases(data)
    assert set(rows) == {
        "index_select",
        "fbgemm_index_select",
        "model_ranges",
        "model_sharded_ranges",
        "all_to_all",
        "ec_lookup",
        "ids_kjt",
        "ranges_device",
    }
    # the model's range paths (torch on CPU, Triton on CUDA; row shards) give the reference's padded tokens
    config = data["config"]
    assert config["ids_match"] and config["model_ranges_matches"] and config["model_sharded_ranges_matches"]
    assert not data["notes"]
    assert rows["ranges_device"]["h2d_bytes_per_step"] < rows["ids_kjt"]["h2d_bytes_per_step"]
    for r in rows.values():
        assert r["gbs"] > 0 and r["copy_ratio"] > 0 and r["index_select_ratio"] > 0


def test_fetch_with_another_sharding_and_output_dtype(tmp_path):
    data = bench("fetch", tmp_path, *"--token-sharding table_wise --output-dtype fp16".split())
    assert data["config"]["plan"] == {"iat_tokens": "table_wise/fused"}
    assert data["config"]["output_element_bytes"] == 2


def test_rank(tmp_path):
    data = bench("rank", tmp_path, "--bf16")
    rows = cases(data)
    assert set(rows) == {"iat", "handcrafted", "reader_only"}
    assert rows["iat"]["max_len"] == rows["handcrafted"]["max_len"] == data["config"]["max_len"]
    for r in rows.values():
        assert r["reader_flops_fwd"] > 0 and r["reader_mfu"] > 0
    assert rows["iat"]["dense_mfu"] > 0 and rows["handcrafted"]["dense_flops_fwd"] > 0
    assert len(rows["iat"]["pipelined_modules"]) == 3  # feature EBC, shared-id EC and token EC
    assert any(s["metric"].startswith("IAT / hand-crafted") for s in data["summary"])


@pytest.mark.parametrize(
    "option, field, value", [("--length-bucket 4", "length_bucket", 4), ("--pack-history", "pack_history", True)]
)
def test_rank_without_padding_counts_the_flops_it_reads(tmp_path, option, field, value):
    """With --length-bucket or --pack-history the step skips work on padding: the reader FLOPs
    (and so its MFU) count what it executes, never the padding it skips."""
    plain = cases(bench("rank", tmp_path / "plain", "--history", "iat", "--no-reader-only"))["iat"]
    data = bench("rank", tmp_path / "lean", "--history", "iat", "--no-reader-only", *option.split())
    assert data["config"]["ranker"][field] == value
    assert 0 < cases(data)["iat"]["reader_flops_fwd"] < plain["reader_flops_fwd"]


def test_loader(tmp_path):
    rows = cases(bench("loader", tmp_path))
    assert {"stage1_temporal", "stage2_iat", "stage2_both", "gpu_step_compress_temporal", "gpu_step_rank_iat"} <= set(
        rows
    )
    for name in ("stage1_temporal", "stage2_iat"):
        assert rows[name]["per_core_samples_per_s"] > 0 and rows[name]["ratio_cores"] > 0


@pytest.mark.slow
def test_scaling(tmp_path):
    data = bench("scaling", tmp_path)
    rows = data["rows"]
    assert [(r["stage"], r["world_size"]) for r in rows] == [(1, 1), (2, 1), (1, 2), (2, 2)]
    assert data["config"]["backend"] == "gloo" and data["config"]["same_plan_types"] is True
    for r in rows[2:]:
        assert r["speedup_vs_1"] > 0 and r["efficiency"] == r["speedup_vs_1"] / 2 and len(r["rank_ms_per_step"]) == 2
    estimates = data["config"]["planner_estimates"]  # the planner's view of 8 and 64 ranks
    assert [(e["stage"], e["world_size"]) for e in estimates] == [(1, 8), (1, 64), (2, 8), (2, 64)]
    assert all(e["planner_sparse_ms"] > 0 and 0 < e["estimated_efficiency"] <= 1.5 for e in estimates)


def test_profile_writes_the_top_ops_of_each_case(tmp_path):
    prof = tmp_path / "prof"
    bench("tbe", tmp_path, "--sets", "stage1", "--profile", str(prof))
    files = sorted(p.name for p in prof.iterdir())
    assert files == [f"tbe-stage1_{c}-profile.txt" for c in ("forward", "forward_backward", "pipelined_step")]
    text = (prof / files[1]).read_text()
    assert "Self CPU" in text and "embedding" in text.lower()


def oracle_argv(tmp_path, out: str, seed: int) -> list[str]:
    """benchmarks.oracle_tokens' argv for the log at tmp_path/log (40 users, 10 instances each)."""
    return [
        "--data",
        str(tmp_path / "log"),
        "--out",
        str(tmp_path / out),
        *f"--users 40 --mean-instances 10 --seed {seed}".split(),
    ]


def test_oracle_tokens_hold_the_generators_hidden_state(tmp_path):
    from benchmarks.oracle_tokens import main as oracle
    from iat_rec.data import synth
    from iat_rec.tokens.table import TokenTable

    args = dict(users=40, mean_instances=10, seed=2)
    synth_log(tmp_path / "log", **args)
    oracle(oracle_argv(tmp_path, "tok", seed=2))
    hidden: dict = {}
    synth.build_columns(synth.SynthConfig(**args), hidden=hidden)
    table = TokenTable(tmp_path / "tok")
    rows = table.read_rows(0, table.rows).numpy()
    np.testing.assert_array_equal(rows[:, :8], hidden["z"])
    assert table.stats()[1].shape == (16,)
    with pytest.raises(Exception, match="not the log of these generator arguments"):
        oracle(oracle_argv(tmp_path, "t2", seed=3))


def test_shuffled_copy_permutes_rows_and_keeps_side_info(tmp_path):
    from benchmarks.oracle_tokens import main as tables
    from iat_rec.tokens.table import TokenTable

    synth_log(tmp_path / "log", users=40, mean_instances=10, seed=2)
    tables(oracle_argv(tmp_path, "tok", seed=2))
    tables(["--shuffle", str(tmp_path / "tok"), "--out", str(tmp_path / "shuf")])
    a, b = TokenTable(tmp_path / "tok"), TokenTable(tmp_path / "shuf")
    ra, rb = a.read_rows(0, a.rows).numpy(), b.read_rows(0, b.rows).numpy()
    assert not np.array_equal(ra, rb)
    np.testing.assert_array_equal(np.sort(ra, axis=0), np.sort(rb, axis=0))  # the same rows, other order
    np.testing.assert_array_equal(a.side("label_time"), b.side("label_time"))


def test_targets_compose_met_missed_and_missing(tmp_path):
    """targets.py reads each metric from its benchmark JSON, says met or missed against the
    issue's target, and names every metric it could not read (never a silent gap)."""
    from benchmarks import targets

    device = {"name": "NVIDIA H200", "slug": "nvidia-h200"}
    row = {"case": "model_ranges", "copy_ratio": 0.93}
    (tmp_path / "fetch.json").write_text(json.dumps({"tiny": False, "device": device, "config": {}, "rows": [row]}))
    fast = [{"case": "iat", "samples_per_s": 216_000.0, "reader_mfu": 0.038}]
    (tmp_path / "rank-packed.json").write_text(
        json.dumps({"tiny": False, "device": device, "config": {}, "rows": fast})
    )
    (tmp_path / "rank-d128.json").write_text(json.dumps({"tiny": True, "device": device, "config": {}, "rows": fast}))
    out = targets.compose(tmp_path, "cmd")
    assert out["device"]["slug"] == "nvidia-h200" and out["command"] == "cmd"
    assert out["metrics"]["fetch_copy_ratio_model_path"] == 0.93 and out["met"]["fetch_copy_ratio_model_path"]
    assert out["metrics"]["stage2_samples_per_s"] == 216_000.0 and out["met"]["stage2_samples_per_s"] is False
    assert out["metrics"]["reader_mfu_d128"] is None and "tiny" in out["missing"]["reader_mfu_d128"]
    assert (
        out["metrics"]["stage1_user_samples_per_s"] is None
        and "not in this run" in out["missing"]["stage1_user_samples_per_s"]
    )
    assert set(out["metrics"]) == set(targets.METRICS)


def test_efficiency_hand_crafted_fields_against_one_token(tmp_path):
    data = bench("efficiency", tmp_path)
    rows = cases(data)
    assert set(rows) == {f"iat-T{t}" for t in (8, 16)} | {f"handcrafted-K{k}-T{t}" for k in (2, 4) for t in (8, 16)}
    for r in rows.values():
        assert r["samples_per_s"] > 0 and r["batch"] * r["max_len"] == data["config"]["tokens_per_step"]
        assert r["vs_iat_samples"] > 0 and r["vs_iat_memory"] > 0
    assert rows["iat-T8"]["vs_iat_samples"] == 1.0
    assert data["config"]["sequence_order"][:2] == ["item_id", "category"]  # the schema's own sequence first


def test_efficiency_sequence_view_leaves_the_log_alone(tmp_path):
    from benchmarks.efficiency import with_sequence

    log = synth_log(tmp_path / "log", users=20, mean_instances=5)
    view = with_sequence(log, 4)
    assert len(view.schema.sequence) == 4 and view.schema.sequence[:2] == log.schema.sequence
    assert log.schema.sequence == ("item_id", "category") and view.rows == log.rows
    with pytest.raises(ValueError):
        with_sequence(log, len(log.schema.sparse) + 1)


def test_e2e_stage_runs_once_and_records_its_failure(tmp_path):
    """benchmarks/e2e.py's stages: timed with their exit code; one whose output is complete is
    skipped (a job cut at its limit resumes); a failure keeps its log's tail."""
    import sys

    from benchmarks.e2e import run_stage

    done = tmp_path / "out.txt"
    argv = [sys.executable, "-c", f"open({str(done)!r}, 'w').write('x')"]
    first = run_stage("s", argv, done, tmp_path / "s.log")
    assert first["exit"] == 0 and first["wall_s"] > 0 and done.read_text() == "x"
    assert "skipped" in run_stage("s", argv, done, tmp_path / "s.log")
    bad = run_stage("b", [sys.executable, "-c", "raise SystemExit('boom')"], tmp_path / "never", tmp_path / "b.log")
    assert bad["exit"] == 1 and "boom" in bad["log_tail"]


def test_e2e_cuts_a_stage_at_the_jobs_time_and_sums_its_jobs(tmp_path):
    import sys

    from benchmarks.e2e import merge, run_stage

    # a stage that starts a child of its own (as iat-rec starts its ranks): a cut kills both
    pid_file = tmp_path / "child.pid"
    code = (
        "import pathlib, subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"pathlib.Path({str(pid_file)!r}).write_text(str(c.pid)); time.sleep(60)"
    )
    start = time.perf_counter()
    cut = run_stage("s", [sys.executable, "-c", code], tmp_path / "never", tmp_path / "s.log", timeout=3.0)
    assert cut["cut"] and time.perf_counter() - start < 30 and "log_tail" not in cut
    child = int(pid_file.read_text())

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie is dead, not yet reaped
        except FileNotFoundError:
            return False

    deadline = time.perf_counter() + 5
    while alive(child) and time.perf_counter() < deadline:
        time.sleep(0.1)
    assert not alive(child), "the stage's child outlived the cut"
    # a stage that dies by itself (killed for memory, a crash) within the job's time is a failure, not a cut
    crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    died = run_stage("c", crash, tmp_path / "never", tmp_path / "c.log", timeout=30)
    assert died["exit"] == -9 and "cut" not in died and "log_tail" in died
    # the job itself killed (a scheduler's SIGKILL): its stage goes with it (the stage's own
    # children are its business: iat-rec's ranks die with their launcher)
    stage_pid = tmp_path / "stage.pid"
    stage = f"import os, pathlib, time; pathlib.Path({str(stage_pid)!r}).write_text(str(os.getpid())); time.sleep(60)"
    job = (
        "import sys; from pathlib import Path; from benchmarks.e2e import run_stage; "
        f"run_stage('s', [sys.executable, '-c', {stage!r}], Path('/nonexistent'), Path({str(tmp_path / 'j.log')!r}))"
    )
    runner = subprocess.Popen([sys.executable, "-c", job], cwd=REPO)
    deadline = time.perf_counter() + 30
    while not stage_pid.exists() and time.perf_counter() < deadline:
        time.sleep(0.1)
    runner.kill()
    runner.wait()
    orphan = int(stage_pid.read_text())
    deadline = time.perf_counter() + 5
    while alive(orphan) and time.perf_counter() < deadline:
        time.sleep(0.1)
    assert not alive(orphan), "the stage outlived its job"
    again = run_stage("s", [sys.executable, "-c", "pass"], tmp_path / "never", tmp_path / "s.log", timeout=30)
    assert again["exit"] == 0 and "cut" not in again
    both = merge(merge(None, cut), again)
    assert both["jobs"] == 2 and both["wall_s"] == pytest.approx(cut["wall_s"] + again["wall_s"]) and both["exit"] == 0
