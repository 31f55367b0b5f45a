"""Loaders: splits, orders, windows, equal per-rank batch counts, and exact resume."""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest

from iat_rec.batching.loaders import BatchDataset, EpochLoader, time_order, user_windows
from iat_rec.data.instance_log import time_split
from iat_rec.data.schema import Schema
from iat_rec.errors import IatError
from tests.helpers import random_log

SCHEMA = Schema.from_dict(
    {
        "user": "u",
        "timestamp": "t",
        "labels": [{"name": "y", "column": "y"}],
        "sparse": [
            {"name": "a", "column": "a", "hash": 13},
            {"name": "tags", "column": "tags", "hash": 7, "separator": "|"},
        ],
        "dense": [{"name": "d", "column": "d", "norm": "none"}],
    }
)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    d = tmp_path_factory.mktemp("logs")
    return [
        random_log(d / f"l{i}", SCHEMA, n, u, i, ts_max=30, max_ids=2)  # ts ties within and across users
        for i, (n, u) in enumerate([(61, 7), (23, 3), (100, 1), (40, 40)])
    ]


@pytest.fixture(scope="module")
def log(logs):
    return logs[0]


# ---------------------------------------------------------------- splits, orders, windows


def test_time_split_covers_all_rows_in_time_order(logs):
    for log in logs:
        ts = np.asarray(log.ts)
        sp = time_split(log)
        assert list(sp) == ["train", "valid", "test"]
        allrows = np.concatenate(list(sp.values()))
        assert sorted(allrows.tolist()) == list(range(log.rows))  # cover, no overlap
        for rows in sp.values():
            assert (np.diff(rows) > 0).all()  # (user, time) order = row order
        parts = [ts[r] for r in sp.values() if len(r)]
        for early, late in zip(parts, parts[1:]):
            assert early.max() < late.min()  # one timestamp never straddles two splits
        assert len(sp["train"]) >= 0.5 * log.rows


def test_time_split_rejects_bad_quantiles(log):
    for q in [(0.9, 0.8), (0.0, 0.5), (0.5, 1.0), (0.5, 0.5)]:
        with pytest.raises(IatError):
            time_split(log, q)


def test_time_order_is_global_and_stable(log):
    ts = np.asarray(log.ts)
    for rows in [np.arange(log.rows), time_split(log)["train"], time_split(log)["test"]]:
        order = time_order(log, rows)
        assert sorted(order.tolist()) == sorted(rows.tolist())
        t = ts[order]
        assert (np.diff(t) >= 0).all()
        ties = np.diff(t) == 0
        assert (np.diff(order)[ties] > 0).all()  # ties keep (user, time) order


@pytest.mark.parametrize("window", [1, 2, 5, 64])
def test_user_windows(logs, window):
    rng = np.random.default_rng(window)
    for log in logs:
        user, ts = np.asarray(log.user), np.asarray(log.ts)
        subset = np.flatnonzero(rng.random(log.rows) < 0.6)  # sorted, with gaps inside users' blocks
        for rows in [*time_split(log).values(), subset, np.arange(log.rows)]:
            w = user_windows(log, rows, window)
            assert w.shape == (len(w), 2) and w.dtype == np.int64
            covered = np.concatenate([np.arange(s, s + n) for s, n in w]) if len(w) else np.zeros(0, int)
            assert covered.tolist() == rows.tolist()  # each row exactly once, in row order
            for s, n in w:
                assert 1 <= n <= window
                assert len(set(user[s : s + n].tolist())) == 1  # one user each
                assert (np.diff(ts[s : s + n]) >= 0).all()  # in time order
            # windows are maximal: only a user's last window in a split may be short
            for (s, n), (s2, _) in zip(w, w[1:]):
                if n < window:
                    assert user[s2] != user[s] or s2 != s + n


def test_user_windows_empty():
    assert user_windows(None, np.zeros(0, np.int64), 4).shape == (0, 2)


# ---------------------------------------------------------------- per-rank batches


