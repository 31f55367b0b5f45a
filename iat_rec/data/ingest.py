"""Ingest a CSV or Parquet file into an instance log, chunk by chunk.

Every column the schema names is read as text (CSV) or cast from its stored type
(Parquet), then validated and encoded per chunk, so memory holds encoded int64/float
arrays only, never the whole file as Python objects. Any bad value stops the ingest with
one error naming the file, column and row; nothing is left on disk (the writer renames a
temporary directory into place only at the end). Rows tied on (user, time) are kept in file
order; rows equal in every column the schema reads are refused as duplicates.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from iat_rec.data.instance_log import Columns, InstanceLog, normalise_dense, write_instance_log
from iat_rec.data.schema import Schema, SparseFeature
from iat_rec.errors import IatError

CHUNK_ROWS = 1 << 20  # Parquet rows per chunk
CSV_BLOCK_BYTES = 64 << 20  # CSV bytes per chunk


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
        where = f"row {row}"
        if self.is_csv:
            line = _csv_line_of_row(self.path, row)
            where += f" (line {line})" if line else ""
        value = self.table.column(column)[index].as_py()
        return IatError(f"{self.path}: column '{column}', {where}: {what} (value {value!r})")

    def column(self, column: str) -> pa.Array:
        arr = self.table.column(column).combine_chunks()
        if pa.types.is_nested(arr.type) or pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
            raise IatError(
                f"{self.path}: column '{column}' has type {arr.type}, which the schema cannot read "
                "(numbers, strings, booleans and timestamps only)"
            )
        return arr

    def text(self, column: str, required: bool = False) -> pa.Array:
        """The column as strings; with ``required`` an empty or missing value is an error."""
        arr = self.column(column)
        if arr.null_count and (required or not pa.types.is_string(arr.type)):
            raise self.fail(column, _first(arr.is_null()), "missing value")
        text = arr.cast(pa.string()) if not pa.types.is_string(arr.type) else arr.fill_null("")
        if required:
            empty = pc.equal(pc.utf8_trim_whitespace(text), "")
            if pc.any(empty).as_py():
                raise self.fail(column, _first(empty), "empty value")
        return text

    def _missing(self, column: str, arr: pa.Array, what: str = "missing value") -> None:
        if arr.null_count:
            raise self.fail(column, _first(arr.is_null()), what)

    def numbers(self, column: str, float32: bool = True) -> np.ndarray:
        """Finite numbers (float64); with ``float32`` also within float32's range (they are stored so)."""
        arr = self.column(column)
        self._missing(column, arr)
        if pa.types.is_boolean(arr.type):
            arr = arr.cast(pa.int8())
        if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
            text = pc.utf8_trim_whitespace(arr.cast(pa.string()))
            bad = _first_failing_cast(text, pa.float64())
            if bad is not None:
                empty = text[bad].as_py() == ""
                raise self.fail(column, bad, "missing value" if empty else "not a number")
            arr = pc.cast(text, pa.float64())
        x = arr.to_numpy(zero_copy_only=False).astype(np.float64)
        bad = ~np.isfinite(x)
        if bad.any():
            raise self.fail(column, int(np.argmax(bad)), "not a finite number")
        big = (
            np.abs(x) > _MAX_FLOAT32
        )  # stored as float32: beyond it a value, and its column's statistics, turn infinite
        if float32 and big.any():
            raise self.fail(column, int(np.argmax(big)), "beyond the float32 range")
        return x

    def times(self, column: str) -> np.ndarray:
        """Whole seconds since the epoch (floored), from numbers or ISO-8601 text.

        ISO-8601 text may carry fractional seconds and a zone offset ("Z", "+02:00"); text
        without an offset is read as UTC.
        """
        arr = self.column(column)
        self._missing(column, arr, "missing timestamp")
        if pa.types.is_timestamp(arr.type):
            per_s = {"s": 1, "ms": 1000, "us": 10**6, "ns": 10**9}[arr.type.unit]
            return np.floor_divide(arr.cast(pa.int64()).to_numpy(zero_copy_only=False), per_s)
        if pa.types.is_integer(arr.type):
            x = arr.to_numpy(zero_copy_only=False)  # any width, signed or not
            bad = np.abs(x.astype(np.float64)) >= _MAX_SECONDS
            if bad.any():
                raise self.fail(column, int(np.argmax(bad)), "timestamp out of range")
            return x.astype(np.int64)
        if not pa.types.is_floating(arr.type):
            text = pc.utf8_trim_whitespace(arr.cast(pa.string()))
            if _first_failing_cast(text, pa.float64()) == 0:  # not numeric text: ISO-8601 times
                return self._iso_times(column, text)
        x = self.numbers(column, float32=False)
        bad = np.abs(x) >= _MAX_SECONDS
        if bad.any():
            raise self.fail(column, int(np.argmax(bad)), "timestamp out of range")
        return np.floor(x).astype(np.int64)

    def _iso_times(self, column: str, text: pa.Array) -> np.ndarray:
        zoned = pc.match_substring_regex(text, r"(Z|z|[+-]\d\d:?\d\d)$").to_numpy(zero_copy_only=False)
        out = np.empty(len(text), dtype=np.int64)
        bad_rows = []
        for mask, typ in ((~zoned, pa.timestamp("us")), (zoned, pa.timestamp("us", tz="UTC"))):
            idx = np.flatnonzero(mask)
            if not len(idx):
                continue
            part = text.take(pa.array(idx))
            bad = _first_failing_cast(part, typ)
            if bad is not None:
                bad_rows.append(int(idx[bad]))
                continue
            us = pc.cast(part, typ).cast(pa.int64()).to_numpy(zero_copy_only=False)
            out[idx] = np.floor_divide(us, 10**6)
        if bad_rows:
            raise self.fail(column, min(bad_rows), "not a number or an ISO-8601 time")
        return out


