"""The instance log: every logged instance as memory-mappable columns, sorted by (user, time).

Layout of a log directory::

    manifest.json          format, version, rows, users, fingerprint, schema, dense stats, and
                           the size and checksum of every .npy file (checked when first read)
    ts.npy                 int64 [N]       timestamp (seconds)
    user.npy               int64 [N]       user index (rank of the user key in sorted order)
    user_offsets.npy       int64 [U + 1]   rows of user u are [user_offsets[u], user_offsets[u+1])
    user_keys.npy          str   [U]       the raw user key of each user index
    labels.npy             float32 [N, K]  one column per task, values in {0, 1}
    label_time.npy         int64 [N, K]    when each label became known (>= ts)
    dense.npy              float32 [N, D]  normalised dense features
    sparse.<name>.npy      int64 [N]       single-valued feature ids in [0, num_embeddings)
    sparse.<name>.values.npy / .offsets.npy   multi-valued: CSR values and [N + 1] offsets
    segment.npy            int32 [N]       appended logs only: the segment each row came in with

The instance id of a row is its row number. Because rows are sorted by (user, timestamp)
with a stable tie order, a user's history is a contiguous block of rows (DESIGN.md).

Day-by-day operation: ``iat-rec data append`` writes a new version of a log with a later
segment (timestamps >= the log's last) merged in. Each user's new rows go after their old
ones, so old rows keep their relative order: the rows of an earlier version are exactly
``rows_of_version(its fingerprint)`` (``segment <=`` its index), in order. That is the row-id
map from any earlier version to this one, and the manifest's ``segments`` lists every
version (source, rows, time range, fingerprint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import cached_property
from pathlib import Path

import numpy as np

from iat_rec.data.schema import Schema
from iat_rec.dist import checksums
from iat_rec.dist.atomic import atomic_dir, check_out, read_manifest, write_json
from iat_rec.errors import IatError

FORMAT = "iat-instance-log"
SEGMENT_FILE = "segment.npy"
VERSION = 2  # 2: the size and checksum of every file in the manifest


@dataclasses.dataclass
class Columns:
    """Encoded columns of a log in any row order, as handed to :func:`write_instance_log`."""

    user: np.ndarray  # int64 [N], index into user_keys
    user_keys: np.ndarray  # str [U]
    ts: np.ndarray  # int64 [N]
    labels: np.ndarray  # float32 [N, K]
    label_time: np.ndarray  # int64 [N, K]
    dense: np.ndarray  # float32 [N, D], raw (normalised by the writer)
    sparse: dict[str, np.ndarray]  # single-valued: int64 [N]
    multi: dict[str, tuple[np.ndarray, np.ndarray]]  # multi-valued: (values int64, lengths int64 [N])
    segment: np.ndarray | None = None  # int32 [N]: appended logs only

    @property
    def rows(self) -> int:
        return int(self.ts.shape[0])

    def take(self, keep: np.ndarray) -> Columns:
        """The rows where the mask ``keep`` is true (e.g. one time segment of a log)."""
        multi = {
            name: (values[np.repeat(keep, lengths)], lengths[keep]) for name, (values, lengths) in self.multi.items()
        }
        return Columns(
            user=self.user[keep],
            user_keys=self.user_keys,
            ts=self.ts[keep],
            labels=self.labels[keep],
            label_time=self.label_time[keep],
            dense=self.dense[keep],
            sparse={k: v[keep] for k, v in self.sparse.items()},
            multi=multi,
            segment=None if self.segment is None else self.segment[keep],
        )


def normalise_dense(
    dense: np.ndarray, schema: Schema, stats: list[dict] | None = None
) -> tuple[np.ndarray, list[dict]]:
    """Raw dense features -> normalised float32 and the statistics used: computed from
    ``dense``, or the given ``stats`` (an appended segment is normalised as its log was)."""
    out = np.empty(dense.shape, dtype=np.float32)
    given = stats
    stats = []
    for j, f in enumerate(schema.dense):
        x = dense[:, j].astype(np.float64)
        if f.norm == "log":
            x = np.sign(x) * np.log1p(np.abs(x))
        st = dict(given[j]) if given is not None else {"name": f.name, "norm": f.norm}
        if f.norm in ("standard", "log"):
            if given is None:
                st.update(mean=float(x.mean()), std=float(x.std()) or 1.0)
            x = (x - st["mean"]) / st["std"]
        elif f.norm == "minmax":
            if given is None:
                st.update(min=float(x.min()), max=float(x.max()))
            x = (x - st["min"]) / ((st["max"] - st["min"]) or 1.0)
        out[:, j] = x
        stats.append(st)
    return out, stats


def check_log_out(out: str | Path, overwrite: bool, inputs: tuple[str | Path, ...] = ()) -> None:
    """Refuses an ``--out`` of an instance-log writer that would lose data (``atomic.check_out``)."""
    check_out(out, "an instance log", {FORMAT}, "manifest.json", overwrite, inputs)


def write_instance_log(
    out: str | Path,
    schema: Schema,
    cols: Columns,
    source: str,
    dense_stats: list[dict] | None = None,
    segments: list[dict] | None = None,
) -> InstanceLog:
    """Sorts by (user, ts) with a stable tie order and writes the log atomically.

    ``dense_stats``: ``cols.dense`` is already normalised with them (an append). ``segments``:
    the earlier versions' entries of an appended log (``cols.segment`` then says which row came
    with which); this version's entry is added."""
    n = cols.rows
    if n == 0:
        raise IatError(f"{source}: no rows")
    perm = np.lexsort((cols.ts, cols.user))  # stable: ties keep input order
    out = Path(out)
    with atomic_dir(out) as tmp:
        user = cols.user[perm]
        np.save(tmp / "ts.npy", cols.ts[perm])
        np.save(tmp / "user.npy", user)
        n_users = len(cols.user_keys)
        offsets = np.searchsorted(user, np.arange(n_users + 1)).astype(np.int64)
        np.save(tmp / "user_offsets.npy", offsets)
        np.save(tmp / "user_keys.npy", np.asarray(cols.user_keys).astype(str))
        np.save(tmp / "labels.npy", cols.labels[perm].astype(np.float32))
        np.save(tmp / "label_time.npy", cols.label_time[perm].astype(np.int64))
        if dense_stats is None:
            dense, dense_stats = normalise_dense(cols.dense[perm], schema)
        else:
            dense = cols.dense[perm].astype(np.float32)
        np.save(tmp / "dense.npy", dense)
        if cols.segment is not None:
            np.save(tmp / SEGMENT_FILE, cols.segment[perm].astype(np.int32))
        for f in schema.sparse:
            if f.multi:
                values, lengths = cols.multi[f.name]
                src_off = np.zeros(n + 1, dtype=np.int64)
                np.cumsum(lengths, out=src_off[1:])
                new_len = lengths[perm]
                new_off = np.zeros(n + 1, dtype=np.int64)
                np.cumsum(new_len, out=new_off[1:])
                gather = np.repeat(src_off[:-1][perm] - new_off[:-1], new_len) + np.arange(new_off[-1])
                vals = values[gather]
                np.save(tmp / f"sparse.{f.name}.values.npy", vals.astype(np.int64))
                np.save(tmp / f"sparse.{f.name}.offsets.npy", new_off)
            else:
                vals = cols.sparse[f.name][perm]
                np.save(tmp / f"sparse.{f.name}.npy", vals.astype(np.int64))
            if vals.size and (vals.min() < 0 or vals.max() >= f.num_embeddings):
                raise AssertionError(f"feature {f.name}: ids outside [0, {f.num_embeddings})")
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "rows": n,
            "users": n_users,
            "source": source,
            "schema": schema.to_dict(),
            "dense_stats": dense_stats,
            "time_range": _time_range(cols.ts),
        }
        manifest["fingerprint"] = _fingerprint(tmp, manifest)
        if segments is not None:
            manifest["segments"] = [
                *segments,
                {
                    "source": source,
                    "rows": int((cols.segment == len(segments)).sum()),
                    "time_range": _time_range(cols.ts[cols.segment == len(segments)]),
                    "fingerprint": manifest["fingerprint"],
                },
            ]
        manifest["files"] = checksums.digests(tmp, [f.name for f in tmp.glob("*.npy")])
        write_json(tmp / "manifest.json", manifest)
    return InstanceLog(out)