def all_rank_rows(make, world):
    """rows[s][r] = row ids of step s on rank r; checks every rank has the same step count."""
    dss = [make(rank, world) for rank in range(world)]
    steps = {len(ds) for ds in dss}
    assert len(steps) == 1, f"unequal batch counts across ranks: {[len(ds) for ds in dss]}"
    return [[ds.rows(s) for ds in dss] for s in range(steps.pop())]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_size", [1, 3, 7, 50])
@pytest.mark.parametrize("shuffle", [False, True])
def test_temporal_batches_cover_each_row_once(log, world, batch_size, shuffle):
    units = time_order(log, time_split(log)["train"])

    def make(rank, w):
        return BatchDataset(log, units, batch_size, rank=rank, world_size=w, shuffle=shuffle, seed=3)

    steps = all_rank_rows(make, world)
    assert len(steps) == max(1, -(-len(units) // (batch_size * world)))
    flat = np.concatenate([r for step in steps for r in step])
    assert all(len(r) == batch_size for step in steps for r in step)
    real = flat[flat >= 0]
    assert sorted(real.tolist()) == sorted(units.tolist())  # each once
    assert len(flat) - len(real) < batch_size * world  # padding fills the last step only
    if not shuffle:
        assert real.tolist() == units.tolist()  # global batch s * world + r keeps the time order


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_size,window", [(1, 1), (2, 4), (3, 3), (40, 8)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_window_batches_cover_each_row_once(log, world, batch_size, window, shuffle):
    user = np.asarray(log.user)
    for split in ("train", "test"):
        wins = user_windows(log, time_split(log)[split], window)

        def make(rank, w, wins=wins):
            return BatchDataset(log, wins, batch_size, rank=rank, world_size=w, window=window, shuffle=shuffle, seed=1)

        steps = all_rank_rows(make, world)
        seen = []
        for step in steps:
            for rows in step:
                assert rows.shape == (batch_size * window,)
                for slot in rows.reshape(batch_size, window):
                    real = slot[slot >= 0]
                    assert (slot[len(real) :] == -1).all()  # padding at the end of a window
                    if len(real):
                        assert (np.diff(real) == 1).all() and len(set(user[real].tolist())) == 1
                        seen.append(real.tolist())
        assert sorted(seen) == sorted(np.arange(s, s + n).tolist() for s, n in wins)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_fewer_units_than_ranks(log, world):
    units = np.array([5, 9])
    steps = all_rank_rows(lambda r, w: BatchDataset(log, units, 4, rank=r, world_size=w), world)
    assert len(steps) == 1
    assert sorted(x for r in steps[0] for x in r.tolist() if x >= 0) == [5, 9]
    empty = all_rank_rows(lambda r, w: BatchDataset(log, np.zeros(0, np.int64), 4, rank=r, world_size=w), world)
    assert len(empty) == 1 and all((r == -1).all() for r in empty[0])
    b = BatchDataset(log, np.zeros(0, np.int64), 4, rank=world - 1, world_size=world)[0]
    assert b.weights.sum() == 0  # an all-padding batch still has the full shape
    assert b.ids.shape == (4,)


def test_shuffle_is_shared_by_ranks_and_changes_per_epoch(log):
    units = np.arange(log.rows)
    a, b = (BatchDataset(log, units, 4, rank=r, world_size=2, shuffle=True, seed=7) for r in (0, 1))
    e0 = [a.rows(i).tolist() + b.rows(i).tolist() for i in range(len(a))]
    assert sorted(x for s in e0 for x in s if x >= 0) == units.tolist()
    a.set_epoch(1), b.set_epoch(1)
    e1 = [a.rows(i).tolist() + b.rows(i).tolist() for i in range(len(a))]
    assert e0 != e1 and sorted(x for s in e1 for x in s if x >= 0) == units.tolist()
    a.set_epoch(0)
    assert a.rows(0).tolist() == e0[0][:4]


def test_dataset_items_are_batches_of_its_rows(log):
    wins = user_windows(log, np.arange(log.rows), 3)
    ds = BatchDataset(log, wins, 2, rank=1, world_size=2, window=3)
    for i in range(len(ds)):
        b = ds[i]
        assert b.ids.tolist() == ds.rows(i).tolist()
        assert b.weights.tolist() == (ds.rows(i) >= 0).astype(np.float32).tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]


# ---------------------------------------------------------------- EpochLoader resume


def key(b):
    return (b.ids.tolist(), b.sparse.lengths().tolist(), b.sparse.values().tolist(), b.dense.flatten().tolist())


def make_dataset(log, kind, rank=0, world=2):
    if kind == "temporal":
        units = time_order(log, time_split(log)["train"])
        return BatchDataset(log, units, 7, rank=rank, world_size=world)  # 4 batches / epoch
    wins = user_windows(log, time_split(log)["train"], 4)
    return BatchDataset(log, wins, 3, rank=rank, world_size=world, window=4, shuffle=True, seed=11)


def save_load(state):
    """The state must survive a checkpoint, where it is JSON (rank<r>.json)."""
    return json.loads(json.dumps(state))


def run_resume(log, kind, k, ahead, n_after, num_workers=0):
    ref_loader = EpochLoader(make_dataset(log, kind), num_workers=num_workers)
    ref = [key(b) for b in islice(iter(ref_loader), k + max(ahead, n_after))]
    first = EpochLoader(make_dataset(log, kind), num_workers=num_workers)
    it = iter(first)
    got = [key(next(it)) for _ in range(k + ahead)]  # a train pipeline pulls ahead of the model
    assert got == ref[: k + ahead]
    state = save_load(first.state_at(k))
    resumed = EpochLoader(make_dataset(log, kind), num_workers=num_workers)
    resumed.load_state_dict(state)
    after = [key(b) for b in islice(iter(resumed), n_after)]
    assert after == ref[k : k + n_after], f"resume at {k} (pulled {k + ahead}) diverged"
    return len(first)


@pytest.mark.parametrize("kind", ["temporal", "windows"])
@pytest.mark.parametrize("k,ahead", [(0, 0), (1, 0), (2, 2), (3, 0), (4, 0), (4, 3), (5, 1), (9, 0)])
def test_resume_equals_uninterrupted(log, kind, k, ahead):
    epoch = run_resume(log, kind, k, ahead, n_after=6)
    assert epoch == 4 if kind == "temporal" else epoch >= 2  # k spans epoch ends


def test_resume_twice(log):
    ref = [key(b) for b in islice(iter(EpochLoader(make_dataset(log, "windows"))), 14)]
    a = EpochLoader(make_dataset(log, "windows"))
    it = iter(a)
    for _ in range(5):
        next(it)
    b = EpochLoader(make_dataset(log, "windows"))
    b.load_state_dict(save_load(a.state_at(5)))
    it = iter(b)
    got = [key(next(it)) for _ in range(4)]
    c = EpochLoader(make_dataset(log, "windows"))
    c.load_state_dict(save_load(b.state_at(4)))  # counts restart at the resume point
    got += [key(x) for x in islice(iter(c), 5)]
    assert got == ref[5:14]


def test_shuffled_epochs_differ_and_cover(log):
    ds = make_dataset(log, "windows", world=1)
    n = len(ds)
    batches = [key(b) for b in islice(iter(EpochLoader(ds)), 2 * n)]
    e0 = sorted(x for b in batches[:n] for x in b[0] if x >= 0)
    e1 = sorted(x for b in batches[n:] for x in b[0] if x >= 0)
    assert e0 == e1 == time_split(log)["train"].tolist()
    assert [b[0] for b in batches[:n]] != [b[0] for b in batches[n:]]


@pytest.mark.parametrize("k,ahead", [(2, 1), (4, 0)])
def test_resume_with_a_worker_process(log, k, ahead):
    run_resume(log, "windows" if k == 2 else "temporal", k, ahead, n_after=5, num_workers=1)
