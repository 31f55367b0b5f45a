"""Token health: saturation, dim spread, effective rank, the own-label probe and its leak gap,
on arrays and on a tiny token table through the CLI (seeded, CPU, single process)."""

import json

import numpy as np
import pytest
import torch

from iat_rec.cli import main
from iat_rec.tokens.health import effective_rank, format_health, stored_health, table_health, token_health
from iat_rec.tokens.table import WEIGHT_KEY, TokenTable, save_table, token_collection


def split_mask(n: int, train_frac: float = 0.8) -> np.ndarray:
    return np.arange(n) < int(train_frac * n)


def test_collapsed_tokens():
    rng = np.random.default_rng(0)
    n, d = 4000, 16
    row = rng.choice([-1.0, 1.0], size=d)
    tokens = np.tile(row, (n, 1)).astype(np.float32)
    labels = rng.integers(0, 2, n)
    h = token_health(tokens, labels, split_mask(n))
    assert h["saturation"] == 1.0
    assert h["dim_std"]["max"] == 0.0 and h["dead_dims"] == d
    assert h["effective_rank"] is None and "same token" in h["reasons"]["effective_rank"]
    assert h["probe"]["auc_train"] == 0.5 and h["probe"]["auc_heldout"] == 0.5 and h["probe"]["leak_gap"] == 0.0
    json.dumps(h, allow_nan=False)  # JSON-able, no NaN
    text = format_health(h)
    assert "saturation       1.0000" in text and "effective rank   n/a" in text


def test_informative_tokens_probe_well_on_both_splits():
    rng = np.random.default_rng(1)
    n, d = 6000, 16
    x = rng.standard_normal((n, d))
    v = rng.standard_normal(d)
    labels = (x @ v / np.linalg.norm(v) + 0.5 * rng.standard_normal(n) > 0).astype(np.float32)
    h = token_health(np.tanh(x).astype(np.float32), labels, split_mask(n), seed=3)
    p = h["probe"]
    assert p["auc_train"] > 0.8 and p["auc_heldout"] > 0.8
    assert abs(p["leak_gap"]) < 0.05
    assert h["dead_dims"] == 0 and h["effective_rank"] > 12 and 0 < h["saturation"] < 0.05
    assert h["reasons"] == {}


def test_leaky_tokens_show_a_leak_gap():
    rng = np.random.default_rng(2)
    n, d = 6000, 16
    train = split_mask(n)
    labels = rng.integers(0, 2, n).astype(np.float32)
    tokens = np.tanh(rng.standard_normal((n, d + 1)))
    tokens[train, d] = np.where(labels[train] > 0, 0.9, -0.9) + 0.05 * rng.standard_normal(int(train.sum()))
    tokens[~train, d] = 0.0  # a held-out token never saw its label
    h = token_health(tokens.astype(np.float32), labels, train)
    p = h["probe"]
    assert p["auc_train"] > 0.95 and abs(p["auc_heldout"] - 0.5) < 0.1
    assert p["leak_gap"] > 0.2
    assert "leak gap         +0." in format_health(h)


def test_effective_rank():
    rng = np.random.default_rng(3)
    assert effective_rank(rng.standard_normal((5000, 16))) > 12
    low = rng.standard_normal((5000, 2)) @ rng.standard_normal((2, 16))
    assert effective_rank(low) < 3
    h = token_health(low, rng.integers(0, 2, 5000), split_mask(5000))
    assert h["effective_rank"] < 3 and h["dim"] == 16


def test_deterministic_and_sampled():
    rng = np.random.default_rng(4)
    n = 3000
    x, y, tr = rng.standard_normal((n, 8)), rng.integers(0, 2, n), split_mask(n)
    a, b = token_health(x, y, tr, seed=5, sample=1000), token_health(x, y, tr, seed=5, sample=1000)
    assert a == b and a["rows_sampled"] == 1000 and a["rows"] == n and a["seed"] == 5
    assert token_health(x, y, tr, seed=6, sample=1000) != a


def test_too_few_rows_of_a_class_give_null_with_a_reason():
    rng = np.random.default_rng(5)
    n = 2000
    x = rng.standard_normal((n, 8))
    y = rng.integers(0, 2, n)
    train = split_mask(n, 0.99)  # 20 held-out rows
    h = token_health(x, y, train)
    p = h["probe"]
    assert p["auc_train"] is not None and p["auc_heldout"] is None and p["leak_gap"] is None
    assert "held-out" in h["reasons"]["probe.auc_heldout"] and "probe.leak_gap" in h["reasons"]

    y_rare = np.zeros(n)
    y_rare[:30] = 1  # too few positives to fit on
    h = token_health(x, y_rare, split_mask(n))
    assert h["probe"]["auc_train"] is None and h["probe"]["auc_heldout"] is None
    assert "positive" in h["reasons"]["probe.auc_train"]
    assert "n/a" in format_health(h)
    json.dumps(h, allow_nan=False)