def _time_range(ts: np.ndarray) -> list[int]:
    return [int(ts.min()), int(ts.max())]


def _fingerprint(path: Path, manifest: dict) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({k: manifest[k] for k in ("rows", "users", "schema")}, sort_keys=True).encode())
    for f in sorted(path.glob("*.npy")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


class InstanceLog:
    """Read-only, memory-mapped view of an instance log directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(
            self.path,
            "manifest.json",
            "an instance log",
            FORMAT,
            VERSION,
            "write it again with this version (data ingest, synth or movielens)",
        )
        self.schema = Schema.from_dict(self.manifest["schema"], source=str(self.path / "manifest.json"))
        self.rows: int = self.manifest["rows"]
        self.users: int = self.manifest["users"]
        self.fingerprint: str = self.manifest["fingerprint"]

    def _load(self, name: str, mmap: bool = True) -> np.ndarray:
        f = self.path / name
        checksums.check(f, self.manifest)
        try:
            arr = np.load(f, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise IatError(f"{f}: missing or corrupt column: {e}") from None
        return arr

    @cached_property
    def ts(self) -> np.ndarray:
        return self._load("ts.npy")

    @cached_property
    def user(self) -> np.ndarray:
        return self._load("user.npy")

    @cached_property
    def user_offsets(self) -> np.ndarray:
        return self._load("user_offsets.npy")

    @cached_property
    def user_keys(self) -> np.ndarray:
        return self._load("user_keys.npy", mmap=False)

    @cached_property
    def labels(self) -> np.ndarray:
        return self._load("labels.npy")

    @cached_property
    def label_time(self) -> np.ndarray:
        return self._load("label_time.npy")

    @cached_property
    def dense(self) -> np.ndarray:
        return self._load("dense.npy")

    @cached_property
    def sparse(self) -> dict[str, np.ndarray | tuple[np.ndarray, np.ndarray]]:
        """name -> ids [N] (single-valued) or (values, offsets [N + 1]) (multi-valued)."""
        out: dict = {}
        for f in self.schema.sparse:
            if f.multi:
                out[f.name] = (
                    self._load(f"sparse.{f.name}.values.npy"),
                    self._load(f"sparse.{f.name}.offsets.npy"),
                )
            else:
                out[f.name] = self._load(f"sparse.{f.name}.npy")
        return out

    @cached_property
    def segment(self) -> np.ndarray:
        """int32 [N]: the segment (version) each row came with; all 0 for a log never appended to."""
        if "segments" not in self.manifest:
            return np.zeros(self.rows, dtype=np.int32)
        return self._load(SEGMENT_FILE)

    @property
    def segments(self) -> list[dict]:
        """Every version of this log, oldest first: source, rows added, time range, fingerprint."""
        return self.manifest.get("segments") or [
            {
                "source": self.manifest.get("source"),
                "rows": self.rows,
                "time_range": self.manifest["time_range"],
                "fingerprint": self.fingerprint,
            }
        ]

    def version_index(self, fingerprint: str) -> int:
        """Which segment ends the version with ``fingerprint``; refuses a log that is not a version of this one."""
        found = [k for k, seg in enumerate(self.segments) if seg["fingerprint"] == fingerprint]
        if not found:
            raise IatError(
                f"instance log {fingerprint} is not a version of {self.path} (its versions: "
                f"{[seg['fingerprint'] for seg in self.segments]}): append to that log with iat-rec data append"
            )
        return found[0]

    def rows_of_version(self, fingerprint: str) -> np.ndarray:
        """The rows of an earlier version, in its row order: row i there is row ``[i]`` here."""
        return np.flatnonzero(np.asarray(self.segment) <= self.version_index(fingerprint))

    def check_files(self) -> None:
        """Every file against the manifest (size, checksum): the programs call it before any rank starts."""
        listed = set(self.manifest.get("files", {}))
        present = {f.name for f in self.path.glob("*.npy")}
        if present != listed:
            raise IatError(f"{self.path}: files {sorted(present ^ listed)} are missing or not in the manifest")
        for name in sorted(listed):
            checksums.check(self.path / name, self.manifest)

    def verify(self) -> None:
        """``check_files``, then the content fingerprint recomputed."""
        self.check_files()
        got = _fingerprint(self.path, self.manifest)
        if got != self.fingerprint:
            raise IatError(f"{self.path}: content fingerprint {got} != manifest {self.fingerprint}")


def time_split(
    log: InstanceLog, quantiles: tuple[float, float] = (0.8, 0.9), after: int | None = None
) -> dict[str, np.ndarray]:
    """Global time split: rows whose timestamp falls below/between/above two time quantiles.

    Returns row ids per split ("train", "valid", "test"), each in (user, time) order. Rows of
    one timestamp never straddle two splits. With ``after`` (a run continued with
    --resume-from: the time its earlier runs trained up to) only later rows are split, by the
    quantiles of their own timestamps: every row is trained on once along a chain of runs.
    """
    q1, q2 = quantiles
    if not 0.0 < q1 < q2 < 1.0:
        raise IatError(f"split quantiles must satisfy 0 < q1 < q2 < 1, got {quantiles}")
    ts = np.asarray(log.ts)
    fresh = ts > after if after is not None else np.ones(len(ts), dtype=bool)
    if not fresh.any():
        return {name: np.zeros(0, dtype=np.int64) for name in ("train", "valid", "test")}
    t1, t2 = np.quantile(ts[fresh], [q1, q2], method="lower")
    # a boundary at the largest timestamp would leave the later split empty
    return {
        "train": np.flatnonzero(fresh & (ts <= t1)),
        "valid": np.flatnonzero((ts > t1) & (ts <= t2)),
        "test": np.flatnonzero(ts > t2),
    }


def check_split(log: InstanceLog, quantiles: tuple[float, float], after: int | None = None) -> None:
    """Refuses a split with an empty part: no validation rows would report AUC 0.5 and a
    LogLoss of 0 as if measured."""
    parts = time_split(log, quantiles, after)
    empty = [name for name, rows in parts.items() if len(rows) == 0]
    if empty:
        sizes = ", ".join(f"{k} {len(v):,}" for k, v in parts.items())
        which = (
            f"the rows after time {after} (what --resume-from's run did not train on) of {log.path}"
            if after is not None
            else str(log.path)
        )
        raise IatError(
            f"--split {list(quantiles)} leaves no {' and no '.join(empty)} rows in {which} ({sizes} rows): "
            "the log needs more distinct timestamps, or other quantiles"
        )
