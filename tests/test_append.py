"""Day-by-day operation: a later segment appended to the instance log, stage 1 continued on it,
its tokens appended to the token table, stage 2 continued on the extended table.

The appended log must equal a single ingest of both segments (but for dense features, which
keep the first segment's normalisation); an appended token table must hold the old table's
bytes for old rows and a full export's tokens for new ones.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from iat_rec.cli import main
from iat_rec.data.ingest import append_columns, ingest
from iat_rec.data.instance_log import InstanceLog, write_instance_log
from iat_rec.data.schema import Schema
from iat_rec.dist import checkpoint as ckpt
from iat_rec.errors import IatError
from iat_rec.tokens.table import TokenTable
from tests.helpers import INGEST_ROWS, INGEST_SCHEMA_YAML, STAGE1, run_cli, synth_columns, write_csv

LATER = [dict(INGEST_ROWS[0], uid="u3", ts=120, conv_time=130, item=5), dict(INGEST_ROWS[2], ts=110, conv_time=110)]


@pytest.fixture
def two_days(tmp_path):
    schema = Schema.from_dict(yaml.safe_load(INGEST_SCHEMA_YAML))
    rows = INGEST_ROWS + LATER
    write_csv(tmp_path / "day1.csv", [r for r in rows if r["ts"] < 50])
    write_csv(tmp_path / "day2.csv", [r for r in rows if r["ts"] >= 50])
    write_csv(tmp_path / "all.csv", rows)
    return schema, tmp_path


def test_appended_log_equals_one_ingest_of_both_segments(two_days):
    schema, d = two_days
    day1 = ingest(d / "day1.csv", schema, d / "v1")
    assert (
        main(["data", "append", "--log", str(day1.path), "--input", str(d / "day2.csv"), "--out", str(d / "v2")]) == 0
    )
    v2, full = InstanceLog(d / "v2"), ingest(d / "all.csv", schema, d / "full")
    v2.verify()
    for name in ("ts", "user", "user_offsets", "user_keys", "labels", "label_time"):
        np.testing.assert_array_equal(getattr(v2, name), getattr(full, name), err_msg=name)
    for name, ids in full.sparse.items():  # single- and multi-valued
        for got, want in zip(
            v2.sparse[name] if isinstance(ids, tuple) else [v2.sparse[name]], ids if isinstance(ids, tuple) else [ids]
        ):
            np.testing.assert_array_equal(got, want, err_msg=name)
    old = v2.rows_of_version(day1.fingerprint)  # the row-id map from version 1
    assert len(old) == day1.rows and np.all(np.diff(old) > 0)
    for name in ("ts", "labels", "label_time", "dense"):
        np.testing.assert_array_equal(getattr(v2, name)[old], getattr(day1, name), err_msg=name)
    assert np.array_equal(v2.user_keys[v2.user[old]], day1.user_keys[day1.user])
    assert v2.manifest["dense_stats"] == day1.manifest["dense_stats"]  # new rows normalised as the first segment
    assert [s["rows"] for s in v2.segments] == [day1.rows, v2.rows - day1.rows]
    assert [s["fingerprint"] for s in v2.segments] == [day1.fingerprint, v2.fingerprint]
    assert sorted(set(v2.segment[np.setdiff1d(np.arange(v2.rows), old)])) == [1]


def test_append_refuses_earlier_rows_and_duplicates_and_keeps_the_log(two_days, capsys):
    schema, d = two_days
    day1 = ingest(d / "day1.csv", schema, d / "v1")
    write_csv(d / "late.csv", [dict(INGEST_ROWS[0], ts=20, conv_time=20)])  # earlier than day 1's last (30)
    assert (
        main(["data", "append", "--log", str(day1.path), "--input", str(d / "late.csv"), "--out", str(d / "v2")]) == 2
    )
    assert "before the last of" in capsys.readouterr().err and not (d / "v2").exists()
    write_csv(
        d / "again.csv", [INGEST_ROWS[2], dict(INGEST_ROWS[2], click=0)]
    )  # INGEST_ROWS[2] is day 1's last instance (ts 30), logged again
    assert (
        main(["data", "append", "--log", str(day1.path), "--input", str(d / "again.csv"), "--out", str(d / "v2")]) == 2
    )
    assert "data row 1 duplicates an instance of" in capsys.readouterr().err and not (d / "v2").exists()
    assert (
        main(["data", "append", "--log", str(day1.path), "--input", str(d / "day2.csv"), "--out", str(day1.path)]) == 2
    )
    InstanceLog(day1.path).verify()
    with pytest.raises(IatError, match="not a version of"):
        InstanceLog(day1.path).rows_of_version("0" * 32)


def _weights(path, scratch) -> dict:
    out = scratch / f"{path.parent.parent.name}-{path.name}.pt"
    dcp_to_torch_save(str(path), str(out))
    return torch.load(out, weights_only=True)["model"]


@pytest.mark.slow
def test_day_by_day_refresh_matches_a_full_export(tmp_path):
    """Two segments, one by one: stage 1 continues on day 2 only, export --append keeps every
    old row's bytes and gives day 2 the tokens a full export of the same run gives; stage 2
    continues on the extended table (2 gloo ranks)."""
    cols, schema = synth_columns()
    cut = np.quantile(cols.ts, 0.7)
    v1 = write_instance_log(tmp_path / "v1", schema, cols.take(cols.ts < cut), source="day 1")
    v2 = append_columns(v1, cols.take(cols.ts >= cut), tmp_path / "v2", source="day 2")
    new = np.flatnonzero(v2.segment == 1)

    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    run_cli("compress", "--data", str(v1.path), "--out", str(run1), "--nproc", "2", *STAGE1)
    run_cli("export", "--stage1", str(run1), "--out", str(tmp_path / "tok1"), "--nproc", "2", "--no-progress")
    run_cli("compress", "--data", str(v2.path), "--out", str(run2), "--resume-from", str(run1), "--nproc", "2", *STAGE1)
    info, before = json.loads((run2 / "run.json").read_text()), json.loads((run1 / "run.json").read_text())
    assert info["resume_from"]["checkpoint"] == ckpt.latest(run1).name
    assert (
        info["resume_from"]["train_until"] == before["train_until"] < info["train_until"]
    )  # it trained on later rows only
    # stage 1 went on from run 1's weights (its step-0 snapshot) and trained on day 2 alone
    start, before = _weights(run2 / "snapshots" / "step_00000000", tmp_path), _weights(ckpt.latest(run1), tmp_path)
    assert start.keys() == before.keys() and all(torch.equal(start[k], before[k]) for k in start)

    export = ["--nproc", "2", "--no-progress"]
    run_cli(
        "export", "--stage1", str(run2), "--append", str(tmp_path / "tok1"), "--out", str(tmp_path / "tok2"), *export
    )
    run_cli(
        "export",
        "--stage1",
        str(run2),
        "--append",
        str(tmp_path / "tok1"),
        "--out",
        str(tmp_path / "tok2f"),
        "--tokens-from",
        "final",
        *export,
    )
    run_cli("export", "--stage1", str(run2), "--out", str(tmp_path / "full"), "--tokens-from", "final", *export)
    tok1, tok2, tok2f, full = (TokenTable(tmp_path / n) for n in ("tok1", "tok2", "tok2f", "full"))
    t1, t2, t2f, tf = (t.read_rows(0, t.rows) for t in (tok1, tok2, tok2f, full))
    old = v2.rows_of_version(v1.fingerprint)
    assert torch.equal(t2[old], t1) and torch.equal(t2f[old], t1)  # old rows: the old table's bytes
    torch.testing.assert_close(t2f[new], tf[new], rtol=1e-5, atol=1e-6)  # new rows: as a full export of run 2
    m = tok2.manifest
    assert m["table_version"] == 2 and [s["rows"] for s in m["segments"]] == [v1.rows, len(new)]
    assert [s["source_run"] for s in m["segments"]] == [str(run1.resolve()), str(run2.resolve())]
    # run 2 began from a model trained on the old rows' labels: no time-consistent or untrained tokens for them
    for refused in (
        ["--tokens-from", "time-consistent"],
        ["--tokens-from", "initial", "--append", str(tmp_path / "tok1")],
        ["--append", str(tmp_path / "full")],
    ):  # full: not the table of the run that run 2 continued
        assert main(["export", "--stage1", str(run2), "--out", str(tmp_path / "no"), *refused]) == 2
    assert (
        main(["export", "--stage1", str(run1), "--append", str(tmp_path / "tok1"), "--out", str(tmp_path / "no")]) == 2
    )  # run 1 continued nothing

    rank = [
        *"--history iat --batch-size 32 --steps 6 --eval-batches 2".split(),
        *"--max-len 8 --no-progress --emb-dim 8 --hidden 32".split(),
        *"--nproc 2".split(),
    ]

    def rank_argv(log, tokens: str, out: str, *extra: str) -> list[str]:
        return [
            "rank",
            "--data",
            str(log.path),
            "--tokens",
            str(tmp_path / tokens),
            "--out",
            str(tmp_path / out),
            *extra,
            *rank,
        ]

    run_cli(*rank_argv(v1, "tok1", "r1"))
    run_cli(*rank_argv(v2, "tok2", "r2", "--resume-from", str(tmp_path / "r1")))
    assert json.loads((tmp_path / "r2" / "run.json").read_text())["resume_from"]["run"] == str(
        (tmp_path / "r1").resolve()
    )
    assert main(rank_argv(v2, "tok2", "r3", "--resume-from", str(tmp_path / "r2"))) == 2  # r2 is of v2: nothing since
    assert (
        main(["export", "--stage1", str(run2), "--append", str(tmp_path / "tok2"), "--out", str(tmp_path / "tok3")])
        == 2
    )
