"""A property-based battery for ingest: random schemas, random CSV and Parquet files, and each
kind of bad value in each kind of column.

A good file must give the log a plain reference reader gives (written here from the
documented rules, row by row); a file with one bad value must end in one ``IatError`` that
names the column, with nothing on disk (no log, no temporary directory). Bounded to about a
minute on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iat_rec.data.ingest import ingest, stable_hash
from iat_rec.data.instance_log import InstanceLog
from iat_rec.data.schema import Schema
from iat_rec.errors import IatError
from tests.helpers import write_csv, write_parquet

VOCAB = ("a", "b", "c")
HASH = 97
# column kind -> bad values it must refuse (None: a missing value)
BAD = {
    "user": ["", "  ", None],
    "ts": ["abc", "", "1e300", None],
    "label": ["2", "-1", "x", "", "nan", None],
    "label_time": ["early"],  # a label known before its instance
    "vocab": ["z", "", None],
    "hash": ["", None],
    "dense": ["x", "inf", "nan", "1e39", "", None],
}


@st.composite
def cases(draw):
    """(schema, columns as Python lists, bad: (kind, column, row, value) | None, format)."""
    n = draw(st.integers(1, 25))
    users = draw(st.lists(st.sampled_from(["u1", "u10", "u2", "Ünï", "x y"]), min_size=n, max_size=n))
    ts = draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n, unique=True))  # no duplicate rows
    cols = {"uid": users, "ts": ts, "click": draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))}
    delay = draw(st.lists(st.integers(0, 500), min_size=n, max_size=n))
    cols["click_at"] = [t + d for t, d in zip(ts, delay)]
    cols["genre"] = draw(st.lists(st.sampled_from(VOCAB), min_size=n, max_size=n))
    cols["item"] = draw(st.lists(st.text("abcdef", min_size=1, max_size=4), min_size=n, max_size=n))
    cols["tags"] = [
        "|".join(t) for t in draw(st.lists(st.lists(st.sampled_from(VOCAB), max_size=3), min_size=n, max_size=n))
    ]
    cols["price"] = draw(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=n, max_size=n))
    with_dense = draw(st.booleans())
    schema = Schema.from_dict(
        {
            "user": "uid",
            "timestamp": "ts",
            "labels": [{"name": "click", "column": "click", "available_at": "click_at"}],
            "sparse": [
                {"name": "genre", "column": "genre", "vocab": list(VOCAB)},
                {"name": "item", "column": "item", "hash": HASH},
                {"name": "tags", "column": "tags", "vocab": list(VOCAB), "separator": "|"},
            ],
            "dense": [{"name": "price", "column": "price", "norm": "none"}] if with_dense else [],
        }
    )
    if not with_dense:
        del cols["price"]
    bad = None
    if draw(st.booleans()):
        kinds = {
            "user": "uid",
            "ts": "ts",
            "label": "click",
            "label_time": "click_at",
            "vocab": "genre",
            "hash": "item",
        }
        if with_dense:
            kinds["dense"] = "price"
        kind = draw(st.sampled_from(sorted(kinds)))
        row, value = draw(st.integers(0, n - 1)), draw(st.sampled_from(BAD[kind]))
        bad = (kind, kinds[kind], row, value)
    return schema, cols, bad, draw(st.sampled_from(["csv", "parquet"]))


PARQUET_TYPES = {
    "uid": pa.string(),
    "ts": pa.int64(),
    "click": pa.int64(),
    "click_at": pa.int64(),
    "genre": pa.string(),
    "item": pa.string(),
    "tags": pa.string(),
    "price": pa.float64(),
}


def write_input(folder: Path, cols: dict, bad, fmt: str) -> Path:
    cols = {k: list(v) for k, v in cols.items()}
    if bad is not None:
        kind, column, row, value = bad
        cols[column][row] = cols["ts"][row] - 1 if value == "early" else value
    rows = [dict(zip(cols, r)) for r in zip(*cols.values())]
    if fmt == "csv":
        return write_csv(folder / "in.csv", rows, list(cols))
    return write_parquet(folder / "in.parquet", rows, {name: PARQUET_TYPES[name] for name in cols})


def reference(schema: Schema, cols: dict) -> dict[str, np.ndarray]:
    """The log by the documented rules: rows sorted by (user key, ts), ties in file order."""
    n = len(cols["uid"])
    order = sorted(range(n), key=lambda i: (cols["uid"][i], cols["ts"][i], i))
    keys = sorted(set(cols["uid"]))
    tags = [[t for t in cols["tags"][i].split("|") if t] for i in order]
    out = {
        "user_keys": np.asarray(keys),
        "user": np.asarray([keys.index(cols["uid"][i]) for i in order]),
        "ts": np.asarray([cols["ts"][i] for i in order]),
        "labels": np.asarray([[cols["click"][i]] for i in order], np.float32),
        "label_time": np.asarray([[cols["click_at"][i]] for i in order]),
        "genre": np.asarray([VOCAB.index(cols["genre"][i]) for i in order]),
        "item": stable_hash([cols["item"][i] for i in order], HASH),
        "tags.values": np.asarray([VOCAB.index(t) for ts in tags for t in ts], np.int64),
        "tags.offsets": np.cumsum([0] + [len(t) for t in tags]),
    }
    if schema.dense:
        out["dense"] = np.asarray([[cols["price"][i]] for i in order], np.float32)
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_ingest_gives_the_reference_log_or_one_clear_error_and_nothing_written(tmp_path_factory, case):
    schema, cols, bad, fmt = case
    folder = tmp_path_factory.mktemp("case")
    path, out = write_input(folder, cols, bad, fmt), folder / "log"
    if bad is not None:
        kind, column, row, value = bad
        with pytest.raises(IatError) as err:
            ingest(path, schema, out)
        assert f"column '{column}'" in str(err.value), (bad, str(err.value))
        assert sorted(p.name for p in folder.iterdir()) == [path.name], "something was written"
        return
    log = InstanceLog(ingest(path, schema, out).path)
    log.verify()
    want = reference(schema, cols)
    got = {
        "user_keys": log.user_keys,
        "user": log.user,
        "ts": log.ts,
        "labels": log.labels,
        "label_time": log.label_time,
        "genre": log.sparse["genre"],
        "item": log.sparse["item"],
        "tags.values": log.sparse["tags"][0],
        "tags.offsets": log.sparse["tags"][1],
    }
    if schema.dense:
        got["dense"] = log.dense
    for name, value in want.items():
        np.testing.assert_array_equal(np.asarray(got[name]), value, err_msg=name)


def test_a_label_column_that_is_also_a_feature_is_refused():
    with pytest.raises(IatError, match="column 'click' is both feature 'clicked' and .* label 'click'"):
        Schema.from_dict(
            {
                "user": "uid",
                "timestamp": "ts",
                "labels": [{"name": "click", "column": "click"}],
                "sparse": [{"name": "clicked", "column": "click", "hash": 2}],
            }
        )


@pytest.mark.parametrize(
    "column,array,message",
    [
        ("item", pa.array([[1, 2], [3]]), "column .item. has type list<.*>, which the schema cannot read"),
        ("ts", pa.array([2**64 - 1, 5], type=pa.uint64()), "timestamp out of range"),
        ("price", pa.array([1.0, 1e300]), "beyond the float32 range"),
    ],
)
def test_parquet_columns_it_cannot_represent_are_one_clear_error(tmp_path, column, array, message):
    cols = {
        "uid": pa.array(["a", "b"]),
        "ts": pa.array([1, 2]),
        "click": pa.array([0, 1]),
        "item": pa.array(["x", "y"]),
        "price": pa.array([1.0, 2.0]),
    }
    cols[column] = array
    pq.write_table(pa.table(cols), tmp_path / "in.parquet")
    schema = Schema.from_dict(
        {
            "user": "uid",
            "timestamp": "ts",
            "labels": [{"name": "click", "column": "click"}],
            "sparse": [{"name": "item", "column": "item", "hash": 10}],
            "dense": [{"name": "price", "column": "price", "norm": "standard"}],
        }
    )
    with pytest.raises(IatError, match=message):
        ingest(tmp_path / "in.parquet", schema, tmp_path / "log")
    assert not (tmp_path / "log").exists()
