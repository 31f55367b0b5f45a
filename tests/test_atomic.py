"""Atomic artifacts: a writer SIGKILLed mid-write leaves the previous artifact intact and usable.

Each test writes an artifact, then runs a second writer of it in a fresh interpreter that
SIGKILLs itself at the point the new artifact is fully written to its temporary sibling and
about to be renamed into place: the instance log (ingest), a checkpoint, a token table, the
experiment report and a run's result.json.
"""

import json
import shutil
import signal
import subprocess
import sys
import textwrap

import torch

from iat_rec.data.ingest import ingest
from iat_rec.data.instance_log import InstanceLog
from iat_rec.data.schema import load_schema
from iat_rec.dist import checkpoint as ckpt
from iat_rec.dist.atomic import write_json
from iat_rec.tokens.table import TokenTable
from tests.helpers import INGEST_ROWS, INGEST_SCHEMA_YAML, REPO, write_csv

SWAP = "iat_rec.dist.atomic._put_dir"  # the rename of a finished directory into place


def run_killed_at(target: str, setup: str, write: str) -> None:
    """Runs ``setup``, then ``write`` in a fresh interpreter whose ``target`` function
    (module.name) SIGKILLs it when called."""
    module, name = target.rsplit(".", 1)
    script = "\n".join(
        [
            textwrap.dedent(setup),
            "import importlib, os, signal",
            f"setattr(importlib.import_module({module!r}), {name!r}, "
            "lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL))",
            textwrap.dedent(write),
        ]
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, f"not killed ({proc.returncode}):\n{proc.stderr[-3000:]}"


def test_ingest_killed_before_the_rename_leaves_the_previous_log(tmp_path):
    (tmp_path / "schema.yaml").write_text(INGEST_SCHEMA_YAML)
    out = tmp_path / "log"
    before = ingest(write_csv(tmp_path / "all.csv"), load_schema(tmp_path / "schema.yaml"), out)
    write_csv(tmp_path / "half.csv", INGEST_ROWS[:4])
    run_killed_at(
        SWAP,
        """
        from iat_rec.data.ingest import ingest
        from iat_rec.data.schema import load_schema
    """,
        f"ingest({str(tmp_path / 'half.csv')!r}, load_schema({str(tmp_path / 'schema.yaml')!r}), {str(out)!r})",
    )
    log = InstanceLog(out)
    assert (log.rows, log.fingerprint) == (len(INGEST_ROWS), before.fingerprint)
    log.verify()


def test_checkpoint_killed_before_the_rename_leaves_the_previous_one_latest(tmp_path):
    """Step 1 saved, step 2 killed: ``latest`` is step 1, and it loads the step-1 weights."""
    run = tmp_path / "run"
    run_killed_at(
        SWAP,
        f"""
        import torch
        from iat_rec.dist import checkpoint as ckpt
        from iat_rec.dist.env import init_distributed
        init_distributed("cpu")
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        ckpt.save({str(run)!r}, 1, {{"model": model.state_dict(), "step": 1}}, {{"step": 1}})
        torch.nn.init.zeros_(model.weight)
    """,
        f"""ckpt.save({str(run)!r}, 2, {{"model": model.state_dict(), "step": 2}}, {{"step": 2}})""",
    )
    latest = ckpt.latest(run)
    assert latest.name == "step_00000001"
    torch.manual_seed(0)
    want = torch.nn.Linear(3, 2)
    got = torch.nn.Linear(3, 2)
    torch.nn.init.zeros_(got.weight)
    ckpt.load_weights(latest, got)
    torch.testing.assert_close(got.state_dict(), want.state_dict())
    assert json.loads((latest / "rank0.json").read_text()) == {"step": 1}


def test_token_table_killed_before_the_rename_leaves_the_previous_table(tokens, tmp_path):
    table = tmp_path / "tokens"
    shutil.copytree(tokens, table)
    before = TokenTable(table).read_rows(0, 8)
    run_killed_at(
        SWAP,
        f"""
        import torch
        from iat_rec.tokens.table import SIDE_ARRAYS, WEIGHT_KEY, TokenTable, save_table, token_collection
        old = TokenTable({str(table)!r})
        ones = token_collection(old.rows, old.dim, old.dtype, device="cpu")
        ones.state_dict()[WEIGHT_KEY].fill_(1.0)
        manifest = {{k: v for k, v in old.manifest.items() if k not in ("format", "version")}}
        side = {{name: old.side(name) for name in SIDE_ARRAYS}}
    """,
        f"save_table({str(table)!r}, ones, manifest, side)",
    )
    after = TokenTable(table)
    assert after.manifest == json.loads((tokens / "manifest.json").read_text())
    torch.testing.assert_close(after.read_rows(0, 8), before)


RESULTS = [
    {
        "variant": "iat-user",
        "reader": "transformer",
        "seed": 0,
        "metrics": {"task": "click", "auc": 0.6, "gauc": 0.55, "logloss": 0.5, "ne": 0.9},
    }
]


def test_report_killed_before_the_rename_leaves_the_previous_report(tmp_path):
    from iat_rec.eval.report import write_report

    out = tmp_path / "report"
    write_report(out, "first", RESULTS, {"rank": 1.0}, "iat-rec experiment ...")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    run_killed_at(
        SWAP,
        f"from iat_rec.eval.report import write_report\nresults = {RESULTS!r}",
        f"write_report({str(out)!r}, 'second', results, {{}}, 'iat-rec experiment ...')",
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert json.loads((out / "results.json").read_text())["title"] == "first"


def test_result_json_killed_before_the_rename_keeps_the_previous_result(tmp_path):
    path = tmp_path / "run" / "result.json"
    write_json(path, {"steps": 12, "valid": {"click": {"auc": 0.6}}})
    run_killed_at(
        "os.replace",
        "from iat_rec.dist.atomic import write_json",
        f"write_json({str(path)!r}, {{'steps': 24, 'valid': {{'click': {{'auc': 0.7}}}}}})",
    )
    assert json.loads(path.read_text()) == {"steps": 12, "valid": {"click": {"auc": 0.6}}}
    leftover = [p for p in path.parent.iterdir() if p != path]
    assert (
        len(leftover) == 1 and json.loads(leftover[0].read_text())["steps"] == 24
    )  # the whole new text, never renamed
