"""The stage-1 compressor's token part exported for online inference (iat_rec.tokens.online): the
saved artifact, fed plain tensors built from the log's own columns, gives the token table's
rows; it runs without TorchRec; bad runs, outputs and requests are clear errors.

One tiny stage-1 run on one in-process rank (a few seconds), on a log with single- and
multi-valued features in both the pooled EBC and the sequence (EmbeddingCollection) tables.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from iat_rec.cli import main
from iat_rec.data.instance_log import InstanceLog
from iat_rec.data.schema import DenseFeature, Label, Schema, SparseFeature
from iat_rec.errors import IatError
from iat_rec.tokens.online import OnlineTokens
from iat_rec.tokens.table import TokenTable
from tests.helpers import REPO, random_log, run_cli

STAGE1 = [
    *"--nproc 1 --scheme user --window 4 --batch-size 64".split(),  # instances: 16 windows of 4
    *"--steps 6 --slices 2 --eval-batches 1 --no-progress".split(),
    *"--emb-dim 4 --hidden 32 --decompress 16 --iat-dim 8".split(),
    *"--num-groups 4 --group-dim 16".split(),
]
TIGHT = dict(rtol=1e-5, atol=1e-6)


# user_id (single, pooled), item (single, sequence), tags (multi, pooled), genres (multi, sequence)
SCHEMA = Schema(
    user="u",
    timestamp="ts",
    labels=(Label("click", "click"),),
    sparse=(
        SparseFeature("user_id", "u", hash=64),
        SparseFeature("item", "item", hash=50),
        SparseFeature("tags", "tags", hash=20, separator="|"),
        SparseFeature("genres", "genres", hash=12, separator="|"),
    ),
    dense=(DenseFeature("price", "price"), DenseFeature("age", "age")),
    sequence=("item", "genres"),
)


def inputs(log: InstanceLog, rows: np.ndarray) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(dense, ids, lengths) straight from the log's columns, features in the schema's order."""
    ids, lengths = [], []
    for f in log.schema.sparse:
        col = log.sparse[f.name]
        if f.multi:
            values, offsets = (np.asarray(c) for c in col)
            ids.append(
                torch.from_numpy(np.concatenate([values[offsets[r] : offsets[r + 1]] for r in rows]).astype(np.int64))
            )
            lengths.append(torch.from_numpy((offsets[rows + 1] - offsets[rows]).astype(np.int64)))
        else:
            ids.append(torch.from_numpy(np.asarray(col)[rows].astype(np.int64)))
            lengths.append(torch.ones(len(rows), dtype=torch.int64))
    return torch.from_numpy(np.asarray(log.dense)[rows].astype(np.float32)), ids, lengths


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("online")
    log = random_log(root / "log", SCHEMA, 600, 30, 0, ts_max=10_000, max_ids=3, label_delay=5)
    run_cli("compress", "--data", str(log.path), "--out", str(root / "run"), *STAGE1)
    return root / "run"


@pytest.fixture(scope="module")
def final_table(run) -> Path:
    out = run.parent / "tokens_final"
    run_cli(
        "export",
        "--stage1",
        str(run),
        "--out",
        str(out),
        *"--nproc 1 --tokens-from final --dtype fp32 --batch-size".split(),
        *"256 --no-progress".split(),
    )
    return out


@pytest.fixture(scope="module")
def online(run) -> Path:
    out = run.parent / "online"
    run_cli("tokens", "compressor", "--stage1", str(run), "--out", str(out))
    return out


