"""Token lookup for serving (iat_rec.tokens.serving) against a brute-force reading of the log."""

import json

import numpy as np

from iat_rec.batching.history import LABEL_UNKNOWN
from iat_rec.cli import main
from iat_rec.data.instance_log import InstanceLog
from iat_rec.tokens.serving import TokenStore
from iat_rec.tokens.table import TokenTable


def test_histories_are_the_users_last_instances_before_t_with_only_known_labels(tiny_log, tokens):
    log, store = InstanceLog(tiny_log), TokenStore(tokens)
    every = TokenTable(tokens).read_rows(0, log.rows).float().numpy()
    rng = np.random.default_rng(0)
    picks = rng.integers(0, log.rows, 40)
    users = [str(log.user_keys[log.user[r]]) for r in picks] + ["nobody"]
    times = [int(log.ts[r]) + int(rng.integers(-5, 5)) for r in picks] + [int(log.ts.max()) + 1]
    for h, user, t in zip(store.histories(users, times, last=7), users, times):
        if user == "nobody":
            assert len(h.rows) == 0 and h.tokens.shape == (0, store.tokens.shape[1])
            continue
        u = int(np.flatnonzero(log.user_keys == user)[0])
        mine = np.arange(log.user_offsets[u], log.user_offsets[u + 1])
        want = mine[log.ts[mine] < t][-7:]
        np.testing.assert_array_equal(h.rows, want)
        np.testing.assert_array_equal(h.ts, log.ts[want])
        np.testing.assert_array_equal(h.tokens, every[want])
        known = log.label_time[want] < t
        np.testing.assert_array_equal(h.labels, np.where(known, log.labels[want].astype(np.int64), LABEL_UNKNOWN))


def test_tokens_lookup_cli(tiny_log, tokens, capsys):
    log = InstanceLog(tiny_log)
    user, t = str(log.user_keys[0]), int(log.ts[log.user_offsets[1] - 1]) + 10**6
    assert main(["tokens", "lookup", str(tokens), "--user", user, "--time", str(t), "--last", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == list(range(log.user_offsets[1] - 3, log.user_offsets[1]))
    assert len(out["tokens"]) == 3 and set(out["labels"]) == set(log.schema.task_names)
    assert main(["tokens", "lookup", str(tokens), "--user", user, "--time", str(t), "--last", "0"]) == 2


def test_tokens_export_writes_every_row_as_parquet_or_npy(tiny_log, tokens, tmp_path, capsys):
    import pyarrow.parquet as pq

    log, every = InstanceLog(tiny_log), TokenTable(tokens).read_rows(0, InstanceLog(tiny_log).rows).float().numpy()
    assert main(["tokens", "export", str(tokens), "--out", str(tmp_path / "t.parquet")]) == 0
    table = pq.read_table(tmp_path / "t.parquet").to_pydict()
    assert table["row"] == list(range(log.rows)) and table["ts"] == log.ts.tolist()
    assert table["user"] == [str(log.user_keys[u]) for u in log.user]
    np.testing.assert_array_equal(np.asarray(table["token"], np.float32), every)
    task = log.schema.task_names[0]
    assert (
        table[task] == log.labels[:, 0].astype(int).tolist() and table[f"{task}_time"] == log.label_time[:, 0].tolist()
    )
    assert main(["tokens", "export", str(tokens), "--out", str(tmp_path / "npy"), "--format", "npy"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "npy" / "token.npy"), every)
    assert main(["tokens", "export", str(tokens), "--out", str(tmp_path / "t.parquet")]) == 2  # exists: --overwrite
    assert (
        main(["tokens", "export", str(tokens), "--out", str(tmp_path / "npy"), "--format", "npy", "--overwrite"]) == 0
    )
    other = tmp_path / "runs"
    (other / "keep").mkdir(parents=True)
    for fmt in ("npy", "parquet"):  # never replaces what is not an export of its own
        assert main(["tokens", "export", str(tokens), "--out", str(other), "--format", fmt, "--overwrite"]) == 2
    assert "is not an npy export" in capsys.readouterr().err and (other / "keep").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["npy", "runs", "t.parquet"]
