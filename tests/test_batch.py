"""Batches: KJT layout, padding rows, jagged gathers, and the Pipelineable protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from iat_rec.batching.batch import Batch, gather_jagged, make_batch, sparse_kjt
from iat_rec.data.instance_log import write_instance_log
from iat_rec.data.schema import Schema
from tests.helpers import random_columns

# single- and multi-valued features interleaved, so "schema order" is not "singles first"
SCHEMA = Schema.from_dict(
    {
        "user": "u",
        "timestamp": "t",
        "labels": [{"name": "y1", "column": "y1"}, {"name": "y2", "column": "y2"}],
        "sparse": [
            {"name": "a", "column": "a", "hash": 17},
            {"name": "tags", "column": "tags", "vocab": list("pqrstu"), "separator": "|"},
            {"name": "b", "column": "b", "hash": 5},
            {"name": "kw", "column": "kw", "hash": 11, "separator": ";"},
        ],
        "dense": [{"name": "d1", "column": "d1", "norm": "none"}, {"name": "d2", "column": "d2", "norm": "none"}],
    }
)


def build_log(path, n=40, users=5, seed=0):
    """A random log (timestamps in [0, 12): plenty of ties); returns it with a per-row Python
    reference in *log* (sorted) order."""
    cols = random_columns(SCHEMA, n, users, seed, ts_max=12, max_ids=3)
    log = write_instance_log(path, SCHEMA, cols, source="test")
    user, ts = cols.user, cols.ts
    single = cols.sparse
    lists = {
        k: [values[s:e].tolist() for s, e in zip(np.cumsum(lengths) - lengths, np.cumsum(lengths))]
        for k, (values, lengths) in cols.multi.items()
    }
    perm = sorted(range(n), key=lambda i: (user[i], ts[i]))  # stable: ties keep input order
    ref = {
        "user": [int(user[i]) for i in perm],
        "ts": [int(ts[i]) for i in perm],
        "labels": cols.labels[perm],
        "dense": cols.dense[perm],
        **{k: [[int(single[k][i])] for i in perm] for k in single},
        **{k: [[int(v) for v in lists[k][i]] for i in perm] for k in lists},
    }
    return log, ref


@pytest.fixture(scope="module")
def logref(tmp_path_factory):
    return build_log(tmp_path_factory.mktemp("log") / "log")


def test_writer_reorders_rows_and_csr_lists(logref):
    log, ref = logref
    np.testing.assert_array_equal(log.user, ref["user"])
    np.testing.assert_array_equal(log.ts, ref["ts"])
    np.testing.assert_array_equal(log.dense, ref["dense"])
    for name in ("tags", "kw"):
        values, offsets = log.sparse[name]
        got = [values[offsets[i] : offsets[i + 1]].tolist() for i in range(log.rows)]
        assert got == ref[name], name
    for name in ("a", "b"):
        assert [[int(v)] for v in log.sparse[name]] == ref[name]


def rows_with_padding(log, seed, n=13):
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, log.rows, n)  # repeats allowed
    rows[rng.random(n) < 0.3] = -1
    rows[0], rows[-1] = -1, log.rows - 1
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kjt_is_key_major_in_schema_order(logref, seed):
    log, ref = logref
    rows = rows_with_padding(log, seed)
    b = len(rows)
    kjt = make_batch(log, rows).sparse
    names = SCHEMA.sparse_names
    assert kjt.keys() == names == ["a", "tags", "b", "kw"]
    assert kjt.stride() == b
    lengths = kjt.lengths().view(len(names), b)  # key-major: [key][row]
    want_values, want_lengths = [], []
    for name in names:
        for r in rows:
            lst = ref[name][r] if r >= 0 else []
            want_lengths.append(len(lst))
            want_values += lst
    assert kjt.lengths().tolist() == want_lengths
    assert kjt.values().tolist() == want_values
    assert kjt.values().dtype == torch.int64
    assert (lengths[:, rows < 0] == 0).all()
    # TorchRec reads it the same way: per-key jagged rows
    per_key = kjt.to_dict()
    for name in names:
        jt = per_key[name]
        got = [jt.values()[s:e].tolist() for s, e in zip(jt.offsets()[:-1].tolist(), jt.offsets()[1:].tolist())]
        assert got == [ref[name][r] if r >= 0 else [] for r in rows], name


def test_sparse_kjt_subset_and_order(logref):
    log, ref = logref
    rows = np.array([3, -1, 0, 7])
    kjt = sparse_kjt(log, rows, ["kw", "a"])
    assert kjt.keys() == ["kw", "a"]
    want = [ref["kw"][r] if r >= 0 else [] for r in rows] + [ref["a"][r] if r >= 0 else [] for r in rows]
    assert kjt.lengths().tolist() == [len(x) for x in want]
    assert kjt.values().tolist() == [v for x in want for v in x]


def test_padding_rows(logref):
    log, ref = logref
    rows = np.array([-1, 5, -1, -1, 2, -1])
    bt = make_batch(log, rows)
    pad = torch.from_numpy(rows < 0)
    assert bt.ids.tolist() == rows.tolist()
    assert bt.weights.tolist() == [0.0 if r < 0 else 1.0 for r in rows]
    assert bt.users.tolist() == [ref["user"][r] if r >= 0 else -1 for r in rows]
    assert (bt.dense[pad] == 0).all() and (bt.labels[pad] == 0).all()
    np.testing.assert_array_equal(bt.dense[~pad].numpy(), ref["dense"][[5, 2]])
    np.testing.assert_array_equal(bt.labels[~pad].numpy(), ref["labels"][[5, 2]])
    assert bt.dense.dtype == bt.labels.dtype == bt.weights.dtype == torch.float32
    assert bt.ids.dtype == bt.users.dtype == torch.int64
    assert (bt.sparse.lengths().view(4, len(rows))[:, pad] == 0).all()


def test_all_padding_batch(logref):
    log, _ = logref
    bt = make_batch(log, np.full(4, -1))
    assert bt.sparse.values().numel() == 0 and bt.sparse.lengths().tolist() == [0] * 16
    assert bt.weights.sum() == 0 and bt.dense.shape == (4, 2) and bt.labels.shape == (4, 2)


def test_batch_does_not_alias_the_callers_rows(logref):
    log, _ = logref
    rows = np.array([1, 2, 3, -1])
    bt = make_batch(log, rows)
    rows[:] = 0
    assert bt.ids.tolist() == [1, 2, 3, -1]
    ro = np.array([4, 5])
    ro.setflags(write=False)  # e.g. a slice of a memory-mapped array
    assert make_batch(log, ro).ids.tolist() == [4, 5]


def gather_reference(lists, rows):
    picked = [lists[r] if r >= 0 else [] for r in rows]
    return [len(x) for x in picked], [v for x in picked for v in x]


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    lists=st.lists(st.lists(st.integers(0, 2**40), max_size=5), max_size=12),
    picks=st.lists(st.integers(-1, 11), max_size=20),
)
def test_gather_jagged_matches_reference(lists, picks):
    values = np.asarray([v for x in lists for v in x], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
    rows = np.asarray([p if p < len(lists) else -1 for p in picks], dtype=np.int64)
    lengths, vals = gather_jagged(values, offsets, rows)
    want_lengths, want_values = gather_reference(lists, rows)
    assert lengths.tolist() == want_lengths
    assert vals.tolist() == want_values
    assert vals.dtype == np.int64 and lengths.shape == rows.shape


def test_gather_jagged_on_memory_mapped_columns(logref):
    log, ref = logref
    values, offsets = log.sparse["tags"]
    assert isinstance(values, np.memmap)
    rows = np.arange(log.rows)[::-1].copy()
    lengths, vals = gather_jagged(values, offsets, rows)
    assert (lengths.tolist(), vals.tolist()) == gather_reference(ref["tags"], rows)


# ---------------------------------------------------------------- Pipelineable


def tensor_fields(b: Batch):
    return {k: getattr(b, k) for k in ("dense", "labels", "weights", "ids", "users")}


def assert_same_batch(x: Batch, y: Batch):
    for k, v in tensor_fields(x).items():
        assert torch.equal(v, getattr(y, k)), k
    assert x.sparse.keys() == y.sparse.keys()
    assert torch.equal(x.sparse.values(), y.sparse.values())
    assert torch.equal(x.sparse.lengths(), y.sparse.lengths())


def test_batch_to(logref):
    log, _ = logref
    b = make_batch(log, rows_with_padding(log, 5))
    assert isinstance(b, Pipelineable)
    moved = b.to(torch.device("cpu"), non_blocking=True)
    assert type(moved) is Batch and isinstance(moved.sparse, KeyedJaggedTensor)
    assert_same_batch(b, moved)
    meta = b.to(torch.device("meta"))
    assert all(t.device.type == "meta" for t in tensor_fields(meta).values())
    assert meta.sparse.values().device.type == "meta"
    assert b.dense.device.type == "cpu"  # the original is untouched


def test_batch_pin_memory(logref):
    log, _ = logref
    b = make_batch(log, rows_with_padding(log, 6))
    try:
        pinned = b.pin_memory()
    except RuntimeError as e:
        # pinning needs an accelerator runtime; the CPU-only torch build has none
        pytest.skip(f"pin_memory unavailable on this torch build: {e}")
    assert all(t.is_pinned() for t in tensor_fields(pinned).values())
    assert pinned.sparse.values().is_pinned()
    assert_same_batch(b, pinned)


def test_batch_record_stream_reaches_every_field(logref, monkeypatch):
    """record_stream needs a CUDA stream to run for real; check it fans out to every tensor and the KJT."""
    log, _ = logref
    b = make_batch(log, rows_with_padding(log, 7))
    assert callable(getattr(b, "record_stream", None))
    seen = []
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: seen.append((id(self), s)))
    monkeypatch.setattr(KeyedJaggedTensor, "record_stream", lambda self, s: seen.append((id(self), s)))
    stream = object()
    b.record_stream(stream)
    want = {id(t) for t in tensor_fields(b).values()} | {id(b.sparse), id(b.shared)}
    assert {i for i, _ in seen} == want and all(s is stream for _, s in seen)