def test_exported_compressor_gives_the_token_table_rows(run, final_table, online):
    log, table = InstanceLog(run.parent / "log"), TokenTable(final_table)
    meta = json.loads((online / "compressor.json").read_text())
    assert meta["serialization"] == "torch.export" and meta["artifact"] == "compressor.pt2"
    assert [f["name"] for f in meta["sparse"]] == log.schema.sparse_names == ["user_id", "item", "tags", "genres"]
    assert [f["multi"] for f in meta["sparse"]] == [False, False, True, True]
    assert meta["source_checkpoint"] == f"checkpoints/{table.manifest['source_checkpoint']}"
    assert meta["log_fingerprint"] == table.manifest["log_fingerprint"] == log.fingerprint
    assert meta["output"]["shape"] == ["B", 8] and meta["dense"]["shape"] == ["B", 2]

    module = torch.export.load(str(online / "compressor.pt2")).module()
    want = table.read_rows(0, log.rows).float()
    rows = np.arange(log.rows)
    dense, ids, lengths = inputs(log, rows)
    for k in (2, 3):  # the multi-valued features: empty rows, one id and several ids all served
        assert {0, 1, 2, 3} <= set(lengths[k].tolist())
    with torch.no_grad():
        got = module(dense, ids, lengths)
        assert got.dtype == torch.float32 and got.shape == (log.rows, 8)
        torch.testing.assert_close(got, want, **TIGHT)
        for r in (0, 1, log.rows - 1):  # a request of one row
            torch.testing.assert_close(module(*inputs(log, np.array([r]))), want[r : r + 1], **TIGHT)
        # the equality is not vacuous: the token reads each sparse feature's ids
        r = int(np.flatnonzero((lengths[2].numpy() >= 2) & (lengths[3].numpy() >= 1))[0])
        for k, name in enumerate(log.schema.sparse_names):
            d, v, ln = inputs(log, np.array([r]))
            v[k] = (v[k] + 1) % log.schema.feature(name).num_embeddings
            assert not torch.allclose(module(d, v, ln), want[r : r + 1]), name


def test_torchscript_alternative_of_a_named_snapshot_gives_the_initial_tokens(run):
    out, table = run.parent / "online_ts", run.parent / "tokens_initial"
    run_cli(
        "export", "--stage1", str(run), "--out", str(table), *"--nproc 1 --tokens-from initial --no-progress".split()
    )
    run_cli(
        "tokens",
        "compressor",
        "--stage1",
        str(run),
        "--out",
        str(out),
        *"--format torchscript --checkpoint".split(),
        "snapshots/step_00000000",
    )
    meta = json.loads((out / "compressor.json").read_text())
    assert (meta["serialization"], meta["artifact"], meta["source_checkpoint"]) == (
        "torchscript",
        "compressor.ts",
        "snapshots/step_00000000",
    )
    log = InstanceLog(run.parent / "log")
    rows = np.arange(0, log.rows, 7)
    got = OnlineTokens(out)(*inputs(log, rows))
    torch.testing.assert_close(got, TokenTable(table).read_rows(0, log.rows).float()[rows], **TIGHT)


def test_the_artifact_runs_without_torchrec_or_fbgemm(run, final_table, online, tmp_path):
    log = InstanceLog(run.parent / "log")
    rows = np.arange(0, log.rows, 5)
    dense, ids, lengths = inputs(log, rows)
    torch.save({"dense": dense, "ids": ids, "lengths": lengths}, tmp_path / "request.pt")
    request = str(tmp_path / "request.pt")
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torchrec", "fbgemm_gpu", "modules", "pipelines"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import torch
from iat_rec.tokens.online import OnlineTokens
req = torch.load({request!r}, weights_only=True)
torch.save(OnlineTokens({str(online)!r})(req["dense"], req["ids"], req["lengths"]), {str(tmp_path / "tokens.pt")!r})
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torchrec", "fbgemm_gpu")))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
    got = torch.load(tmp_path / "tokens.pt", weights_only=True)
    torch.testing.assert_close(got, TokenTable(final_table).read_rows(0, log.rows).float()[rows], **TIGHT)