def tiny_table(path, n: int = 1000, d: int = 8, seed: int = 0):
    """A token table of n rows whose train rows (ts below the 0.8 quantile) leak their label in
    dim 0, written with save_table from a plain EmbeddingCollection."""
    rng = np.random.default_rng(seed)
    ts = np.sort(rng.integers(0, 10**6, n)).astype(np.int64)
    labels = rng.integers(0, 2, (n, 1)).astype(np.float32)
    tokens = np.tanh(rng.standard_normal((n, d))).astype(np.float32)
    train = ts <= np.quantile(ts, 0.8, method="lower")
    tokens[train, 0] = np.where(labels[train, 0] > 0, 0.9, -0.9)
    tokens[~train, 0] = 0.0
    ec = token_collection(n, d, "fp32", device="cpu")
    with torch.no_grad():
        ec.state_dict()[WEIGHT_KEY].copy_(torch.from_numpy(tokens))
    manifest = {
        "dim": d,
        "dtype": "fp32",
        "rows": n,
        "scheme": "user",
        "source_fingerprint": "src0",
        "log_fingerprint": "log0",
        "log_path": str(path / "no-log"),
        "tasks": ["click"],
    }
    side = {
        "ts": ts,
        "user_offsets": np.array([0, n], dtype=np.int64),
        "user_keys": np.array([0], dtype=np.int64),
        "labels": labels,
        "label_time": ts[:, None].copy(),
    }
    return save_table(path / "tokens", ec, manifest, side)


def test_table_health_and_the_cli(tmp_path, capsys):
    tokens = tiny_table(tmp_path)
    table = TokenTable(tokens)
    h = table_health(table)
    assert h["rows"] == 1000 and h["rows_sampled"] == 1000 and h["train_rows"] == 800
    assert h["table"]["split"] == [0.8, 0.9] and h["table"]["task"] == 0
    assert h["probe"]["leak_gap"] > 0.2
    assert stored_health(table) is None  # nothing stored

    assert main(["tokens", "show", str(tokens), "--health", "--task", "click"]) == 0
    out = capsys.readouterr().out
    for figure in (
        "saturation",
        "dim std",
        "dead dims",
        "effective rank",
        "probe AUC train",
        "probe AUC held",
        "leak gap",
    ):
        assert figure in out
    assert "(computed now)" in out and '"format"' not in out  # health only, no manifest/rows
    assert main(["tokens", "show", str(tokens), "--health", "--task", "nope"]) == 2
    assert "not among the table's tasks" in capsys.readouterr().err

    # a fresh stored report is printed as stored; one of another checkpoint is recomputed
    mf = tokens / "manifest.json"
    m = json.loads(mf.read_text())
    mf.write_text(json.dumps({**m, "health": h}))
    assert stored_health(TokenTable(tokens)) == h
    assert main(["tokens", "show", str(tokens), "--health"]) == 0
    assert "(stored in the manifest)" in capsys.readouterr().out
    mf.write_text(json.dumps({**m, "source_fingerprint": "src1", "health": h}))
    assert stored_health(TokenTable(tokens)) is None
    assert main(["tokens", "show", str(tokens), "--health"]) == 0
    assert "(computed now)" in capsys.readouterr().out

    # the manifest's split is the default split
    mf.write_text(json.dumps({**m, "split": [0.5, 0.9]}))
    assert table_health(TokenTable(tokens))["train_rows"] == 500

    # --rows unchanged, and with --health it prints both
    assert main(["tokens", "show", str(tokens), "--rows", "1:3"]) == 0
    out = capsys.readouterr().out
    assert '"format": "iat-token-table"' in out and "row 1:" in out and "row 2:" in out and "token health" not in out
    assert main(["tokens", "show", str(tokens), "--rows", "0:1", "--health"]) == 0
    out = capsys.readouterr().out
    assert "row 0:" in out and "leak gap" in out
    assert main(["tokens", "show", str(tokens), "--rows", "5:2"]) == 2
    assert main(["tokens", "show", str(tokens), "--task", "click"]) == 2
    assert "--task needs --health" in capsys.readouterr().err


@pytest.mark.parametrize("task", [0, "0", "click"])
def test_task_by_index_or_name(tmp_path, task):
    table = TokenTable(tiny_table(tmp_path, n=400))
    h = table_health(table, split=(0.5, 0.75), task=task)
    assert h["table"]["task"] == 0 and h["train_rows"] == 200
