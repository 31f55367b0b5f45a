"""The token table: round trip on 1 and 2 ranks, fp16, clear errors, the tokens CLI."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from iat_rec.cli import main
from iat_rec.data.instance_log import InstanceLog
from iat_rec.dist.env import DistEnv
from iat_rec.errors import IatError
from iat_rec.tables import TOKEN_FEATURE
from iat_rec.tokens.export import shard_token_table
from iat_rec.tokens.table import TokenTable
from tests.helpers import on_ranks, run_cli, synth_log


def sharded_rows(env: DistEnv, tokens: str, rows: list[int]) -> list[list[float]]:
    """On each rank (run by on_ranks): the rows as looked up in a token table loaded into a sharded
    EmbeddingCollection (every rank looks up the same ids)."""
    t = TokenTable(tokens)
    dmp = shard_token_table(t.rows, t.dim, t.dtype, env, batch_size=8)
    t.load_into(dmp.module.tokens)
    ids = torch.tensor(rows)
    kjt = KeyedJaggedTensor.from_lengths_sync([TOKEN_FEATURE], ids, torch.ones(len(ids), dtype=torch.int32))
    with torch.no_grad():
        out = dmp.module.tokens(kjt)[TOKEN_FEATURE].values()
    return out.float().tolist()


def two_rank_rows(tokens: Path, rows: list[int]) -> np.ndarray:
    """The rows as seen through a token table loaded into a 2-rank sharded EmbeddingCollection (rank 0's)."""
    return np.array(on_ranks(sharded_rows, tokens, rows, nproc=2)[0])


def test_round_trip_on_one_and_two_ranks_and_fp16(stage1_run, tokens, tmp_path):
    table = TokenTable(tokens)
    log = InstanceLog(table.manifest["log_path"])
    assert (table.rows, table.dim, table.dtype) == (log.rows, 16, "fp32")
    table.check_log(log)
    rows = [0, 1, table.rows // 2, table.rows - 1]
    one = table.read_rows(0, table.rows).numpy()[rows]
    np.testing.assert_array_equal(two_rank_rows(tokens, rows), one)
    health = table.manifest["health"]  # real tokens: none saturated, every dimension varies across rows
    assert health["saturation"] < 0.01 and health["dead_dims"] == 0 and health["dim_std"]["min"] > 0.01

    half = tmp_path / "half"
    run_cli("export", "--stage1", str(stage1_run), "--out", str(half), *"--dtype fp16 --nproc 2 --no-progress".split())
    h = TokenTable(half)
    assert h.dtype == "fp16"
    got = h.read_rows(0, h.rows).float().numpy()
    np.testing.assert_allclose(got, table.read_rows(0, table.rows).numpy(), rtol=1e-3, atol=1e-3)  # fp16 rounding


def test_side_info_and_history_index_travel_with_the_table(tokens):
    table = TokenTable(tokens)
    log = InstanceLog(table.manifest["log_path"])
    np.testing.assert_array_equal(table.side("ts"), log.ts)
    np.testing.assert_array_equal(table.side("label_time"), log.label_time)
    assert table.history.user_keys.tolist() == log.user_keys.tolist()


def test_a_table_of_another_log_is_refused(tokens, tmp_path):
    other = synth_log(tmp_path / "other", users=10, mean_instances=5, seed=7)
    with pytest.raises(IatError, match="exported from instance log"):
        TokenTable(tokens).check_log(other)


def test_missing_and_corrupt_tables_give_one_clear_error(tokens, tmp_path, capsys):
    assert main(["tokens", "show", str(tmp_path / "nope")]) == 2
    assert "not a token table" in capsys.readouterr().err

    broken = tmp_path / "broken"
    shutil.copytree(tokens, broken)
    for f in (broken / "table").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:10])  # truncated shard files
    assert main(["tokens", "show", str(broken), "--rows", "0:2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt, truncated or unsafe token table" in err[0]

    (broken / "table" / ".metadata").unlink()
    with pytest.raises(IatError, match="missing or incomplete checkpoint"):
        TokenTable(broken)


def test_tokens_show(tokens, capsys):
    assert main(["tokens", "show", str(tokens), "--rows", "2:4"]) == 0
    out = capsys.readouterr().out
    assert '"format": "iat-token-table"' in out and "row 2:" in out and "row 3:" in out
    assert main(["tokens", "show", str(tokens), "--rows", "5:2"]) == 2