def test_bad_runs_and_outputs_are_refused(run, online, tmp_path, capsys):
    def fails(*argv: str) -> str:
        assert main(["tokens", "compressor", *argv]) == 2
        return capsys.readouterr().err

    assert "not a stage-1 (compress) run (no run.json)" in fails(
        "--stage1", str(tmp_path / "nothing"), "--out", str(tmp_path / "o1")
    )
    no_ckpt = tmp_path / "fresh"
    no_ckpt.mkdir()
    shutil.copy(run / "run.json", no_ckpt / "run.json")
    assert "no checkpoint" in fails("--stage1", str(no_ckpt), "--out", str(tmp_path / "o2"))
    err = fails("--stage1", str(run), "--out", str(tmp_path / "o3"), "--checkpoint", "step_99999999")
    assert "no complete checkpoint of that name" in err and "snapshots/step_00000000" in err
    assert "not a path" in fails("--stage1", str(run), "--out", str(tmp_path / "o4"), "--checkpoint", "../run")
    assert "would overwrite the input" in fails("--stage1", str(run), "--out", str(run / "online"))
    assert "pass --overwrite" in fails("--stage1", str(run), "--out", str(online))
    foreign = tmp_path / "foreign"
    (foreign / "keep").mkdir(parents=True)
    assert "is not an online compressor" in fails("--stage1", str(run), "--out", str(foreign), "--overwrite")
    assert (foreign / "keep").is_dir()
    # --overwrite replaces an earlier one, atomically: no temporary sibling stays behind
    again = tmp_path / "again"
    run_cli("tokens", "compressor", "--stage1", str(run), "--out", str(again), "--checkpoint", "step_00000006")
    run_cli("tokens", "compressor", "--stage1", str(run), "--out", str(again), "--overwrite")
    assert sorted(p.name for p in again.iterdir()) == ["compressor.json", "compressor.pt2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "foreign", "fresh"]  # refused calls wrote nothing


def test_requests_breaking_the_contract_and_damaged_artifacts_are_refused(run, online, tmp_path):
    log, encoder = InstanceLog(run.parent / "log"), OnlineTokens(online)
    dense, ids, lengths = inputs(log, np.arange(4))
    encoder(dense, ids, lengths)  # the good request runs

    def refused(match: str, d=dense, v=ids, ln=lengths) -> None:
        with pytest.raises(IatError, match=match):
            encoder(d, v, ln)

    refused(r"dense must be float32 \[B, 2\]", d=dense[:, :1])
    refused("dense must be float32", d=dense.double())
    refused("one tensor per sparse feature", v=ids[:3])
    refused(r"ids of genres must lie in \[0, 12\)", v=[*ids[:3], torch.full_like(ids[3], 12)])
    refused("ids of user_id must be an int64 vector", v=[ids[0].int(), *ids[1:]])
    refused("lengths of tags must be >= 0 and add up to", ln=[lengths[0], lengths[1], lengths[2] + 1, lengths[3]])
    refused(r"lengths of item must be int64 \[4\]", ln=[lengths[0], lengths[1][:3], *lengths[2:]])

    damaged = tmp_path / "damaged"
    shutil.copytree(online, damaged)
    with open(damaged / "compressor.pt2", "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(IatError, match="checksum differs"):
        OnlineTokens(damaged)
    with pytest.raises(IatError, match="not an online compressor"):
        OnlineTokens(run)


def test_a_bf16_run_serves_the_tokens_its_export_stored(run, tmp_path):
    """A stage 1 trained with --bf16 encodes under bf16 autocast in export and in the served
    module alike (Compressor.token), so the artifact gives the table's rows, not fp32's."""
    log = InstanceLog(run.parent / "log")
    bf16 = tmp_path / "run"
    run_cli("compress", "--data", str(log.path), "--out", str(bf16), *STAGE1, "--bf16")
    table = tmp_path / "tokens"
    run_cli("export", "--stage1", str(bf16), "--out", str(table), *"--nproc 1 --tokens-from final".split())
    run_cli("tokens", "compressor", "--stage1", str(bf16), "--out", str(tmp_path / "online"))
    module = torch.export.load(str(tmp_path / "online" / "compressor.pt2")).module()
    with torch.no_grad():
        got = module(*inputs(log, np.arange(log.rows)))
    torch.testing.assert_close(got, TokenTable(table).read_rows(0, log.rows).float(), **TIGHT)
