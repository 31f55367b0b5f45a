"""What the tests share: a plain module (no tests in it, no fixtures: those are conftest.py's).
Test modules import from here, never from one another or from conftest.py.

- Paths: ``REPO``, ``BIN`` (the venv's bin), ``COMPONENT`` (the torchx components file).
- The command line: ``run_cli``, and ``STAGE1``, the flags of a tiny stage-1 run.
- Instance logs, one builder for each of three jobs:

  - ``synth_log`` / ``synth_columns``: the synthetic generator's log (or its encoded columns),
    ``TINY`` unless told otherwise: realistic data, with a signal, for runs of the programs;
  - ``random_log`` / ``random_columns``: a random log of any schema, for unit tests of what
    reads a log (batches, loaders, the online compressor);
  - ``INGEST_SCHEMA_YAML``, ``INGEST_COLUMNS``, ``INGEST_ROWS`` with ``write_csv`` and
    ``write_parquet``: raw input files for ``iat-rec data ingest`` (not a log: ingest makes one).

- Ranks: ``on_ranks`` runs a module-level function on N gloo ranks and returns what each rank
  returned (``tests/ranks.py`` is the program each rank runs).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from iat_rec.cli import main
from iat_rec.data.instance_log import Columns, InstanceLog, write_instance_log
from iat_rec.data.schema import Schema
from iat_rec.data.synth import SynthConfig, build_columns, generate, synth_schema
from iat_rec.dist.env import launch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: iat-rec, torchx, and torchrun for a launched job
COMPONENT = "torchx_components/iat.py"

# ---------------------------------------------------------------- the command line


def run_cli(*argv: str) -> None:
    code = main(list(argv))
    assert code == 0, f"iat-rec {' '.join(argv)} exited {code}"


STAGE1 = [
    "--scheme",
    "user",
    "--window",
    "8",
    "--batch-size",
    "64",  # instances: 8 windows of 8
    "--steps",
    "12",
    *"--eval-batches 2 --no-progress --emb-dim 8 --hidden 64".split(),
    *"--decompress 64 --iat-dim 16".split(),
]

# ---------------------------------------------------------------- synthetic logs (the generator)

TINY = dict(users=120, mean_instances=50, seed=0)


def synth_log(path: str | Path, **args: Any) -> InstanceLog:
    """The synthetic generator's log (``iat_rec.data.synth.generate``) at ``path``: ``TINY``, with
    ``args`` (any of generate's arguments) in place of its values."""
    return generate(path, **{**TINY, **args})


def synth_columns(**args: Any) -> tuple[Columns, Schema]:
    """The columns and schema ``synth_log`` would write, not yet a log (e.g. to cut into days)."""
    cfg = SynthConfig(**{**TINY, **args})
    return build_columns(cfg, progress=False), synth_schema(cfg)


# ---------------------------------------------------------------- random logs of any schema


def random_columns(
    schema: Schema, rows: int, users: int, seed: int, *, ts_max: int, max_ids: int = 3, label_delay: int = 0
) -> Columns:
    """Random columns of ``schema``: the first ``users`` rows give every user a row, timestamps
    are drawn from [0, ts_max) (a small ts_max makes ties within and across users), labels are
    0/1 and known ``label_delay`` after their instance, dense values are normal, a single-valued
    feature has one id and a multi-valued one 0 to ``max_ids`` ids per row, each in its range."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, users, rows)
    user[:users] = np.arange(users)
    ts = rng.integers(0, ts_max, rows)
    sparse, multi = {}, {}
    for f in schema.sparse:
        if f.multi:
            lengths = rng.integers(0, max_ids + 1, rows)
            multi[f.name] = (rng.integers(0, f.num_embeddings, lengths.sum()), lengths)
        else:
            sparse[f.name] = rng.integers(0, f.num_embeddings, rows)
    return Columns(
        user=user,
        user_keys=np.array([f"u{i:03d}" for i in range(users)]),  # key order is index order
        ts=ts,
        labels=rng.integers(0, 2, (rows, len(schema.labels))).astype(np.float32),
        label_time=np.repeat(ts[:, None] + label_delay, len(schema.labels), axis=1),
        dense=rng.normal(size=(rows, len(schema.dense))).astype(np.float32),
        sparse=sparse,
        multi=multi,
    )


def random_log(path: str | Path, schema: Schema, rows: int, users: int, seed: int, **args: Any) -> InstanceLog:
    """``random_columns(schema, rows, users, seed, **args)`` written as an instance log at ``path``."""
    return write_instance_log(path, schema, random_columns(schema, rows, users, seed, **args), source="test")


# ---------------------------------------------------------------- raw input for ingest

INGEST_SCHEMA_YAML = """\
user: uid
timestamp: ts
labels:
  - {name: click, column: click}
  - {name: conv, column: conv, available_at: conv_time}
sparse:
  - {name: item, column: item, hash: 1000}
  - {name: genre, column: genre, vocab: [a, b, c]}
  - {name: tags, column: tags, vocab: [x, y, z], separator: "|"}
  - {name: kw, column: kw, hash: 50, separator: ";"}
dense:
  - {name: price, column: price, norm: log}
  - {name: age, column: age, norm: standard}
  - {name: score, column: score, norm: minmax}
  - {name: raw, column: raw, norm: none}
sequence: [item, genre]
"""

# the raw columns and their Parquet types
INGEST_PARQUET_TYPES = dict(
    uid=pa.string(),
    ts=pa.int64(),
    click=pa.int64(),
    conv=pa.int64(),
    conv_time=pa.int64(),
    item=pa.int64(),
    genre=pa.string(),
    tags=pa.string(),
    kw=pa.string(),
    price=pa.float64(),
    age=pa.int64(),
    score=pa.float64(),
    raw=pa.float64(),
)
INGEST_COLUMNS = list(INGEST_PARQUET_TYPES)

# input order is deliberately not (user, ts) order; rows 0/4 and 2/5 tie on (user, ts)
INGEST_ROWS = [
    dict(zip(INGEST_COLUMNS, row))
    for row in (
        ("u2", 50, 1, 0, 60, 7, "a", "x|y", "k1;k2;k3", 10.0, 30, 0.5, -1.25),
        ("u10", 20, 0, 0, 20, 8, "b", "", "", 0.0, 41, 2.0, 3.5),
        ("u1", 30, 1, 1, 90, 9, "c", "z", "k2", 99.5, 25, -1.0, 0.0),
        ("u2", 10, 0, 0, 10, 7, "a", "x||z", "k4", 1.0, 30, 0.0, 2.0),
        ("u2", 50, 0, 1, 55, 11, "b", "y", "k1", 3.0, 31, 1.5, 7.0),
        ("u1", 30, 0, 0, 30, 12, "b", "", "k3;k3", 5.0, 25, 0.25, -3.0),
        ("u10", 5, 1, 0, 5, 13, "c", "x|y|z", "k5", 2.5, 40, 1.0, 1.0),
        ("u1", 100, 1, 1, 100, 9, "a", "y|x", "", 7.0, 26, 0.75, 4.0),
    )
]


def write_csv(path: str | Path, rows: list[dict] = INGEST_ROWS, columns: list[str] = INGEST_COLUMNS) -> Path:
    """``rows`` (dicts by column) as a CSV file with a header of ``columns``: floats by their
    repr (exact), None as an empty field."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow([repr(r[c]) if isinstance(r[c], float) else r[c] for c in columns])
    return Path(path)


def write_parquet(path: str | Path, rows: list[dict] = INGEST_ROWS, types: dict = INGEST_PARQUET_TYPES) -> Path:
    """``rows`` (dicts by column) as a Parquet file of the columns of ``types`` (name -> arrow type).
    A string column's values, and those of a column that holds a text value (a bad value in a
    numeric column makes it a text column), are written as text; None is a null."""
    arrays = {}
    for name, typ in types.items():
        values = [r[name] for r in rows]
        if pa.types.is_string(typ) or any(isinstance(v, str) for v in values):
            typ, values = pa.string(), [None if v is None else str(v) for v in values]
        arrays[name] = pa.array(values, type=typ)
    pq.write_table(pa.table(arrays), path)
    return Path(path)


# ---------------------------------------------------------------- ranks


def on_ranks(fn: Callable[..., Any], *args: Any, nproc: int = 2) -> list[Any]:
    """Runs ``fn(env, *args)`` on ``nproc`` local gloo ranks and returns each rank's return value,
    by rank; ``env`` is the rank's ``DistEnv``.

    The ranks are started by the program's own launcher (``iat_rec.dist.env.launch``: torchrun's
    elastic agent, which sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and a
    free MASTER_PORT), each one running ``python -m tests.ranks``: it joins the group with
    ``init_distributed("cpu")``, calls ``fn`` and tears the group down (see tests/ranks.py). A
    rank that fails makes the agent stop the others.

    ``fn`` must be a module-level function (the ranks import it by name); ``args`` and its return
    value go through JSON (paths arrive as strings, tuples as lists). A failed rank raises
    AssertionError with its traceback (the first to fail first).
    """
    module, name = fn.__module__, fn.__qualname__
    if module == "__main__" or getattr(sys.modules.get(module), name, None) is not fn:
        raise TypeError(f"{module}.{name} is not a module-level function that the ranks can import")
    argv = [f"{module}:{name}", "", json.dumps(args, default=os.fspath)]
    pythonpath = os.environ.get("PYTHONPATH")
    with tempfile.TemporaryDirectory(prefix="iat-rec-test-ranks-") as results:
        argv[1] = results
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [pythonpath])])  # for `tests.*`
        try:
            code = launch("tests.ranks", argv, nproc)
        finally:
            if pythonpath is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = pythonpath
        errors = sorted(Path(results).glob("rank-*.error"), key=lambda p: p.stat().st_mtime_ns)
        if errors:
            raise AssertionError(
                "\n".join(f"{module}.{name} failed on rank {p.stem[5:]}:\n{p.read_text()}" for p in errors)
            )
        if code != 0:
            raise AssertionError(f"{module}.{name}: a rank exited with code {code} and left no traceback")
        return [json.loads((Path(results) / f"rank-{rank}.json").read_text()) for rank in range(nproc)]
