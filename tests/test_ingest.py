"""Ingest: CSV/Parquet + schema -> instance log, and every way the input can be wrong.

The good path is checked against a pure-Python reference built from the same rows. Each
bad input must end in one error line naming the file, the column and the row, exit code 2,
and nothing on disk: no output directory, no temporary directory beside it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from iat_rec.cli import main
from iat_rec.data import ingest as ingest_mod
from iat_rec.data.ingest import ingest, stable_hash
from iat_rec.data.instance_log import InstanceLog
from iat_rec.data.schema import Schema, load_schema
from iat_rec.errors import IatError
from tests.helpers import (
    INGEST_COLUMNS,
    INGEST_PARQUET_TYPES,
    INGEST_ROWS,
    INGEST_SCHEMA_YAML,
    write_csv,
    write_parquet,
)

# sorted user keys: u1 < u10 < u2; within a user by ts, ties in input order
EXPECTED_PERM = [2, 5, 7, 6, 1, 3, 0, 4]
EXPECTED_OFFSETS = [0, 3, 5, 8]


@pytest.fixture
def schema_path(tmp_path):
    p = tmp_path / "schema.yaml"
    p.write_text(INGEST_SCHEMA_YAML)
    return p


@pytest.fixture
def schema(schema_path):
    return load_schema(schema_path)


def blake_ref(value: str, size: int) -> int:
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little") % size


def expected_columns():
    """Pure-Python reference of every array the log should hold."""
    perm = sorted(range(len(INGEST_ROWS)), key=lambda i: (INGEST_ROWS[i]["uid"], INGEST_ROWS[i]["ts"]))  # stable
    rows = [INGEST_ROWS[i] for i in perm]
    vocab = {"genre": ["a", "b", "c"], "tags": ["x", "y", "z"]}

    def multi(field, sep, enc):
        lists = [[enc(t) for t in r[field].split(sep) if t != ""] for r in rows]
        return [v for lst in lists for v in lst], np.cumsum([0] + [len(lst) for lst in lists])

    def norm(values, how):
        x = np.asarray(values, dtype=np.float64)
        if how == "log":
            x = np.sign(x) * np.log1p(np.abs(x))
        if how in ("log", "standard"):
            x = (x - x.mean()) / (x.std() or 1.0)
        if how == "minmax":
            x = (x - x.min()) / ((x.max() - x.min()) or 1.0)
        return x

    tags_v, tags_o = multi("tags", "|", vocab["tags"].index)
    kw_v, kw_o = multi("kw", ";", lambda t: blake_ref(t, 50))
    return dict(
        perm=perm,
        ts=[r["ts"] for r in rows],
        user=[{"u1": 0, "u10": 1, "u2": 2}[r["uid"]] for r in rows],
        labels=[[r["click"], r["conv"]] for r in rows],
        label_time=[[r["ts"], r["conv_time"]] for r in rows],
        item=[blake_ref(str(r["item"]), 1000) for r in rows],
        genre=[vocab["genre"].index(r["genre"]) for r in rows],
        tags=(tags_v, tags_o),
        kw=(kw_v, kw_o),
        dense=np.stack(
            [
                norm([r[c] for r in rows], how)
                for c, how in [("price", "log"), ("age", "standard"), ("score", "minmax"), ("raw", "none")]
            ],
            1,
        ),
    )


def assert_matches_reference(log: InstanceLog):
    ref = expected_columns()
    assert ref["perm"] == EXPECTED_PERM
    assert log.rows == len(INGEST_ROWS) and log.users == 3
    assert list(log.user_keys) == ["u1", "u10", "u2"]
    np.testing.assert_array_equal(log.user_offsets, EXPECTED_OFFSETS)
    np.testing.assert_array_equal(log.ts, ref["ts"])
    np.testing.assert_array_equal(log.user, ref["user"])
    np.testing.assert_array_equal(log.labels, np.asarray(ref["labels"], np.float32))
    np.testing.assert_array_equal(log.label_time, ref["label_time"])
    np.testing.assert_array_equal(log.sparse["item"], ref["item"])
    np.testing.assert_array_equal(log.sparse["genre"], ref["genre"])
    for name in ("tags", "kw"):
        values, offsets = log.sparse[name]
        np.testing.assert_array_equal(values, ref[name][0], err_msg=name)
        np.testing.assert_array_equal(offsets, ref[name][1], err_msg=name)
    np.testing.assert_allclose(log.dense, ref["dense"].astype(np.float32), rtol=1e-6, atol=1e-6)
    assert log.ts.dtype == np.int64 and log.labels.dtype == np.float32 and log.dense.dtype == np.float32
    # the tie (u2, 50) keeps input order: row 0 (item 7) before row 4 (item 11)
    assert [INGEST_ROWS[i]["item"] for i in EXPECTED_PERM[-2:]] == [7, 11]
    # every user's block is contiguous and time-sorted
    for u in range(log.users):
        a, b = log.user_offsets[u], log.user_offsets[u + 1]
        assert (np.asarray(log.user[a:b]) == u).all() and (np.diff(log.ts[a:b]) >= 0).all()
    log.verify()


# ---------------------------------------------------------------- good path


def test_csv_round_trip(tmp_path, schema):
    log = ingest(write_csv(tmp_path / "in.csv"), schema, tmp_path / "log")
    assert_matches_reference(log)
    stats = {s["name"]: s for s in log.manifest["dense_stats"]}
    assert stats["score"]["min"] == -1.0 and stats["score"]["max"] == 2.0
    assert stats["raw"] == {"name": "raw", "norm": "none"}
    assert log.schema == schema  # the schema survives the manifest round trip


def test_parquet_round_trip_identical_to_csv(tmp_path, schema):
    a = ingest(write_csv(tmp_path / "in.csv"), schema, tmp_path / "a")
    b = ingest(write_parquet(tmp_path / "in.parquet"), schema, tmp_path / "b")
    assert_matches_reference(b)
    files = sorted(p.name for p in a.path.glob("*.npy"))
    assert files == sorted(p.name for p in b.path.glob("*.npy"))
    for name in files:
        np.testing.assert_array_equal(np.load(a.path / name), np.load(b.path / name), err_msg=name)
    assert a.fingerprint == b.fingerprint


def test_ingest_is_deterministic_and_order_of_users_irrelevant(tmp_path, schema):
    """Users appearing in another order in the file give the same log (user index = key rank)."""
    a = ingest(write_csv(tmp_path / "a.csv"), schema, tmp_path / "a")
    # reverse the file, but keep each (user, ts) tie group in its original relative order
    rows = sorted(INGEST_ROWS, key=lambda r: r["uid"], reverse=True)
    b = ingest(write_csv(tmp_path / "b.csv", rows), schema, tmp_path / "b")
    assert a.fingerprint == b.fingerprint


def test_chunked_reads_give_the_same_log(tmp_path, schema, monkeypatch):
    whole_csv = ingest(write_csv(tmp_path / "in.csv"), schema, tmp_path / "w1").fingerprint
    whole_pq = ingest(write_parquet(tmp_path / "in.parquet"), schema, tmp_path / "w2").fingerprint
    monkeypatch.setattr(ingest_mod, "CHUNK_ROWS", 3)
    monkeypatch.setattr(ingest_mod, "CSV_BLOCK_BYTES", 160)
    assert ingest(tmp_path / "in.parquet", schema, tmp_path / "c2").fingerprint == whole_pq
    assert ingest(tmp_path / "in.csv", schema, tmp_path / "c1").fingerprint == whole_csv


def test_a_directory_a_glob_and_a_file_url_of_parts_give_the_log_of_the_whole(tmp_path, schema, capsys):
    whole = ingest(write_csv(tmp_path / "whole.csv"), schema, tmp_path / "w").fingerprint
    parts = tmp_path / "parts"
    parts.mkdir()
    write_csv(parts / "day-1.csv", INGEST_ROWS[:3])
    write_csv(parts / "day-2.csv", INGEST_ROWS[3:])
    for spec in (parts, f"{parts}/day-*.csv", f"file://{parts}", f"file://{parts}/day-2.csv"):
        log = ingest(spec, schema, tmp_path / "out")
        assert log.fingerprint == whole or spec == f"file://{parts}/day-2.csv", spec
    assert ingest(f"file://{parts}/day-2.csv", schema, tmp_path / "o2").rows == len(INGEST_ROWS) - 3
    write_parquet(parts / "day-3.parquet")
    for spec, message in (
        (parts, "mixes ['.csv', '.parquet'] files"),
        (f"{tmp_path}/none-*.csv", "no .csv or .parquet files"),
        ("s3://bucket/log.parquet", "only local paths and file:// URLs"),
    ):
        with pytest.raises(IatError, match=re.escape(message)):
            ingest(spec, schema, tmp_path / "bad")
        assert not (tmp_path / "bad").exists()


def test_stable_hash_is_pinned():
    """Hashed ids must never change between versions, processes or machines."""
    assert stable_hash(["abc", "", "u1"], 1000).tolist() == [
        blake_ref("abc", 1000),
        blake_ref("", 1000),
        blake_ref("u1", 1000),
    ]
    assert stable_hash(["abc"], 1 << 30).tolist() == [blake_ref("abc", 1 << 30)]
    assert stable_hash([], 7).shape == (0,)


def test_iso8601_timestamps(tmp_path):
    schema = Schema.from_dict(
        {
            "user": "u",
            "timestamp": "t",
            "labels": [{"name": "y", "column": "y", "available_at": "lt"}],
            "sparse": [{"name": "f", "column": "f", "hash": 10}],
        }
    )
    utc = dt.timezone.utc
    t0 = int(dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=utc).timestamp())
    rows = [
        ("a", "2024-01-02T03:04:05", "2024-01-02T03:04:05", t0),
        ("a", "2024-01-02 03:04:06.7", "2024-01-03", t0 + 1),  # fractional seconds floor; date only
        ("b", "2024-01-02T05:04:05+02:00", "2024-01-02T03:04:05Z", t0),  # zone offsets
        ("b", "2024-01-02T03:05:00Z", "2024-01-02T02:05:00-01:00", t0 + 55),
    ]
    with open(tmp_path / "in.csv", "w") as f:
        f.write("u,t,y,lt,f\n" + "".join(f"{u},{t},1,{lt},x\n" for u, t, lt, _ in rows))
    log = ingest(tmp_path / "in.csv", schema, tmp_path / "log")
    np.testing.assert_array_equal(log.ts, [t0, t0 + 1, t0, t0 + 55])
    day3 = int(dt.datetime(2024, 1, 3, tzinfo=utc).timestamp())
    np.testing.assert_array_equal(log.label_time[:, 0], [t0, day3, t0, t0 + 55])


def test_parquet_native_timestamps_floor_to_seconds(tmp_path):
    schema = Schema.from_dict(
        {
            "user": "u",
            "timestamp": "t",
            "labels": [{"name": "y", "column": "y"}],
            "sparse": [{"name": "f", "column": "f", "hash": 10}],
        }
    )
    ms = [1_500, 2_999, -500, 0]  # -0.5 s floors to -1 s
    table = pa.table(
        {
            "u": ["a", "a", "b", "b"],
            "t": pa.array(ms, pa.timestamp("ms")),
            "y": pa.array([True, False, True, False]),  # boolean labels read as 0/1
            "f": ["p", "q", "r", "s"],
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    log = ingest(tmp_path / "in.parquet", schema, tmp_path / "log")
    np.testing.assert_array_equal(log.ts, [1, 2, -1, 0])
    np.testing.assert_array_equal(log.labels[:, 0], [1, 0, 1, 0])


def test_cli_ingest_prints_a_summary(tmp_path, schema_path, capsys):
    out = tmp_path / "log"
    rc = main(
        [
            "data",
            "ingest",
            "--input",
            str(write_csv(tmp_path / "in.csv")),
            "--schema",
            str(schema_path),
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    log = InstanceLog(out)
    assert (
        f"{len(INGEST_ROWS)} instances" in captured.out
        and "3 users" in captured.out
        and log.fingerprint in captured.out
    )
    assert captured.err == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "log", "schema.yaml"]  # no temp dirs left


# ---------------------------------------------------------------- bad input

OUT_PARENT = "outs"


def run_bad(tmp_path, capsys, input_path, schema_path, *needles):
    """Runs the CLI on bad input: exit 2, one error line holding every needle, nothing on disk."""
    out = tmp_path / OUT_PARENT / "log"
    rc = main(["data", "ingest", "--input", str(input_path), "--schema", str(schema_path), "--out", str(out)])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2, captured
    assert len(lines) == 1 and lines[0].startswith("iat-rec: error: "), captured.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert captured.out == ""
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    return lines[0]


def with_value(index, **values):
    rows = [dict(r) for r in INGEST_ROWS]
    rows[index].update(values)
    return rows


# (case id, rows, column, row number): the bad value sits at 0-based input row `index`,
# i.e. data row index + 1, file line index + 2
BAD_VALUES = [
    ("ts-text", with_value(3, ts="yesterday"), "ts", 3, "not a number"),
    ("ts-empty", with_value(5, ts=""), "ts", 5, "missing value"),
    ("ts-inf", with_value(4, ts="inf"), "ts", 4, "not a finite number"),
    ("ts-nan", with_value(1, ts="nan"), "ts", 1, "not a finite number"),
    ("ts-huge", with_value(6, ts="1e300"), "ts", 6, "out of range"),
    (
        "ts-iso-then-garbage",
        [dict(r, ts="soon" if i == 6 else f"2024-01-0{i + 1}T00:00:00") for i, r in enumerate(INGEST_ROWS)],
        "ts",
        6,
        "ISO-8601",
    ),
    ("dense-nan", with_value(2, price=float("nan")), "price", 2, "not a finite number"),
    ("dense-inf", with_value(7, age="-inf"), "age", 7, "not a finite number"),
    ("dense-text", with_value(5, score="abc"), "score", 5, "not a number"),
    (
        "dense-underscore",
        with_value(3, raw="1_0"),
        "raw",
        3,
        "not a number",
    ),  # python float() accepts it, arrow does not
    ("label-nan", with_value(1, click="nan"), "click", 1, "not a finite number"),
    ("label-inf", with_value(0, conv="inf"), "conv", 0, "not a finite number"),
    ("label-2", with_value(6, click=2), "click", 6, "outside {0, 1}"),
    ("label-half", with_value(4, conv=0.5), "conv", 4, "outside {0, 1}"),
    ("label-text", with_value(2, click="yes"), "click", 2, "not a number"),
    ("label-time-early", with_value(3, conv_time=9), "conv_time", 3, "before its instance"),
    ("label-time-text", with_value(3, conv_time="later"), "conv_time", 3, "not a number"),
    ("vocab-single", with_value(5, genre="d"), "genre", 5, "not in the declared vocabulary"),
    ("vocab-multi", with_value(7, tags="x|w"), "tags", 7, "'w' not in the declared vocabulary"),
    ("vocab-multi-case", with_value(1, tags="X"), "tags", 1, "not in the declared vocabulary"),
]


@pytest.mark.parametrize("rows,column,index,what", [c[1:] for c in BAD_VALUES], ids=[c[0] for c in BAD_VALUES])
def test_bad_values_csv(tmp_path, capsys, schema_path, rows, column, index, what):
    path = write_csv(tmp_path / "in.csv", rows)
    run_bad(
        tmp_path,
        capsys,
        path,
        schema_path,
        str(path),
        f"column '{column}'",
        f"row {index + 1} (line {index + 2})",
        what,
    )


PARQUET_BAD = [
    ("dense-nan", with_value(2, price=float("nan")), {}, "price", 2, "not a finite number"),
    ("ts-float-inf", with_value(4, ts=math.inf), {"ts": pa.float64()}, "ts", 4, "not a finite number"),
    ("label-null", with_value(6, click=None), {}, "click", 6, "missing value"),
    ("dense-null", with_value(1, age=None), {}, "age", 1, "missing value"),
    ("dense-text", with_value(3, price="cheap"), {"price": pa.string()}, "price", 3, "not a number"),
    ("vocab", with_value(0, genre="zz"), {}, "genre", 0, "not in the declared vocabulary"),
    ("label-3", with_value(5, conv=3), {}, "conv", 5, "outside {0, 1}"),
]


@pytest.mark.parametrize("rows,types,column,index,what", [c[1:] for c in PARQUET_BAD], ids=[c[0] for c in PARQUET_BAD])
def test_bad_values_parquet(tmp_path, capsys, schema_path, rows, types, column, index, what):
    path = write_parquet(tmp_path / "in.parquet", rows, {**INGEST_PARQUET_TYPES, **types})
    line = run_bad(tmp_path, capsys, path, schema_path, str(path), f"column '{column}'", f"row {index + 1}", what)
    assert "line" not in line.split("row")[1]  # Parquet has no lines


def test_bad_row_number_in_a_later_chunk(tmp_path, capsys, schema_path, monkeypatch):
    monkeypatch.setattr(ingest_mod, "CHUNK_ROWS", 3)
    monkeypatch.setattr(ingest_mod, "CSV_BLOCK_BYTES", 160)
    rows = with_value(7, price="oops")
    path = write_csv(tmp_path / "in.csv", rows)
    run_bad(tmp_path, capsys, path, schema_path, "column 'price'", "row 8 (line 9)")
    rows = with_value(7, genre="nope")
    path = write_parquet(tmp_path / "in.parquet", rows)
    run_bad(tmp_path, capsys, path, schema_path, "column 'genre'", "row 8")


def test_line_numbers_count_quoted_newlines_and_blank_lines(tmp_path, capsys, schema_path):
    path = write_csv(tmp_path / "in.csv", with_value(0, kw="k1\nk2"))  # a quoted field spanning 2 lines
    text = path.read_text()
    end = text.index("\n") + 1
    text = text[:end] + "\n" + text[end:]  # a blank line 2 (pyarrow skips it)
    assert text.count("99.5") == 1
    path.write_text(text.replace("99.5", "bad"))  # data row 3: lines 3-4 are row 1, line 5 row 2
    run_bad(tmp_path, capsys, path, schema_path, "column 'price'", "row 3 (line 6)")


def test_missing_columns(tmp_path, capsys, schema_path):
    cols = [c for c in INGEST_COLUMNS if c not in ("price", "conv_time")]
    path = write_csv(tmp_path / "in.csv", columns=cols)
    run_bad(tmp_path, capsys, path, schema_path, str(path), "missing columns", "'price'", "'conv_time'")
    write_parquet(tmp_path / "in.parquet", types={c: pa.string() for c in cols})  # every column text
    run_bad(tmp_path, capsys, tmp_path / "in.parquet", schema_path, "missing columns", "'price'")


def test_empty_file(tmp_path, capsys, schema_path):
    (tmp_path / "in.csv").write_bytes(b"")
    run_bad(tmp_path, capsys, tmp_path / "in.csv", schema_path, str(tmp_path / "in.csv"), "empty file")
    (tmp_path / "in.parquet").write_bytes(b"")
    run_bad(tmp_path, capsys, tmp_path / "in.parquet", schema_path, "empty file")


def test_header_only_file(tmp_path, capsys, schema_path):
    path = write_csv(tmp_path / "in.csv", rows=[])
    run_bad(tmp_path, capsys, path, schema_path, str(path), "no data rows")
    path = write_parquet(tmp_path / "in.parquet", rows=[])
    run_bad(tmp_path, capsys, path, schema_path, str(path), "no data rows")


@pytest.mark.parametrize("extra", [True, False], ids=["too-many-fields", "too-few-fields"])
def test_malformed_csv_line(tmp_path, capsys, schema_path, extra):
    path = write_csv(tmp_path / "in.csv")
    lines = path.read_text().splitlines(keepends=True)
    lines[4] = lines[4].rstrip("\n") + ",surplus\n" if extra else lines[4].rsplit(",", 1)[0] + "\n"
    path.write_text("".join(lines))
    want = f"got {len(INGEST_COLUMNS) + 1 if extra else len(INGEST_COLUMNS) - 1}"
    run_bad(
        tmp_path, capsys, path, schema_path, str(path), "row 4 (line 5)", f"expected {len(INGEST_COLUMNS)} fields", want
    )


def test_not_a_parquet_file_and_unknown_suffix(tmp_path, capsys, schema_path):
    (tmp_path / "in.parquet").write_text("uid,ts\n")
    run_bad(tmp_path, capsys, tmp_path / "in.parquet", schema_path, "not a readable Parquet file")
    (tmp_path / "in.json").write_text("{}")
    run_bad(tmp_path, capsys, tmp_path / "in.json", schema_path, "unsupported input type")
    run_bad(tmp_path, capsys, tmp_path / "nope.csv", schema_path, "input file not found", "nope.csv")


@pytest.mark.parametrize("chunk_rows", [None, 3], ids=["one-chunk", "across-chunks"])
def test_duplicate_rows_are_refused(tmp_path, capsys, schema_path, monkeypatch, chunk_rows):
    """A row equal to an earlier one in every column would be one instance logged twice."""
    if chunk_rows:
        monkeypatch.setattr(ingest_mod, "CHUNK_ROWS", chunk_rows)
        monkeypatch.setattr(ingest_mod, "CSV_BLOCK_BYTES", 160)
    rows = INGEST_ROWS + [dict(INGEST_ROWS[3]), dict(INGEST_ROWS[6])]  # data rows 9 and 10 repeat rows 4 and 7
    path = write_csv(tmp_path / "in.csv", rows)
    run_bad(tmp_path, capsys, path, schema_path, str(path), "rows 4 and 9 (lines 5 and 10) are duplicates")
    path = write_parquet(tmp_path / "in.parquet", rows)
    run_bad(tmp_path, capsys, path, schema_path, "rows 4 and 9 are duplicates")


def test_rows_equal_but_for_one_value_or_list_order_are_kept(tmp_path, schema):
    """Same user, time and features but a list in another order, or another label: two instances."""
    rows = INGEST_ROWS + [dict(INGEST_ROWS[0], tags="y|x"), dict(INGEST_ROWS[1], click=1)]
    log = ingest(write_csv(tmp_path / "in.csv", rows), schema, tmp_path / "log")
    assert log.rows == len(INGEST_ROWS) + 2


def test_users_with_a_single_instance_are_accepted(tmp_path, schema):
    rows = INGEST_ROWS + [dict(INGEST_ROWS[0], uid="u7", ts=40), dict(INGEST_ROWS[1], uid="u0", ts=3)]
    log = ingest(write_csv(tmp_path / "in.csv", rows), schema, tmp_path / "log")
    assert list(log.user_keys) == ["u0", "u1", "u10", "u2", "u7"]
    np.testing.assert_array_equal(np.diff(log.user_offsets), [1, 3, 2, 3, 1])
    log.verify()


BAD_SCHEMAS = [
    ("unknown-top-key", INGEST_SCHEMA_YAML + "extra: 1\n", ["unknown keys ['extra']"]),
    (
        "unknown-item-key",
        INGEST_SCHEMA_YAML.replace("hash: 1000}", "hash: 1000, vocabulary: [a]}"),
        ["sparse[0]", "unknown keys ['vocabulary']"],
    ),
    ("not-a-mapping", "- user\n- ts\n", ["expected a mapping at the top level"]),
    ("scalar", "just text\n", ["expected a mapping at the top level"]),
    ("empty", "", ["expected a mapping at the top level"]),
    ("bad-yaml", "user: [unclosed\n", ["not valid YAML"]),
    ("missing-key", INGEST_SCHEMA_YAML.replace("timestamp: ts\n", ""), ["missing required key 'timestamp'"]),
    ("hash-not-int", INGEST_SCHEMA_YAML.replace("hash: 1000", "hash: lots"), ["sparse[0].hash", "expected an integer"]),
    ("hash-zero", INGEST_SCHEMA_YAML.replace("hash: 1000", "hash: 0"), ["hash size must be >= 1"]),
    ("vocab-and-hash", INGEST_SCHEMA_YAML.replace("vocab: [a, b, c]", "vocab: [a, b, c], hash: 3"), ["exactly one of"]),
    (
        "vocab-string",
        INGEST_SCHEMA_YAML.replace("vocab: [a, b, c]", "vocab: abc"),
        ["sparse[1].vocab", "expected a list"],
    ),
    ("vocab-dup", INGEST_SCHEMA_YAML.replace("vocab: [a, b, c]", "vocab: [a, b, a]"), ["vocabulary has duplicates"]),
    ("empty-separator", INGEST_SCHEMA_YAML.replace('separator: "|"', 'separator: ""'), ["sparse[2].separator"]),
    (
        "labels-not-list",
        "user: uid\ntimestamp: ts\nlabels: click\nsparse: [{column: item, hash: 5}]\n",
        ["labels: expected a list"],
    ),
    (
        "sparse-mapping",
        "user: uid\ntimestamp: ts\nlabels: [{column: click}]\nsparse: {column: item}\n",
        ["sparse: expected a list"],
    ),
    ("bad-norm", INGEST_SCHEMA_YAML.replace("norm: minmax", "norm: zscore"), ["norm 'zscore'"]),
    ("dup-names", INGEST_SCHEMA_YAML.replace("{name: genre,", "{name: item,"), ["duplicate"]),
    (
        "bad-sequence",
        INGEST_SCHEMA_YAML.replace("sequence: [item, genre]", "sequence: [item, nope]"),
        ["sequence names unknown"],
    ),
]


@pytest.mark.parametrize("text,needles", [c[1:] for c in BAD_SCHEMAS], ids=[c[0] for c in BAD_SCHEMAS])
def test_bad_schema(tmp_path, capsys, text, needles):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    line = run_bad(tmp_path, capsys, write_csv(tmp_path / "in.csv"), path, *needles)
    if "top level" in line or "YAML" in line or "unknown keys" in line:
        assert str(path) in line


def test_schema_file_missing(tmp_path, capsys):
    run_bad(
        tmp_path, capsys, write_csv(tmp_path / "in.csv"), tmp_path / "nope.yaml", "schema file not found", "nope.yaml"
    )


def test_schema_accepts_numeric_column_names():
    s = Schema.from_dict({"user": 1, "timestamp": 2, "labels": [{"column": 3}], "sparse": [{"column": 4, "hash": 5}]})
    assert s.input_columns() == ["1", "2", "3", "4"] and s.labels[0].name == "3"


# ---------------------------------------------------------------- atomicity


def test_failed_ingest_leaves_existing_log_intact(tmp_path, capsys, schema_path):
    out = tmp_path / OUT_PARENT / "log"
    good = write_csv(tmp_path / "good.csv")
    assert main(["data", "ingest", "--input", str(good), "--schema", str(schema_path), "--out", str(out)]) == 0
    before = InstanceLog(out).fingerprint
    capsys.readouterr()
    for rows in (with_value(2, price="nan"), with_value(5, tags="q")):
        bad = write_csv(tmp_path / "bad.csv", rows)
        rc = main(["data", "ingest", "--input", str(bad), "--schema", str(schema_path), "--out", str(out)])
        assert rc == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
        log = InstanceLog(out)
        assert log.fingerprint == before
        log.verify()
        assert_matches_reference(log)
        assert [p.name for p in out.parent.iterdir()] == ["log"]


def test_failure_while_writing_leaves_existing_log_intact(tmp_path, schema, monkeypatch):
    """A crash after the temporary directory exists (mid-write) must not touch the old log."""
    out = tmp_path / "outs" / "log"
    before = ingest(write_csv(tmp_path / "in.csv"), schema, out).fingerprint

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("iat_rec.data.instance_log.normalise_dense", boom)
    with pytest.raises(OSError, match="disk full"):
        ingest(tmp_path / "in.csv", schema, out)
    assert InstanceLog(out).fingerprint == before
    InstanceLog(out).verify()
    assert [p.name for p in out.parent.iterdir()] == ["log"]
    with pytest.raises(OSError):
        ingest(tmp_path / "in.csv", schema, tmp_path / "outs" / "fresh")
    assert [p.name for p in out.parent.iterdir()] == ["log"]


def test_successful_reingest_replaces_the_log(tmp_path, schema):
    out = tmp_path / "log"
    ingest(write_csv(tmp_path / "a.csv"), schema, out)
    log = ingest(write_csv(tmp_path / "b.csv", INGEST_ROWS[:4]), schema, out)
    assert InstanceLog(out).rows == 4 == log.rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.csv", "log", "schema.yaml"]


def test_ingest_api_raises_iat_error(tmp_path, schema):
    with pytest.raises(IatError, match=r"column 'click', row 2 \(line 3\)"):
        ingest(write_csv(tmp_path / "in.csv", with_value(1, click=7)), schema, tmp_path / "log")


def test_csv_with_utf8_bom_matches_plain_csv(tmp_path, schema):
    """Spreadsheet exports start with a byte-order mark; the header must still match the schema."""
    plain = ingest(write_csv(tmp_path / "plain.csv"), schema, tmp_path / "a")
    path = write_csv(tmp_path / "bom.csv")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert ingest(path, schema, tmp_path / "b").fingerprint == plain.fingerprint