# seconds beyond this are not a time (and would overflow int64 microseconds)
_MAX_SECONDS = float(2**53)
_MAX_FLOAT32 = float(np.finfo(np.float32).max)


def _first_failing_cast(arr: pa.Array, typ: pa.DataType) -> int | None:
    """Index of the first element that does not cast to ``typ`` (None if all do)."""
    try:
        pc.cast(arr, typ)
        return None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    lo, hi = 0, len(arr)  # the prefix [0, lo) casts, [0, hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            pc.cast(arr.slice(0, mid), typ)
            lo = mid
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            hi = mid
    return hi - 1


def _csv_records(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(first line, fields) of each non-empty record after the header, as pyarrow reads them."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:
        reader = csv.reader(fh)
        next(reader, None)
        line = reader.line_num
        for rec in reader:
            start, line = line + 1, reader.line_num
            if rec:  # pyarrow skips empty lines
                yield start, rec


def _csv_line_of_row(path: Path, row: int) -> int | None:
    """The file line where 1-based data row ``row`` starts (error path only: reads the file)."""
    for i, (line, _) in enumerate(_csv_records(path), 1):
        if i == row:
            return line
    return None


def _csv_parse_error(path: Path, header: list[str], err: Exception) -> IatError:
    for i, (line, rec) in enumerate(_csv_records(path), 1):
        if len(rec) != len(header):
            return IatError(
                f"{path}: row {i} (line {line}): malformed CSV line, expected {len(header)} fields, got {len(rec)}"
            )
    return IatError(f"{path}: malformed CSV: {' '.join(str(err).split())}")


def _first(mask: pa.Array) -> int:
    return int(np.argmax(mask.to_numpy(zero_copy_only=False)))


def _encode_sparse(chunk: _Chunk, f: SparseFeature, vocab_index: dict[str, int] | None):
    """Returns ids [n] (single-valued) or (values, lengths [n]) (multi-valued; an empty field
    is an empty list). A single-valued feature needs a value in every row."""
    arr = chunk.text(f.column, required=not f.multi)
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

        with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:
            header = next(csv.reader(fh), [])
        _check_columns(path, header, columns)
        opts = pacsv.ConvertOptions(
            include_columns=columns, column_types={c: pa.string() for c in columns}, strings_can_be_null=False
        )
        try:
            reader = pacsv.open_csv(
                path, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES), convert_options=opts
            )
            row = 0
            for batch in reader:
                yield _Chunk(pa.Table.from_batches([batch]), row, path, is_csv=True)
                row += batch.num_rows
        except pa.ArrowInvalid as e:
            raise _csv_parse_error(path, header, e) from None
    else:
        raise IatError(f"{path}: unsupported input type '{suffix}' (expected .csv or .parquet)")


def _check_columns(path: Path, present: list[str], needed: list[str]) -> None:
    missing = [c for c in needed if c not in present]
    if missing:
        raise IatError(f"{path}: missing columns {missing} (file has {present})")


