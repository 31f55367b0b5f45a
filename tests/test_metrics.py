"""Evaluation metrics against brute-force references, and 2 gloo ranks against 1 process."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from iat_rec.dist.env import DistEnv
from iat_rec.eval.metrics import EvalMetrics, auc, gauc, logloss_ne
from tests.helpers import on_ranks

TASKS = ["click", "like"]
KEYS = {"auc", "ne", "logloss", "gauc", "n"}


def brute_auc(pred, label, weight=None) -> float:
    """Weighted fraction of (positive, negative) pairs ranked right, ties one half: O(n_pos*n_neg)."""
    w = np.ones(len(pred)) if weight is None else weight
    num = den = 0.0
    for i in range(len(pred)):
        if w[i] <= 0 or label[i] <= 0.5:
            continue
        for j in range(len(pred)):
            if w[j] <= 0 or label[j] > 0.5:
                continue
            pair = w[i] * w[j]
            den += pair
            num += pair * (1.0 if pred[i] > pred[j] else 0.5 if pred[i] == pred[j] else 0.0)
    return num / den if den else float("nan")


def brute_gauc(pred, label, user, weight) -> float:
    """Event-weighted mean of per-user AUCs over users with both classes (0/1 weights)."""
    total = acc = 0.0
    for u in np.unique(user):
        rows = (user == u) & (weight > 0)
        y = label[rows]
        if (y > 0.5).all() or (y <= 0.5).all():
            continue
        n = float(rows.sum())
        acc += n * brute_auc(pred[rows], y)
        total += n
    return acc / total if total else float("nan")


def brute_logloss(pred, label, weight) -> float:
    num = den = 0.0
    for p, y, w in zip(pred, label, weight):
        p, y, w = min(max(float(p), 1e-12), 1 - 1e-12), float(y), float(w)
        num += w * -(y * math.log(p) + (1 - y) * math.log(1 - p))
        den += w
    return num / den


def tied_data(n: int, seed: int, zero_weights: bool):
    """Predictions rounded to 1 decimal (many ties), 0/1 labels, users, optional padding."""
    rng = np.random.default_rng(seed)
    pred = np.round(rng.random(n), 1)
    label = (rng.random(n) < 0.3 + 0.4 * pred).astype(np.float64)
    user = rng.integers(0, 12, n)
    weight = (rng.random(n) > 0.25).astype(np.float64) if zero_weights else np.ones(n)
    return pred, label, user, weight


def batches(seed: int, n_batches: int = 6, size: int = 40):
    """Trainer-shaped batches: logits [N, T] with many ties, labels [N, T], weights [N] with padding, users [N]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        logits = torch.round(torch.randn(size, len(TASKS), generator=g) * 2) / 2  # ties within and across batches
        labels = (torch.rand(size, len(TASKS), generator=g) < torch.sigmoid(logits)).float()
        weights = torch.ones(size)
        weights[-int(torch.randint(0, 8, (1,), generator=g)) or size :] = 0  # padding at the tail
        users = torch.randint(0, 15, (size,), generator=g)
        out.append((logits, labels, weights, users))
    return out


def run_metrics(parts) -> dict:
    m = EvalMetrics(TASKS)
    for b in parts:
        m.update(*b)
    return m.compute()


@pytest.mark.parametrize("zero_weights", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_brute_force_pair_count_with_ties(seed, zero_weights):
    pred, label, _, weight = tied_data(300, seed, zero_weights)
    assert len(np.unique(pred)) <= 11
    expected = brute_auc(pred, label, weight)
    assert auc(pred, label, weight) == pytest.approx(expected, abs=1e-12)
    if not zero_weights:
        assert auc(pred, label) == pytest.approx(expected, abs=1e-12)
    # padding rows carry no information: dropping them gives the same figure
    keep = weight > 0
    assert auc(pred[keep], label[keep]) == pytest.approx(expected, abs=1e-12)


def test_auc_with_real_valued_weights_matches_brute_force():
    pred, label, _, _ = tied_data(200, 7, False)
    weight = np.random.default_rng(7).choice([0.0, 0.5, 1.0, 3.0], size=len(pred))
    assert auc(pred, label, weight) == pytest.approx(brute_auc(pred, label, weight), abs=1e-12)


def test_auc_is_nan_without_both_classes_and_exact_on_separable_data():
    assert math.isnan(auc(np.array([0.1, 0.7]), np.array([1.0, 1.0])))
    assert math.isnan(auc(np.array([0.1, 0.7, 0.9]), np.array([0.0, 1.0, 0.0]), np.array([1.0, 0.0, 1.0])))
    assert auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0.0, 0.0, 1.0, 1.0])) == 1.0
    assert auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([1.0, 1.0, 0.0, 0.0])) == 0.0


