"""Token lookup for serving: the history a stage-2 ranker reads, from a token table alone.

    from iat_rec.tokens.serving import TokenStore
    store = TokenStore("runs/tokens")
    h = store.history("user_42", t=1_704_153_600, last=128)
    h.tokens        # float32 [n, d], oldest first: the user's last n <= 128 instances before t
    h.labels        # int64 [n, K]: 0/1, or LABEL_UNKNOWN (2) where the label was not known before t
    h.ts, h.rows    # the instances' timestamps and row ids
    store.histories(["user_42", "user_7"], [t1, t2], last=128)   # a batch: a list of History

    iat-rec tokens lookup TOKENS --user user_42 --time 1704153600 [--last 128] [--json]
    iat-rec tokens export TOKENS --out FILE.parquet | --out DIR --format npy
    iat-rec tokens compressor --stage1 RUN --out DIR [--checkpoint NAME]

``tokens export`` writes every row for a feature store: row id, user key, timestamp, each
task's label and the time it became known, and the token (Parquet: a fixed-size list column;
npy: one array per column in DIR).

``tokens compressor`` writes the stage-1 compressor's token part as a standalone module for
online inference (``iat_rec.tokens.online``): plain tensors in, the token of each new instance out,
without TorchRec at serving time.

Exactly the fetch of stage 2 (``iat_rec.batching.history``): rows of the user with a timestamp strictly
before t, the last ``last`` of them, each label shown only if it became known strictly before t.
An unknown user has an empty history. The whole table is loaded once into memory (rows x dim x 4
bytes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from iat_rec.batching.history import LABEL_UNKNOWN, expand_ranges, side_info
from iat_rec.errors import IatError
from iat_rec.tokens.table import TokenTable


@dataclasses.dataclass
class History:
    user: str
    t: int
    rows: np.ndarray  # int64 [n]: row ids of the instances, oldest first
    ts: np.ndarray  # int64 [n]
    tokens: np.ndarray  # float32 [n, d]
    labels: np.ndarray  # int64 [n, K]: 0/1, LABEL_UNKNOWN where not known before t

    def to_json(self, tasks: list[str]) -> dict:
        return {
            "user": self.user,
            "t": self.t,
            "rows": self.rows.tolist(),
            "ts": self.ts.tolist(),
            "labels": {task: self.labels[:, k].tolist() for k, task in enumerate(tasks)},
            "label_unknown": LABEL_UNKNOWN,
            "tokens": self.tokens.tolist(),
        }


class TokenStore:
    """A token table opened for lookups."""

    def __init__(self, path: str | Path):
        self.table = TokenTable(path)
        self.table.check_files()
        self.tokens = self.table.read_rows(0, self.table.rows).float().numpy()
        self.ts, self.labels, self.label_time = (self.table.side(n) for n in ("ts", "labels", "label_time"))
        self.tasks: list[str] = list(
            self.table.manifest.get("tasks") or [f"task{k}" for k in range(self.labels.shape[1])]
        )

    def histories(self, users: list[str], times: list[int], last: int = 256) -> list[History]:
        """The history of each request (user key, time): its user's last ``last`` instances before it."""
        if last < 1:
            raise IatError(f"--last must be >= 1, not {last}")
        if len(users) != len(times):
            raise IatError(f"{len(users)} users but {len(times)} times")
        index = self.table.history
        times = np.asarray(times, dtype=np.int64)
        first, length = index.ranges(index.user_index(np.asarray(users, dtype=str)), times, last)
        rows = expand_ranges(first, length)
        codes = side_info(rows, length, times, self.labels, self.label_time, self.ts)[0].astype(np.int64)
        out, start = [], 0
        for user, t, n in zip(users, times, length):
            r = rows[start : start + n]
            out.append(History(str(user), int(t), r, np.asarray(self.ts[r]), self.tokens[r], codes[start : start + n]))
            start += n
        return out

    def history(self, user: str, t: int, last: int = 256) -> History:
        return self.histories([user], [t], last)[0]

    def columns(self) -> dict[str, np.ndarray]:
        """Every row of the table as named columns (row, user, ts, <task>, <task>_time, token)."""
        offsets = self.table.side("user_offsets")
        keys = self.table.side("user_keys")
        cols = {"row": np.arange(self.table.rows), "user": np.repeat(keys, np.diff(offsets)), "ts": np.asarray(self.ts)}
        for k, task in enumerate(self.tasks):
            cols[task] = np.asarray(self.labels[:, k]).astype(np.int8)
            cols[f"{task}_time"] = np.asarray(self.label_time[:, k])
        cols["token"] = self.tokens
        return cols


ROWS_FORMAT = "iat-token-rows"  # export.json of an npy export directory


