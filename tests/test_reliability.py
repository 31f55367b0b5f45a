"""Reliability: determinism, a rank killed mid-training, resume on another world size, bad input.

The fault test runs a real 2-rank ``torchx run -s local_cwd`` job with torchrun restarts,
SIGKILLs one rank after a checkpoint and checks that the restarted job ends exactly where an
uninterrupted run with the same seed ends (marked ``slow``, ~25 s on 2 cores).
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from iat_rec.cli import main
from iat_rec.dist.checkpoint import dcp_load
from tests.helpers import BIN, COMPONENT, INGEST_ROWS, INGEST_SCHEMA_YAML, REPO, STAGE1, run_cli, synth_log, write_csv

ONE_RANK = [
    *"--nproc 1 --scheme temporal --steps 6 --batch-size 32".split(),
    *"--eval-batches 2 --no-progress --emb-dim 8 --hidden 32".split(),
]


@pytest.fixture(scope="module")
def one_rank_run(tiny_log, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("one_rank") / "run"
    run_cli("compress", "--data", str(tiny_log), "--out", str(run), *ONE_RANK)
    return run


def files(run: Path) -> dict[str, bytes]:
    """Every file under ``run``, by relative path: to show that nothing was written."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    """The single ``iat-rec: error:`` line of a failed command (third-party warnings aside)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("iat-rec:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_same_seed_same_losses_and_metrics(one_rank_run, tiny_log, tmp_path):
    again = tmp_path / "again"
    run_cli("compress", "--data", str(tiny_log), "--out", str(again), *ONE_RANK)
    assert (again / "train_log.jsonl").read_text() == (one_rank_run / "train_log.jsonl").read_text()
    assert (
        json.loads((again / "result.json").read_text())["valid"]
        == json.loads((one_rank_run / "result.json").read_text())["valid"]
    )


def test_resume_on_another_world_size_is_refused_before_anything_is_written(stage1_run, tiny_log, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(stage1_run, run)
    before = files(run)
    code = main(
        ["compress", "--data", str(tiny_log), "--out", str(run), "--nproc", "1", *STAGE1, "--steps", "14", "--resume"]
    )
    assert code == 2
    assert "written by 2 ranks; resuming on 1 ranks" in one_error_line(capsys)
    assert files(run) == before


def test_config_with_unknown_keys_is_one_clear_error(tiny_log, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_size: 8\nlearning_rate: 0.1\nmodel: {emb_dim: 8, widht: 3}\n")
    assert main(["compress", "--config", str(cfg), "--data", str(tiny_log), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown keys ['learning_rate']" in err[0]
    assert not (tmp_path / "r").exists()


BAD_VALUES = [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--window", "0"], "--window must be >= 1"),
    (["--split", "0.8"], "--split takes two time quantiles"),
    (["--split", "0.9", "0.8"], "--split takes two time quantiles"),
    (["--dense-lr", "nan"], "--dense-lr must be a finite number > 0"),
    (["--steps", "-5"], "--steps must be >= 0"),
    (["--epochs", "-1"], "--epochs must be a finite number > 0"),
    (["--iat-dim", "0"], "--iat-dim must be >= 1"),
    (["--decompress", "64", "0"], "--decompress must be >= 1"),
    (["--nproc", "0"], "--nproc must be >= 1"),
    (["--nproc", "-1"], "--nproc must be >= 1"),
    (["--interaction", "mlp"], "--interaction must be one of"),
    (["--reconstruct", "-1"], "--reconstruct must be >= 0"),
    (["--reconstruct-features", "nope"], "--reconstruct-features ['nope']: not sparse features"),
]
BAD_YAML = [
    ("resume: 'no'\n", "--resume (resume) must be true or false, not 'no'"),
    ("batch_size: '8'\n", "--batch-size (batch_size) must be an integer, not '8'"),
    ("model: {emb_dim: 8.5}\n", "--emb-dim (model.emb_dim) must be an integer, not 8.5"),
    ("split: [0.8, x]\n", "--split (split) must be a list of a number"),
]


@pytest.mark.parametrize("flags,message", BAD_VALUES, ids=[" ".join(f) for f, _ in BAD_VALUES])
def test_a_bad_option_value_is_one_error_before_any_rank_starts(tiny_log, tmp_path, capsys, flags, message):
    out = tmp_path / "r"
    code = main(["compress", "--data", str(tiny_log), "--out", str(out), "--scheme", "user", *flags])
    assert code == 2
    assert message in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("text,message", BAD_YAML)
def test_a_yaml_value_of_the_wrong_type_is_one_error(tiny_log, tmp_path, capsys, text, message):
    cfg, out = tmp_path / "c.yaml", tmp_path / "r"
    cfg.write_text(text)
    assert main(["compress", "--config", str(cfg), "--data", str(tiny_log), "--out", str(out)]) == 2
    assert message in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--max-len", "0"], "--max-len must be >= 1"),
        (["--max-len", "-2"], "--max-len must be >= 1"),
        (["--reader-heads", "0"], "--reader-heads must be >= 1"),
    ],
)
def test_a_bad_stage2_value_is_one_error(tiny_log, tmp_path, capsys, flags, message):
    out = tmp_path / "r"
    assert main(["rank", "--data", str(tiny_log), "--out", str(out), "--history", "labels", *flags]) == 2
    assert message in one_error_line(capsys)
    assert not out.exists()


# ---- bad input: damaged checkpoints, token tables of another dim, single-instance users ----------


def damage(ckpt_dir: Path, how: str) -> None:
    """Truncates every shard file, or zeroes 1 KiB inside the largest model tensor's bytes
    (which torch.load alone would load silently: it does not check the zip's CRC-32s)."""
    if how == "truncated":
        for f in ckpt_dir.glob("*.distcp"):
            f.write_bytes(f.read_bytes()[:8])
        return
    storage = FileSystemReader(str(ckpt_dir)).read_metadata().storage_data
    entry = max(
        (info for index, info in storage.items() if index.fqn.startswith("model.")), key=lambda info: info.length
    )
    f = ckpt_dir / entry.relative_path
    data = bytearray(f.read_bytes())
    middle = entry.offset + entry.length // 2
    data[middle : middle + 1024] = bytes(1024)
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "overwritten"])
def test_damaged_checkpoint_is_one_clear_error_on_export_and_resume(one_rank_run, tiny_log, tmp_path, capsys, how):
    run = tmp_path / "run"
    shutil.copytree(one_rank_run, run)
    damage(run / "checkpoints" / "step_00000006", how)
    before = files(run)
    tokens = tmp_path / "tokens"
    assert main(["export", "--stage1", str(run), "--out", str(tokens), "--nproc", "1", "--no-progress"]) == 2
    assert "step_00000006: corrupt, truncated or unsafe checkpoint" in one_error_line(capsys)
    assert not tokens.exists() and not (tmp_path / ".tokens.tmp").exists()
    assert main(["compress", "--data", str(tiny_log), "--out", str(run), *ONE_RANK, "--steps", "9", "--resume"]) == 2
    assert "step_00000006: corrupt, truncated or unsafe checkpoint" in one_error_line(capsys)
    assert files(run) == before


def test_token_table_of_another_dim_is_one_clear_error(tiny_log, tokens, tmp_path, capsys):
    """A manifest that disagrees with its table's weights, and a table the model cannot take."""
    edited = tmp_path / "edited"
    shutil.copytree(tokens, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    (edited / "manifest.json").write_text(json.dumps({**manifest, "dim": 8}))
    out = tmp_path / "rank"
    assert (
        main(
            [
                "rank",
                "--data",
                str(tiny_log),
                "--tokens",
                str(edited),
                "--history",
                "iat",
                "--out",
                str(out),
                "--nproc",
                "1",
            ]
        )
        == 2
    )
    assert (
        f"manifest.json says {manifest['rows']} rows x dim 8, "
        f"but the table holds weights of shape [{manifest['rows']}, 16]" in one_error_line(capsys)
    )
    assert not out.exists()
    assert (
        main(
            [
                "compress",
                "--data",
                str(tiny_log),
                "--out",
                str(out),
                *"--scheme user --stream --tokens".split(),
                str(tokens),
                *"--iat-dim 32 --nproc 1".split(),
            ]
        )
        == 2
    )
    assert "has dim 16, the model expects 32" in one_error_line(capsys)
    assert not out.exists()


def single_instance_csv(path: Path, users: int) -> Path:
    """The ingest tests' rows, each under a user of its own."""
    rows = []
    for i in range(users):
        row = INGEST_ROWS[i % len(INGEST_ROWS)]
        ts = 1_000 + 7 * i
        rows.append(dict(row, uid=f"s{i}", ts=ts, conv_time=ts + row["conv_time"] - row["ts"]))
    return write_csv(path, rows)


def test_users_with_a_single_instance_ingest_and_train(tmp_path):
    (tmp_path / "schema.yaml").write_text(INGEST_SCHEMA_YAML)
    log = tmp_path / "log"
    run_cli(
        "data",
        "ingest",
        "--input",
        str(single_instance_csv(tmp_path / "in.csv", 160)),
        "--schema",
        str(tmp_path / "schema.yaml"),
        "--out",
        str(log),
    )
    common = [
        "--data",
        str(log),
        *"--nproc 1 --steps 3 --batch-size 8 --eval-batches 1".split(),
        *"--no-progress --emb-dim 4 --hidden 16".split(),
    ]
    run_cli("compress", *common, "--out", str(tmp_path / "s1"), *"--scheme user --window 4".split())
    run_cli("rank", *common, "--out", str(tmp_path / "s2"), *"--history handcrafted --max-len 4".split())
    for run in ("s1", "s2"):
        assert all(np.isfinite([x for _, x in losses(tmp_path / run)])), run
    assert json.loads((tmp_path / "s2" / "metrics.json").read_text())["n"] > 0


def test_a_split_without_validation_rows_is_refused_before_anything_is_written(tmp_path, capsys):
    (tmp_path / "schema.yaml").write_text(INGEST_SCHEMA_YAML)
    log = tmp_path / "log"  # 8 rows over 6 timestamps: the 0.8 and 0.9 quantiles are the same one
    run_cli(
        "data",
        "ingest",
        "--input",
        str(write_csv(tmp_path / "in.csv")),
        "--schema",
        str(tmp_path / "schema.yaml"),
        "--out",
        str(log),
    )
    for program in (["compress", "--scheme", "temporal"], ["rank", "--history", "none"]):
        out = tmp_path / program[0]
        assert main([*program, "--data", str(log), "--out", str(out), "--nproc", "1"]) == 2
        assert "--split [0.8, 0.9] leaves no valid rows" in one_error_line(capsys)
        assert not out.exists()


def _flip_one_bit(path: Path, byte: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[byte] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_label_in_the_log_is_refused_by_every_reader(tiny_log, tmp_path, capsys):
    log = tmp_path / "log"
    shutil.copytree(tiny_log, log)
    _flip_one_bit(log / "labels.npy")  # one label of the last row, same size: trains fine without the check
    for argv in (["compress", "--scheme", "temporal"], ["rank", "--history", "none"]):
        out = tmp_path / argv[0]
        assert main([*argv, "--data", str(log), "--out", str(out), "--nproc", "1"]) == 2
        assert "labels.npy: checksum differs from its manifest" in one_error_line(capsys)
        assert not out.exists()
    assert main(["data", "stats", str(log), "--verify"]) == 2
    assert "labels.npy: checksum differs" in one_error_line(capsys)
    assert main(["data", "stats", str(tiny_log), "--verify"]) == 0


def test_a_cleared_bit_in_a_token_tables_label_times_is_refused(tiny_log, tokens, tmp_path, capsys):
    table = tmp_path / "tokens"
    shutil.copytree(tokens, table)
    _flip_one_bit(table / "label_time.npy", -8)  # a label becomes known one second earlier or later
    out = tmp_path / "r"
    assert (
        main(
            [
                "rank",
                "--data",
                str(tiny_log),
                "--tokens",
                str(table),
                "--out",
                str(out),
                *"--history iat --nproc 1".split(),
            ]
        )
        == 2
    )
    assert "label_time.npy: checksum differs from its manifest" in one_error_line(capsys)
    assert not out.exists()


def test_a_truncated_column_is_refused(tiny_log, tmp_path, capsys):
    log = tmp_path / "log"
    shutil.copytree(tiny_log, log)
    (log / "ts.npy").write_bytes((log / "ts.npy").read_bytes()[:-8])
    assert main(["data", "stats", str(log)]) == 2
    assert "ts.npy: " in one_error_line(capsys)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_artifacts_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        run_cli("data", "synth", "--out", str(tmp_path / "log"), *"--users 4 --mean-instances 3 --no-progress".split())
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [tmp_path / "log", *(tmp_path / "log").iterdir()]}
    assert modes.pop("log") == 0o777 & ~umask
    assert set(modes.values()) == {0o666 & ~umask}, modes


# ---- a rank killed mid-training -------------------------------------------------------------------


def _processes() -> dict[int, tuple[int, list[str]]]:
    """pid -> (parent pid, argv) of every process that can be read."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = [a.decode() for a in (d / "cmdline").read_bytes().split(b"\0") if a]
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue  # gone meanwhile
        out[int(d.name)] = (ppid, argv)
    return out


def rank_pids(run: Path) -> dict[int, int]:
    """rank -> pid of the workers of the torchrun agent whose program writes ``run``."""
    procs = _processes()
    agents = {
        pid for pid, (_, argv) in procs.items() if any(a.endswith("torchrun") for a in argv[:2]) and str(run) in argv
    }
    ranks = {}
    for pid, (ppid, _) in procs.items():
        if ppid not in agents:
            continue
        try:
            environ = (Path("/proc") / str(pid) / "environ").read_bytes()
        except OSError:
            continue  # gone meanwhile
        env = dict(e.split(b"=", 1) for e in environ.split(b"\0") if b"=" in e)
        ranks[int(env[b"RANK"])] = pid
    return ranks


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def losses(run: Path) -> list[tuple[int, float]]:
    return [(d["step"], d["loss"]) for d in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())]


def saved_model(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a DCP checkpoint, whole, read in this one process."""
    meta = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    state = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if k.startswith("model.") and isinstance(m, TensorStorageMetadata)
    }
    dcp_load(state, ckpt)
    return state


@pytest.mark.slow
def test_rank_killed_mid_training_restarts_and_ends_as_an_uninterrupted_run(stage1_run, tiny_log, tmp_path):
    """torchx local_cwd, 2 ranks, torchrun --max_restarts 1: SIGKILL rank 1 after the first
    checkpoint; the job resumes from its latest checkpoint and ends with the losses, metrics
    and weights of the uninterrupted ``stage1_run`` (same program options, same seed)."""
    run = tmp_path / "run"
    cmd = [
        str(BIN / "torchx"),
        "run",
        "-s",
        "local_cwd",
        "-cfg",
        f"log_dir={tmp_path / 'torchx_logs'}",
        f"{COMPONENT}:compress",
        *"-j 1x2 --max_restarts 1 --data".split(),
        str(tiny_log),
        "--out",
        str(run),
        "--resume",
        "True",
        "--",
        *STAGE1,
        "--ckpt-every",
        "1",
    ]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("TORCHXCONFIG", None)
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (run / "checkpoints" / "latest").is_file(), 240, "the first checkpoint")
        os.kill(wait_for(lambda: rank_pids(run).get(1), 10, "rank 1"), signal.SIGKILL)
        output, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.terminate()  # torchx stops the job's processes on SIGTERM
            job.wait(timeout=60)
    assert job.returncode == 0, output[-5000:]
    resumed = [int(line.rsplit(" ", 1)[1]) for line in output.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and 1 <= resumed[0] < 12, output[-5000:]  # killed after a checkpoint, before the end

    # every step once, with the loss of the uninterrupted run: no batch skipped or repeated
    got, want = losses(run), losses(stage1_run)
    assert [s for s, _ in got] == list(range(1, 13)) == [s for s, _ in want]
    np.testing.assert_allclose([x for _, x in got], [x for _, x in want], rtol=1e-5, atol=1e-6)
    got_valid = json.loads((run / "result.json").read_text())["valid"]
    want_valid = json.loads((stage1_run / "result.json").read_text())["valid"]
    for task, metrics in want_valid.items():
        for name, value in metrics.items():
            assert got_valid[task][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (task, name)
    got_w, want_w = (saved_model(r / "checkpoints" / "step_00000012") for r in (run, stage1_run))
    assert got_w.keys() == want_w.keys() and got_w
    for name, tensor in want_w.items():
        torch.testing.assert_close(got_w[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


# ---- --out never loses data (#15 item 1) -------------------------------------------------------


def test_an_out_that_is_not_an_artifact_of_its_kind_is_never_replaced(tmp_path, capsys):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    assert main(["data", "synth", "--out", str(keep), *"--users 5 --mean-instances 3".split()]) == 2
    assert "exists and is not an instance log" in capsys.readouterr().err
    assert (keep / "notes.txt").read_text() == "precious" and len(list(keep.iterdir())) == 1


def test_an_existing_log_is_replaced_only_with_overwrite(tmp_path, capsys):
    log = tmp_path / "log"
    run_cli("data", "synth", "--out", str(log), *"--users 5 --mean-instances 3".split())
    before = (log / "manifest.json").read_bytes()
    assert main(["data", "synth", "--out", str(log), *"--users 6 --mean-instances 3".split()]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (log / "manifest.json").read_bytes() == before
    run_cli("data", "synth", "--out", str(log), *"--users 6 --mean-instances 3 --overwrite".split())
    assert json.loads((log / "manifest.json").read_text())["users"] == 6


def test_ingest_never_writes_into_its_input(tmp_path, capsys):
    src = write_csv(tmp_path / "a.csv", INGEST_ROWS)
    schema = tmp_path / "s.yaml"
    schema.write_text(INGEST_SCHEMA_YAML)
    before = src.read_bytes()
    assert main(["data", "ingest", "--input", str(src), "--schema", str(schema), "--out", str(src)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert src.read_bytes() == before


def test_export_never_writes_into_its_stage1_run(stage1_run, capsys):
    before = files(stage1_run)
    assert main(["export", "--stage1", str(stage1_run), "--out", str(stage1_run)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert files(stage1_run) == before


def test_a_run_is_continued_with_resume_or_replaced_with_overwrite_never_pruned(
    tiny_log, one_rank_run, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(one_rank_run, run)
    before = files(run)
    fewer = [a if a != "6" else "3" for a in ONE_RANK]
    assert main(["compress", "--data", str(tiny_log), "--out", str(run), *fewer]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert files(run) == before  # nothing pruned, latest still valid
    run_cli("compress", "--data", str(tiny_log), "--out", str(run), *fewer, "--overwrite")
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000003"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"


# ---- --resume checks the whole run (#15 item 2) ----------------------------------------------


@pytest.mark.parametrize(
    "change", [["--dense-lr", "0.5"], ["--hidden", "64"], [*"--scheme user --window 4".split()], ["--seed", "9"]]
)
def test_resume_with_another_config_is_refused_before_anything_is_written(
    tiny_log, one_rank_run, tmp_path, capsys, change
):
    run = tmp_path / "copy"
    shutil.copytree(one_rank_run, run)
    before = files(run)
    args = [a for a in ONE_RANK]
    for flag, value in zip(change[::2], change[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert main(["compress", "--data", str(tiny_log), "--out", str(run), *args, "--steps", "9", "--resume"]) == 2
    assert "was trained with other" in one_error_line(capsys)
    assert files(run) == before  # plan.json, run.json and every checkpoint untouched


def test_resume_on_another_log_is_refused(one_rank_run, tmp_path, capsys):
    other = synth_log(tmp_path / "other", users=120, mean_instances=50, seed=7)  # same schema, other events
    run = tmp_path / "copy"
    shutil.copytree(one_rank_run, run)
    before = files(run)
    assert main(["compress", "--data", str(other.path), "--out", str(run), *ONE_RANK, "--steps", "9", "--resume"]) == 2
    assert "was trained on instance log" in one_error_line(capsys)
    assert files(run) == before


def test_resuming_a_finished_run_keeps_its_evaluations(tiny_log, one_rank_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(one_rank_run, run)
    run_cli("compress", "--data", str(tiny_log), "--out", str(run), *ONE_RANK, "--resume")
    assert json.loads((run / "eval_history.json").read_text()) == json.loads(
        (one_rank_run / "eval_history.json").read_text()
    )
    assert (
        json.loads((run / "result.json").read_text())["valid"]
        == json.loads((one_rank_run / "result.json").read_text())["valid"]
    )


# ---- processes: a launcher's ranks, Ctrl-C, leftovers ----------------------------------------------


def launched_ranks(launcher: int) -> list[int]:
    """The rank processes under a launcher: its children (the agent runs in the launcher itself)
    that carry a RANK in their environment."""
    out = []
    for pid, (ppid, _) in _processes().items():
        if ppid != launcher:
            continue
        try:
            if b"\0RANK=" in b"\0" + (Path("/proc") / str(pid) / "environ").read_bytes():
                out.append(pid)
        except OSError:
            continue
    return out


def start_two_ranks(tiny_log: Path, out: Path, tmp: Path) -> subprocess.Popen:
    """A 2-rank stage-1 run long enough to be interrupted, in its own process group (as a
    terminal's foreground job), with TMPDIR pointing at ``tmp``."""
    env = {**os.environ, "TMPDIR": str(tmp)}
    return subprocess.Popen(
        [
            str(BIN / "iat-rec"),
            "compress",
            "--data",
            str(tiny_log),
            "--out",
            str(out),
            *STAGE1,
            *"--steps 100000 --nproc 2".split(),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _gone(pids: list[int]) -> bool:
    procs = _processes()
    return not any(
        p in procs and "zombie" not in (Path("/proc") / str(p) / "status").read_text() for p in pids if p in procs
    )


@contextlib.contextmanager
def two_ranks_training(tiny_log: Path, tmp_path: Path):
    """(launcher, rank pids) of a 2-rank run once it trains; whatever is left is killed after."""
    launcher = start_two_ranks(tiny_log, tmp_path / "run", tmp_path)
    try:
        ranks = wait_for(
            lambda: len(launched_ranks(launcher.pid)) == 2 and launched_ranks(launcher.pid), 60, "two ranks"
        )
        wait_for(lambda: (tmp_path / "run" / "train_log.jsonl").is_file(), 60, "training")
        yield launcher, ranks
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)


@pytest.mark.slow
def test_ranks_die_with_their_launcher(tiny_log, tmp_path):
    with two_ranks_training(tiny_log, tmp_path) as (launcher, ranks):
        launcher.kill()  # SIGKILL: its agent cannot stop the ranks
        launcher.wait()
        wait_for(lambda: _gone(ranks), 20, "the ranks to die with their launcher")


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_says_interrupted_and_leaves_no_launcher_files(tiny_log, tmp_path):
    with two_ranks_training(tiny_log, tmp_path) as (launcher, ranks):
        os.killpg(launcher.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground job
        _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 130, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("iat-rec:")] == ["iat-rec: interrupted"], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    wait_for(lambda: _gone(ranks), 20, "the ranks to stop")
    assert not list(tmp_path.glob("torchelastic_*")) and not list(tmp_path.glob("iat-rec-launch-*"))


def test_a_killed_writers_temporary_directory_is_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that is no longer alive
    from iat_rec.dist.atomic import _HOST

    orphan, live = tmp_path / f".log.tmp-{_HOST}-{dead.pid}-x1", tmp_path / f".log.tmp-{_HOST}-{os.getpid()}-x2"
    elsewhere = tmp_path / f".log.tmp-otherhost-{dead.pid}-x3"  # another host's writer: this host cannot tell
    for d in (orphan, live, elsewhere):
        d.mkdir()
        (d / "ts.npy").write_bytes(b"half")
    run_cli("data", "synth", "--out", str(tmp_path / "log"), *"--users 4 --mean-instances 3 --no-progress".split())
    assert not orphan.exists() and live.exists() and elsewhere.exists()  # a live writer's directory is never touched


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a failure inside the ranks: --device cuda without CUDA")
def test_an_error_inside_the_ranks_is_printed_once(tiny_log, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        [
            str(BIN / "iat-rec"),
            "compress",
            "--data",
            str(tiny_log),
            "--out",
            str(out),
            *STAGE1,
            *"--nproc 2 --device cuda".split(),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["iat-rec: error: --device cuda, but torch sees no CUDA device"], (
        done.stderr[-3000:]
    )


@pytest.mark.parametrize("artifact", ["log", "tokens"])
def test_an_artifact_of_another_version_is_one_clear_error(tiny_log, tokens, tmp_path, capsys, artifact):
    src = {"log": tiny_log, "tokens": tokens}[artifact]
    copy = tmp_path / artifact
    shutil.copytree(src, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["version"] -= 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    args = (
        ["--data", str(copy), "--history", "none"]
        if artifact == "log"
        else ["--data", str(tiny_log), "--tokens", str(copy), "--history", "iat"]
    )
    out = tmp_path / "r"
    assert main(["rank", *args, "--out", str(out), "--nproc", "1"]) == 2
    line = one_error_line(capsys)
    assert f"v{manifest['version']}, expected" in line and "again with this version" in line, line
    assert not out.exists()


def test_every_training_flag_has_help_with_its_default_and_the_version_prints(capsys):
    from iat_rec import __version__
    from pipelines import compress, rank

    for parser in (compress.parser(), rank.parser()):
        for action in parser._actions:
            if action.option_strings and action.dest not in ("help",):
                assert action.help and len(action.help) > 12, (parser.prog, action.option_strings, action.help)
                if action.dest not in ("config", "nproc"):
                    assert "(default: " in action.help, (parser.prog, action.option_strings, action.help)
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"iat-rec {__version__}"


def test_third_party_warnings_are_hidden_unless_verbose(tiny_log, tmp_path):
    def stderr(*flags: str) -> str:
        argv = [
            str(BIN / "iat-rec"),
            *flags,
            "compress",
            "--data",
            str(tiny_log),
            "--out",
            str(tmp_path / "r"),
            *ONE_RANK,
            "--overwrite",
        ]
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stderr

    quiet, verbose = stderr(), stderr("--verbose")
    noise = [line for line in quiet.splitlines() if "warn" in line.lower()]
    assert noise == [], noise
    assert any("warn" in line.lower() for line in verbose.splitlines()), verbose[-2000:]


def test_run_json_records_what_made_the_run(one_rank_run):
    p = json.loads((one_rank_run / "run.json").read_text())["provenance"]
    assert p["argv"] and p["host"] and p["versions"]["torch"] == torch.__version__
    assert p["versions"]["torchrec"] and p["versions"]["fbgemm_gpu"]
    assert p["git_commit"] is None or len(p["git_commit"]) == 40  # a clone has one; an installed wheel has none


def test_experiment_stage_yaml_is_checked_before_any_rank_starts(tiny_log, tmp_path, capsys):
    (tmp_path / "c2.yaml").write_text("batch_size: 0\n")
    work = tmp_path / "work"
    assert (
        main(
            [
                "experiment",
                "--data",
                str(tiny_log),
                "--work",
                str(work),
                "--rank-config",
                str(tmp_path / "c2.yaml"),
                "--nproc",
                "2",
            ]
        )
        == 2
    )
    assert "--batch-size must be >= 1" in one_error_line(capsys)
    assert not work.exists()
    (tmp_path / "c1.yaml").write_text("time_limit: 600\n")  # a job's bound: the experiment runs stages to the end
    args = ["experiment", "--data", str(tiny_log), "--work", str(work), "--compress-config", str(tmp_path / "c1.yaml")]
    assert main(args) == 2
    assert "time_limit stops a run unfinished" in one_error_line(capsys)
    assert not work.exists()


def test_checksums_are_computed_once_per_file_and_process(tiny_log, monkeypatch):
    from iat_rec.data.instance_log import InstanceLog
    from iat_rec.dist import checksums

    InstanceLog(tiny_log).check_files()
    calls = []
    monkeypatch.setattr(checksums, "digest", lambda path: calls.append(path) or {"blake2b": "x", "bytes": 0})
    InstanceLog(tiny_log).check_files()
    _ = InstanceLog(tiny_log).labels
    assert calls == []