@pytest.mark.parametrize("positives_first", [True, False])
def test_constant_predictor_scores_one_half_whatever_the_row_order(positives_first):
    label = torch.tensor([1.0] * 4 + [0.0] * 6)
    if not positives_first:
        label = label.flip(0)
    assert auc(np.full(10, 0.5), label.numpy()) == 0.5
    logits = torch.zeros(10, len(TASKS))  # sigmoid(0) = 0.5 on every row
    labels = torch.stack([label, label.flip(0)], dim=1)
    out = run_metrics(
        [
            (logits[:5], labels[:5], torch.ones(5), torch.zeros(5)),
            (logits[5:], labels[5:], torch.ones(5), torch.zeros(5)),
        ]
    )
    for t in TASKS:
        assert out[t]["auc"] == 0.5
        assert out[t]["gauc"] == 0.5  # one user holding both classes


def test_logloss_is_natural_log_bce_and_ne_is_logloss_over_base_rate_entropy():
    pred, label, _, weight = tied_data(500, 3, True)
    pred = np.clip(pred, 0.0, 1.0)  # holds exact 0.0 and 1.0: the eta clamp must apply
    assert (pred == 0.0).any() and (pred == 1.0).any()
    logloss, ne = logloss_ne(pred, label, weight)
    expected = brute_logloss(pred, label, weight)
    assert logloss == pytest.approx(expected, rel=1e-12)
    base = label[weight > 0].mean()
    assert ne == pytest.approx(expected / -(base * math.log(base) + (1 - base) * math.log(1 - base)), rel=1e-12)
    # not bits: log2 would be larger by 1/ln 2
    assert logloss != pytest.approx(expected / math.log(2), rel=1e-3)


def test_base_rate_predictor_has_ne_one_and_logloss_equal_to_entropy():
    label = (np.random.default_rng(4).random(1000) < 0.2).astype(np.float64)
    base = label.mean()
    logloss, ne = logloss_ne(np.full(len(label), base), label)
    assert ne == pytest.approx(1.0, abs=1e-12)
    assert logloss == pytest.approx(-(base * math.log(base) + (1 - base) * math.log(1 - base)), rel=1e-12)


def test_eval_metrics_logloss_and_ne_in_nats():
    parts = batches(5)
    out = run_metrics(parts)
    prob = torch.sigmoid(torch.cat([b[0] for b in parts]).double()).numpy()
    labels = torch.cat([b[1] for b in parts]).double().numpy()
    weights = torch.cat([b[2] for b in parts]).double().numpy()
    for k, t in enumerate(TASKS):
        expected = brute_logloss(prob[:, k], labels[:, k], weights)
        base = labels[weights > 0, k].mean()
        assert set(out[t]) == KEYS
        assert out[t]["n"] == int((weights > 0).sum())
        assert out[t]["logloss"] == pytest.approx(expected, rel=1e-9)
        assert out[t]["ne"] == pytest.approx(
            expected / -(base * math.log(base) + (1 - base) * math.log(1 - base)), rel=1e-9
        )
        assert out[t]["auc"] == pytest.approx(brute_auc(prob[:, k], labels[:, k], weights), abs=1e-12)


@pytest.mark.parametrize("zero_weights", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_gauc_matches_brute_force_per_user_loop(seed, zero_weights):
    pred, label, user, weight = tied_data(400, seed, zero_weights)
    user[user == 0] = 99  # users of one class only are skipped
    label[user == 99] = 1.0
    expected = brute_gauc(pred, label, user, weight)
    assert gauc(pred, label, user, weight) == pytest.approx(expected, abs=1e-12)
    assert gauc(pred, label, user, weight) != pytest.approx(auc(pred, label, weight), abs=1e-6)
    assert math.isnan(gauc(pred, np.ones_like(label), user, weight))


def metrics_of_this_ranks_half(env: DistEnv) -> dict:
    """On each rank (run by on_ranks): the metrics of its share of every batch, gathered across ranks."""
    half = [tuple(x.chunk(env.world_size)[env.rank] for x in b) for b in batches(11)]
    return run_metrics(half)


def test_two_gloo_ranks_equal_one_process():
    results = on_ranks(metrics_of_this_ranks_half, nproc=2)
    single = run_metrics(batches(11))
    for rank in range(2):
        got = results[rank]
        assert set(got) == set(single)
        for t in TASKS:
            assert set(got[t]) == KEYS
            assert got[t]["n"] == single[t]["n"]
            for k, tol in (("auc", 1e-9), ("gauc", 1e-9), ("logloss", 1e-6), ("ne", 1e-6)):
                assert got[t][k] == pytest.approx(single[t][k], abs=tol), (rank, t, k)
