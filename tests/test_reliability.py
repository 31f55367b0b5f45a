"""Reliability: determinism, resume on another world size, configs with unknown keys."""

import json

from iat_rec.cli import main
from tests.conftest import run_cli


def test_same_seed_same_losses_and_metrics(tiny_log, tmp_path):
    args = ["--data", str(tiny_log), "--nproc", "1", "--scheme", "temporal", "--steps", "6", "--batch-size", "32",
            "--eval-batches", "2", "--no-progress", "--emb-dim", "8", "--hidden", "32"]  # fmt: skip
    a, b = tmp_path / "a", tmp_path / "b"
    run_cli("compress", *args, "--out", str(a))
    run_cli("compress", *args, "--out", str(b))
    assert (a / "train_log.jsonl").read_text() == (b / "train_log.jsonl").read_text()
    assert json.loads((a / "result.json").read_text())["valid"] == json.loads((b / "result.json").read_text())["valid"]


def test_resume_on_another_world_size_is_refused(stage1_run, tiny_log, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(stage1_run, run)
    code = main(["compress", "--data", str(tiny_log), "--out", str(run), "--nproc", "1", "--scheme", "user",
                 "--window", "8", "--steps", "14", "--resume", "--no-progress", "--emb-dim", "8", "--hidden", "64",
                 "--decompress", "64", "--iat-dim", "16"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "written by 2 ranks; resuming on 1 ranks" in err


def test_config_with_unknown_keys_is_one_clear_error(tiny_log, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_size: 8\nlearning_rate: 0.1\nmodel: {emb_dim: 8, widht: 3}\n")
    assert main(["compress", "--config", str(cfg), "--data", str(tiny_log), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown keys ['learning_rate']" in err[0]
    assert not (tmp_path / "r").exists()
