"""Instance-log statistics and the `iat-rec data stats` command."""

import json

import numpy as np
import pytest

from iat_rec.data import stats
from tests.helpers import synth_log


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    return synth_log(tmp_path_factory.mktemp("stats") / "log", users=50, mean_instances=20, seed=3)


def test_log_stats(log):
    s = stats.log_stats(log)
    assert s["rows"] == log.rows and s["users"] == 50
    assert s["items"] == len(np.unique(log.sparse["item_id"]))
    assert s["item_feature"] == "item_id"
    lengths = np.diff(log.user_offsets)
    h = s["history_length"]
    assert h["min"] == lengths.min() and h["max"] == lengths.max()
    assert h["min"] <= h["p50"] <= h["p90"] <= h["p99"] <= h["max"]
    assert h["mean"] == pytest.approx(lengths.mean())
    assert set(s["tasks"]) == {"click", "conversion"}
    assert s["tasks"]["click"]["rate"] == pytest.approx(float(np.asarray(log.labels)[:, 0].mean()))
    assert s["tasks"]["click"]["positives"] == int(np.asarray(log.labels)[:, 0].sum())
    assert s["time_range"]["min"] == log.ts.min() and s["time_range"]["max"] == log.ts.max()
    assert s["time_range"]["min_utc"].startswith("2024-01-")
    json.dumps(s)  # plain JSON types only


def test_cli_table_and_json(log, capsys):
    assert stats.cli([str(log.path)]) == 0
    table = capsys.readouterr().out
    assert "history length" in table and "task click" in table and f"{log.rows:,}" in table
    assert stats.cli([str(log.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == log.rows


def test_cli_not_a_log(tmp_path):
    from iat_rec.errors import IatError

    with pytest.raises(IatError, match="not an instance log"):
        stats.cli([str(tmp_path)])