def export_rows(tokens: str | Path, out: str | Path, fmt: str, overwrite: bool = False) -> Path:
    """Writes every row of a token table as Parquet (one file) or npy (a directory), atomically.
    An existing ``--out`` is replaced only with ``overwrite`` and only if it is an export of the
    same format (a Parquet file, or a directory with this export's ``export.json``)."""
    from iat_rec.dist.atomic import atomic_dir, check_out, write_json

    out = Path(out)
    if fmt == "npy":
        check_out(out, "an npy export of token rows", {ROWS_FORMAT}, "export.json", overwrite, (tokens,))
    elif out.is_file():
        with open(out, "rb") as fh:
            if fh.read(4) != b"PAR1":
                raise IatError(f"--out {out} exists and is not a Parquet file: refusing to replace it")
        if not overwrite:
            raise IatError(f"--out {out} exists: pass --overwrite to replace it")
    else:  # a directory (never replaced by a file) or nothing yet; never inside the table
        check_out(out, "a Parquet export", set(), "", False, (tokens,))
    cols = TokenStore(tokens).columns()
    if fmt == "npy":
        with atomic_dir(out) as tmp:
            for name, values in cols.items():
                np.save(tmp / f"{name}.npy", values)
            write_json(
                tmp / "export.json",
                {"format": ROWS_FORMAT, "tokens": str(Path(tokens).resolve()), "columns": list(cols)},
            )
        return out
    import pyarrow as pa
    import pyarrow.parquet as pq

    token = cols.pop("token")
    arrays = {name: pa.array(values) for name, values in cols.items()}
    arrays["token"] = pa.FixedSizeListArray.from_arrays(pa.array(token.reshape(-1)), token.shape[1])
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # written beside, then renamed into place
    try:
        pq.write_table(pa.table(arrays), tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def export_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="iat-rec tokens export", description="every row of a token table, for a feature store"
    )
    p.add_argument("tokens", help="token table directory")
    p.add_argument("--out", required=True, help="a .parquet file, or a directory (--format npy)")
    p.add_argument("--format", choices=["parquet", "npy"], default="parquet")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    a = p.parse_args(argv)
    out = export_rows(a.tokens, a.out, a.format, a.overwrite)
    print(f"{a.format}: {TokenTable(a.tokens).rows:,} rows -> {out}")
    return 0


def compressor_cli(argv: list[str]) -> int:
    from iat_rec.tokens import online  # torch.export and the stage-1 code: only for this subcommand

    p = argparse.ArgumentParser(
        prog="iat-rec tokens compressor",
        description=online.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--stage1", "--run", dest="run", required=True, help="stage-1 run directory")
    p.add_argument(
        "--out", required=True, help="directory to write: the artifact and compressor.json (the input contract)"
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="which weights: the run's latest checkpoint (default), or a checkpoint's name under RUN/checkpoints, "
        "RUN/snapshots or RUN (step_00000012, snapshots/step_00000000, best)",
    )
    p.add_argument(
        "--format",
        choices=online.FORMATS,
        default="auto",
        help=(
            "auto (default): torch.export (.pt2), TorchScript (.ts) where export fails; "
            "export or torchscript: that one only"
        ),
    )
    p.add_argument("--overwrite", action="store_true", help="replace an online compressor already at --out")
    a = p.parse_args(argv)
    online.write_online(a.run, a.out, a.checkpoint, a.format, a.overwrite)
    return 0


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="iat-rec tokens lookup", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("tokens", help="token table directory")
    p.add_argument("--user", required=True, help="the raw user key")
    p.add_argument("--time", required=True, type=int, help="request time (seconds): instances strictly before it")
    p.add_argument("--last", type=int, default=256, help="at most this many instances, the most recent (default 256)")
    p.add_argument("--json", action="store_true", help="print JSON (tokens included) instead of a table")
    a = p.parse_args(argv)
    store = TokenStore(a.tokens)
    h = store.history(a.user, a.time, a.last)
    if a.json:
        print(json.dumps(h.to_json(store.tasks)))
        return 0
    print(f"user {h.user!r}, t {h.t}: {len(h.rows)} instances (of at most {a.last}) before t")
    for i, row in enumerate(h.rows):
        labels = " ".join(
            f"{task}={'?' if c == LABEL_UNKNOWN else int(c)}" for task, c in zip(store.tasks, h.labels[i])
        )
        token = " ".join(f"{x:+.3f}" for x in h.tokens[i][:6])
        print(f"  row {row:>9}  ts {h.ts[i]}  {labels}  token [{token} ...] |{np.linalg.norm(h.tokens[i]):.3f}|")
    return 0