def input_files(spec: str | Path) -> list[Path]:
    """The files an ``--input`` names: a .csv or .parquet file, a directory of them, a glob
    (``logs/day-*.parquet``) or a ``file://`` URL of any of these; sorted by name, all of one
    kind."""
    text = str(spec)
    if "://" in text:
        url = urllib.parse.urlparse(text)
        if url.scheme != "file":
            raise IatError(f"--input {text}: only local paths and file:// URLs are read, not {url.scheme}://")
        if url.netloc not in ("", "localhost"):
            raise IatError(
                f"--input {text}: a file:// URL names a local path (file:///abs/path), not host '{url.netloc}'"
            )
        text = urllib.parse.unquote(url.path)
    path = Path(text)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".csv", ".parquet") and p.is_file())
        where = f"directory {path}"
    elif glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(text) if Path(p).is_file())
        where = f"pattern {text}"
    else:
        return [path]
    if not files:
        raise IatError(f"--input {spec}: no .csv or .parquet files in the {where}")
    kinds = {p.suffix.lower() for p in files}
    if len(kinds) > 1:
        raise IatError(f"--input {spec}: mixes {sorted(kinds)} files; give one kind")
    return files


def ingest(input_path: str | Path, schema: Schema, out: str | Path) -> InstanceLog:
    """Reads every file of ``input_path`` (``input_files``) in order into one instance log."""
    path, cols = read_input(input_path, schema)
    _refuse_duplicates(path, cols)
    return write_instance_log(out, schema, cols, source=str(input_path))


def append(log: InstanceLog, input_path: str | Path, out: str | Path) -> InstanceLog:
    """A new version of ``log`` with the rows of ``input_path`` (a later segment: no timestamp
    before the log's last) merged in, encoded and normalised as the log was. Old rows keep
    their relative order (``InstanceLog.rows_of_version``)."""
    path, new = read_input(input_path, log.schema)
    _refuse_duplicates(path, new)
    return append_columns(log, new, out, str(input_path))


def append_columns(log: InstanceLog, new: Columns, out: str | Path, source: str) -> InstanceLog:
    """``append`` of already encoded columns (raw dense values)."""
    last = int(log.manifest["time_range"][1])
    early = new.ts < last
    if early.any():
        row = int(np.argmax(early))
        raise IatError(
            f"{source}: data row {row + 1} has timestamp {int(new.ts[row])}, before the last of {log.path} ({last}): "
            "append takes a later segment only (ingest the whole log again to insert earlier rows)"
        )
    if np.any(np.asarray(log.user_keys)[1:] <= np.asarray(log.user_keys)[:-1]):
        raise IatError(f"{log.path}: user keys are not sorted: not written by this version (ingest it again)")
    keys = np.union1d(np.asarray(log.user_keys), new.user_keys)  # sorted: user index = rank of the key, as ingest
    dense, _ = normalise_dense(new.dense, log.schema, log.manifest["dense_stats"])
    old_multi = {
        name: (np.asarray(v[0]), np.diff(np.asarray(v[1]))) for name, v in log.sparse.items() if isinstance(v, tuple)
    }
    cols = Columns(
        user=np.concatenate(
            [np.searchsorted(keys, log.user_keys)[np.asarray(log.user)], np.searchsorted(keys, new.user_keys)[new.user]]
        ),
        user_keys=keys,
        ts=np.concatenate([log.ts, new.ts]),
        labels=np.concatenate([log.labels, new.labels]),
        label_time=np.concatenate([log.label_time, new.label_time]),
        dense=np.concatenate([log.dense, dense]),
        sparse={name: np.concatenate([log.sparse[name], ids]) for name, ids in new.sparse.items()},
        multi={
            name: tuple(np.concatenate([a, b]) for a, b in zip(old_multi[name], vl)) for name, vl in new.multi.items()
        },
        segment=np.concatenate([log.segment, np.full(new.rows, len(log.segments), dtype=np.int32)]),
    )
    # an instance logged twice across the boundary shares (user, ts) with an old row at the last time
    boundary = cols.ts == last
    pair = _first_duplicate(cols.take(boundary))
    if pair is not None:
        rows = np.flatnonzero(boundary)[list(pair)]
        if rows[0] < log.rows <= rows[1]:
            raise IatError(
                f"{source}: data row {rows[1] - log.rows + 1} duplicates an instance of {log.path} (every column the "
                "schema reads is equal): remove it from the new segment"
            )
    return write_instance_log(
        out, log.schema, cols, source=source, dense_stats=log.manifest["dense_stats"], segments=log.segments
    )


