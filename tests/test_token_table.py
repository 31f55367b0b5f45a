"""The token table: round trip on 1 and 2 ranks, fp16, clear errors, the tokens CLI."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from iat_rec.cli import main
from iat_rec.data.instance_log import InstanceLog
from iat_rec.errors import IatError
from iat_rec.tokens.table import TokenTable
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[1]


def two_rank_rows(tokens: Path, rows: list[int]) -> np.ndarray:
    """The rows as seen through a token table loaded into a 2-rank sharded EmbeddingCollection."""
    code = f"""
import json, sys, torch, numpy as np
from iat_rec.dist.env import init_distributed
from iat_rec.tokens.table import TokenTable, WEIGHT_KEY
from iat_rec.tokens.export import shard_token_table
from iat_rec.tables import TOKEN_FEATURE
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
env = init_distributed("cpu")
t = TokenTable({str(tokens)!r})
dmp = shard_token_table(t.rows, t.dim, t.dtype, env, batch_size=8)
t.load_into(dmp.module.tokens)
ids = torch.tensor({rows!r})
kjt = KeyedJaggedTensor.from_lengths_sync([TOKEN_FEATURE], ids, torch.ones(len(ids), dtype=torch.int32))
with torch.no_grad():
    out = dmp.module.tokens(kjt)[TOKEN_FEATURE].values()  # each rank looks up the same ids
if env.rank == 0:
    print("ROWS" + json.dumps(out.float().tolist()))
# an exit with the gloo group alive can abort a rank in teardown ("terminate called without an active exception")
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""
    script = REPO / "tests" / ".two_rank_rows.py"
    script.write_text(code)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
    finally:
        script.unlink()
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("ROWS"))
    return np.array(json.loads(line[4:]))


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
    run_cli(
        "export", "--stage1", str(stage1_run), "--out", str(half), "--dtype", "fp16", "--nproc", "2", "--no-progress"
    )
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
    from iat_rec.data.synth import generate

    other = generate(tmp_path / "other", users=10, mean_instances=5, seed=7)
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
