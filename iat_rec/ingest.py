"""Ingest a CSV or Parquet file into an instance log, chunk by chunk.

Every column the schema names is read as text (CSV) or cast from its stored type
(Parquet), then validated and encoded per chunk, so memory holds encoded int64/float
arrays only, never the whole file as Python objects. Any bad value stops the ingest with
one error naming the file, column and row; nothing is left on disk (the writer renames a
temporary directory into place only at the end).
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from iat_rec.errors import IatError
from iat_rec.instance_log import Columns, InstanceLog, write_instance_log
from iat_rec.schema import Schema, SparseFeature

CHUNK_ROWS = 1 << 20


def stable_hash(values: list[str], size: int) -> np.ndarray:
    """Hash of each string into [0, size): stable across processes and machines."""
    out = np.fromiter(
        (int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little") for v in values),
        dtype=np.uint64,
        count=len(values),
    )
    return (out % np.uint64(size)).astype(np.int64)


class _Chunk:
    """One chunk of input rows; knows where it sits in the file for error messages."""

    def __init__(self, table: pa.Table, first_row: int, path: Path, is_csv: bool):
        self.table, self.first_row, self.path, self.is_csv = table, first_row, path, is_csv

    def fail(self, column: str, index: int, what: str) -> IatError:
        row = self.first_row + index + 1  # 1-based data row
        where = f"row {row}" + (f" (line {row + 1})" if self.is_csv else "")
        value = self.table.column(column)[index].as_py()
        return IatError(f"{self.path}: column '{column}', {where}: {what} (value {value!r})")

    def text(self, column: str) -> pa.Array:
        arr = self.table.column(column).combine_chunks()
        if arr.null_count and not pa.types.is_string(arr.type):
            raise self.fail(column, _first(arr.is_null()), "missing value")
        return arr.cast(pa.string()) if not pa.types.is_string(arr.type) else arr.fill_null("")

    def numbers(self, column: str) -> np.ndarray:
        arr = self.table.column(column).combine_chunks()
        if arr.null_count:
            raise self.fail(column, _first(arr.is_null()), "missing value")
        if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
            try:
                arr = pc.cast(pc.utf8_trim_whitespace(arr.cast(pa.string())), pa.float64())
            except pa.ArrowInvalid:
                raise self.fail(column, self._first_unparsable(column), "not a number") from None
        x = arr.to_numpy(zero_copy_only=False).astype(np.float64)
        bad = ~np.isfinite(x)
        if bad.any():
            raise self.fail(column, int(np.argmax(bad)), "not a finite number")
        return x

    def times(self, column: str) -> np.ndarray:
        """Seconds since the epoch, from numbers or ISO-8601 text."""
        arr = self.table.column(column).combine_chunks()
        if pa.types.is_timestamp(arr.type):
            if arr.null_count:
                raise self.fail(column, _first(arr.is_null()), "missing timestamp")
            return arr.cast(pa.timestamp("s")).cast(pa.int64()).to_numpy()
        try:
            return np.floor(self.numbers(column)).astype(np.int64)
        except IatError as first_error:
            try:
                ts = pc.cast(arr.cast(pa.string()), pa.timestamp("s"))
            except pa.ArrowInvalid:
                raise first_error from None
            return ts.cast(pa.int64()).to_numpy()

    def _first_unparsable(self, column: str) -> int:
        for i, v in enumerate(self.table.column(column).to_pylist()):
            try:
                float(v)
            except (TypeError, ValueError):
                return i
        return 0


def _first(mask: pa.Array) -> int:
    return int(np.argmax(mask.to_numpy(zero_copy_only=False)))


def _encode_sparse(chunk: _Chunk, f: SparseFeature, vocab_index: dict[str, int] | None):
    """Returns ids [n] (single-valued) or (values, lengths [n]) (multi-valued)."""
    arr = chunk.text(f.column)
    if f.multi:
        lists = pc.split_pattern(arr, f.separator)
        lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(lists)
        # an empty field is an empty list, not one empty token
        keep = pc.not_equal(flat, "")
        row_of = np.repeat(np.arange(len(arr)), lengths)
        keep_np = keep.to_numpy(zero_copy_only=False)
        flat, row_of = flat.filter(keep), row_of[keep_np]
        lengths = np.bincount(row_of, minlength=len(arr)).astype(np.int64)
        ids = _encode_values(chunk, f, flat, vocab_index, row_of)
        return ids, lengths
    return _encode_values(chunk, f, arr, vocab_index, None)


def _encode_values(chunk, f: SparseFeature, arr: pa.Array, vocab_index, row_of) -> np.ndarray:
    enc = pc.dictionary_encode(arr)
    uniques = enc.dictionary.to_pylist()
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    if vocab_index is None:
        table = stable_hash(uniques, f.num_embeddings)
    else:
        table = np.fromiter((vocab_index.get(u, -1) for u in uniques), dtype=np.int64, count=len(uniques))
        if (table < 0).any():
            bad = int(np.argmax(table[codes] < 0))
            row = bad if row_of is None else int(row_of[bad])
            raise chunk.fail(f.column, row, f"id '{uniques[codes[bad]]}' not in the declared vocabulary of '{f.name}'")
    return table[codes] if len(codes) else np.zeros(0, dtype=np.int64)


def _read_chunks(path: Path, columns: list[str]) -> Iterator[_Chunk]:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise IatError(f"input file not found: {path}")
    if path.stat().st_size == 0:
        raise IatError(f"{path}: empty file")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise IatError(f"{path}: not a readable Parquet file: {e}") from None
        _check_columns(path, pf.schema_arrow.names, columns)
        row = 0
        for batch in pf.iter_batches(batch_size=CHUNK_ROWS, columns=columns):
            yield _Chunk(pa.Table.from_batches([batch]), row, path, is_csv=False)
            row += batch.num_rows
    elif suffix == ".csv":
        import pyarrow.csv as pacsv

        with open(path, newline="") as fh:
            header = next(csv.reader(fh), [])
        _check_columns(path, header, columns)
        opts = pacsv.ConvertOptions(
            include_columns=columns, column_types={c: pa.string() for c in columns}, strings_can_be_null=False
        )
        try:
            reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=64 << 20), convert_options=opts)
            row = 0
            for batch in reader:
                yield _Chunk(pa.Table.from_batches([batch]), row, path, is_csv=True)
                row += batch.num_rows
        except pa.ArrowInvalid as e:
            raise IatError(f"{path}: malformed CSV: {e}") from None
    else:
        raise IatError(f"{path}: unsupported input type '{suffix}' (expected .csv or .parquet)")


def _check_columns(path: Path, present: list[str], needed: list[str]) -> None:
    missing = [c for c in needed if c not in present]
    if missing:
        raise IatError(f"{path}: missing columns {missing} (file has {present})")


def ingest(input_path: str | Path, schema: Schema, out: str | Path) -> InstanceLog:
    path = Path(input_path)
    users: dict[str, int] = {}
    vocab_index = {f.name: {v: i for i, v in enumerate(f.vocab)} for f in schema.sparse if f.vocab is not None}
    parts: dict[str, list] = {}

    def add(key: str, value) -> None:
        parts.setdefault(key, []).append(value)

    for chunk in _read_chunks(path, schema.input_columns()):
        n = chunk.table.num_rows
        if n == 0:
            continue
        enc = pc.dictionary_encode(chunk.text(schema.user))
        local = [users.setdefault(u, len(users)) for u in enc.dictionary.to_pylist()]
        add("user", np.asarray(local, dtype=np.int64)[enc.indices.to_numpy(zero_copy_only=False)])
        ts = chunk.times(schema.timestamp)
        add("ts", ts)
        labels, label_time = np.empty((n, len(schema.labels))), np.empty((n, len(schema.labels)), np.int64)
        for k, lab in enumerate(schema.labels):
            y = chunk.numbers(lab.column)
            bad = (y != 0) & (y != 1)
            if bad.any():
                raise chunk.fail(lab.column, int(np.argmax(bad)), "label outside {0, 1}")
            labels[:, k] = y
            label_time[:, k] = ts
            if lab.available_at:
                lt = chunk.times(lab.available_at)
                early = lt < ts
                if early.any():
                    raise chunk.fail(lab.available_at, int(np.argmax(early)), "label available before its instance")
                label_time[:, k] = lt
        add("labels", labels.astype(np.float32))
        add("label_time", label_time)
        add("dense", np.stack([chunk.numbers(f.column) for f in schema.dense], 1) if schema.dense else np.zeros((n, 0)))
        for f in schema.sparse:
            add(f.name, _encode_sparse(chunk, f, vocab_index.get(f.name)))

    if not users:
        raise IatError(f"{path}: no data rows")
    # user index = rank of the key in sorted order, so the log's order does not depend on
    # the order users first appear in the file
    keys = np.asarray(list(users), dtype=str)
    rank = np.empty(len(keys), dtype=np.int64)
    rank[np.argsort(keys, kind="stable")] = np.arange(len(keys))
    cols = Columns(
        user=rank[np.concatenate(parts["user"])],
        user_keys=np.sort(keys, kind="stable"),
        ts=np.concatenate(parts["ts"]),
        labels=np.concatenate(parts["labels"]),
        label_time=np.concatenate(parts["label_time"]),
        dense=np.concatenate(parts["dense"]).astype(np.float32),
        sparse={f.name: np.concatenate(parts[f.name]) for f in schema.sparse if not f.multi},
        multi={
            f.name: (np.concatenate([p[0] for p in parts[f.name]]), np.concatenate([p[1] for p in parts[f.name]]))
            for f in schema.sparse
            if f.multi
        },
    )
    return write_instance_log(out, schema, cols, source=str(path))