def read_input(input_path: str | Path, schema: Schema) -> tuple[Path, Columns]:
    """Every file of ``input_path`` encoded with ``schema``: (the path named in errors, columns)."""
    files = input_files(input_path)
    path = Path(str(input_path)) if len(files) > 1 else files[0]
    users: dict[str, int] = {}
    vocab_index = {f.name: {v: i for i, v in enumerate(f.vocab)} for f in schema.sparse if f.vocab is not None}
    parts: dict[str, list] = {}

    def add(key: str, value) -> None:
        parts.setdefault(key, []).append(value)

    chunks = (chunk for f in files for chunk in _read_chunks(f, schema.input_columns()))
    for chunk in chunks:
        n = chunk.table.num_rows
        if n == 0:
            continue
        enc = pc.dictionary_encode(chunk.text(schema.user, required=True))
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
    return path, cols


def _refuse_duplicates(path: Path, cols: Columns) -> None:
    """Two rows equal in every column the schema reads would be one instance logged twice
    (a file concatenated twice, a retried export): refused, naming the first such pair.
    Hashed ids compare after hashing, as the model sees them."""
    pair = _first_duplicate(cols)
    if pair is None:
        return
    rows = [r + 1 for r in pair]  # 1-based data rows
    where = f"rows {rows[0]} and {rows[1]}"
    if path.suffix.lower() == ".csv":
        where += f" (lines {_csv_line_of_row(path, rows[0])} and {_csv_line_of_row(path, rows[1])})"
    raise IatError(f"{path}: {where} are duplicates: every column the schema reads is equal; remove one of them")


_MIX = np.uint64(0x9E3779B97F4A7C15)


def _first_duplicate(cols: Columns) -> tuple[int, int] | None:
    """(earlier, later) 0-based rows of the duplicate whose later row comes first, or None.

    Duplicates share (user, ts), so rows are sorted by (user, ts, a digest of the rest) and
    only neighbours equal on all three are compared exactly.
    """
    digest = np.zeros(cols.rows, dtype=np.uint64)
    for column in _value_columns(cols):
        digest = (digest ^ column) * _MIX
    order = np.lexsort((digest, cols.ts, cols.user))  # stable: equal rows stay in file order
    tied = np.flatnonzero(
        (np.diff(cols.user[order]) == 0) & (np.diff(cols.ts[order]) == 0) & (np.diff(digest[order]) == 0)
    )
    candidates = sorted((int(order[k + 1]), int(order[k])) for k in tied)  # (later, earlier)
    return next(((earlier, later) for later, earlier in candidates if _same_row(cols, earlier, later)), None)


def _value_columns(cols: Columns) -> Iterator[np.ndarray]:
    """Every encoded value but user and ts, as uint64 columns [N]; a multi-valued feature
    as its lengths and a position-aware sum over each row's list."""
    for block in (cols.labels, cols.label_time, cols.dense):
        for j in range(block.shape[1]):
            yield block[:, j].astype(np.float64 if block.dtype.kind == "f" else np.int64).view(np.uint64)
    for ids in cols.sparse.values():
        yield ids.astype(np.uint64)
    for values, lengths in cols.multi.values():
        yield lengths.astype(np.uint64)
        starts = np.cumsum(lengths) - lengths
        position = np.arange(len(values)) - np.repeat(starts, lengths)
        salted = (values.astype(np.uint64) + np.uint64(1)) * _MIX ^ position.astype(np.uint64)
        sums = np.concatenate([[np.uint64(0)], np.cumsum(salted, dtype=np.uint64)])
        yield sums[starts + lengths] - sums[starts]


def _same_row(cols: Columns, a: int, b: int) -> bool:
    single = (cols.user, cols.ts, cols.labels, cols.label_time, cols.dense, *cols.sparse.values())
    if not all(np.array_equal(x[a], x[b]) for x in single):
        return False
    for values, lengths in cols.multi.values():
        starts = np.cumsum(lengths) - lengths
        if not np.array_equal(values[starts[a] : starts[a] + lengths[a]], values[starts[b] : starts[b] + lengths[b]]):
            return False
    return True
