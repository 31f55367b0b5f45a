"""Stage 2 on 2 gloo ranks: every history mode and reader, evaluate, warm start, frozen tokens,
cross-domain requests, and the experiment report."""

import json
import re
from pathlib import Path

import pytest
import torch

from iat_rec.cli import main
from iat_rec.data.instance_log import InstanceLog, time_split
from iat_rec.dist import checkpoint as ckpt
from iat_rec.dist.env import DistEnv
from iat_rec.sharding.plan_json import load_plan
from iat_rec.train.stage1 import build_compressor, load_stage1
from iat_rec.train.stage2 import Stage2Config, build, dataset
from iat_rec.train.trainer import DistributedModelParallel, Trainer, frozen_tables, make_optimizer
from tests.helpers import on_ranks, run_cli, synth_log

RANK_YAML = """
steps: 6
batch_size: 32
eval_every: 3
eval_batches: 2
model: {emb_dim: 8, hidden: 64}
ranker: {max_len: 16, reader_layers: 1, head: [32]}
"""
STAGE1_YAML = """
steps: 6
batch_size: 64
window: 8
eval_batches: 2
model: {emb_dim: 8, hidden: 64, decompress: [64], iat_dim: 16}
"""


@pytest.fixture(scope="module")
def experiment(tiny_log, tmp_path_factory):
    work = tmp_path_factory.mktemp("exp")
    (work / "c1.yaml").write_text(STAGE1_YAML)
    (work / "c2.yaml").write_text(RANK_YAML)
    run_cli(
        "experiment",
        "--data",
        str(tiny_log),
        "--work",
        str(work),
        *"--seeds 1 --nproc 2 --variants".split(),
        "none,labels-only,handcrafted,iat-temporal,both-user",
        *"--readers transformer,din,longer --compress-config".split(),
        str(work / "c1.yaml"),
        "--rank-config",
        str(work / "c2.yaml"),
        "--no-progress",
    )
    return work


def test_no_progress_reaches_every_stage_and_changes_no_result(experiment, tiny_log):
    runs = sorted(experiment.glob("*/run.json"))
    assert runs and all(json.loads(r.read_text())["config"]["progress"] is False for r in runs)
    # the same experiment with progress bars is the same experiment: every finished stage is reused
    run_cli(
        "experiment",
        "--data",
        str(tiny_log),
        "--work",
        str(experiment),
        *"--seeds 1 --nproc 1 --report-only --variants".split(),
        "none,labels-only,handcrafted,iat-temporal,both-user",
        *"--readers transformer,din,longer --compress-config".split(),
        str(experiment / "c1.yaml"),
        "--rank-config",
        str(experiment / "c2.yaml"),
        "--progress",
    )


def test_every_history_mode_and_reader_trains_and_reports(experiment, tiny_log):
    results = json.loads((experiment / "report" / "results.json").read_text())
    seen = {(r["variant"], r["reader"]) for r in results["runs"]}
    assert seen == {("none", "transformer")} | {
        (v, r)
        for v in ("labels-only", "handcrafted", "iat-temporal", "both-user")
        for r in ("transformer", "din", "longer")
    }
    log = InstanceLog(tiny_log)
    test_rows = len(time_split(log)["test"])
    for r in results["runs"]:  # learning itself: test_learning.py; here every test request is scored
        m = json.loads((Path(r["run"]) / "metrics.json").read_text())
        assert {"auc", "gauc", "logloss", "ne", "n"} <= set(m) and m["n"] == test_rows
        pipelined = json.loads((Path(r["run"]) / "result.json").read_text())["pipelined_modules"]
        # feature EBC, shared-id EC (which also reads the hand-crafted history), token EC
        assert (
            len(pipelined)
            == {"none": 2, "labels-only": 2, "handcrafted": 2, "iat-temporal": 3, "both-user": 3}[r["variant"]]
        )
    report = (experiment / "report" / "report.md").read_text()
    assert "| variant | seeds | AUC | GAUC | LogLoss (nats) | NE |" in report and "both-user (longer)" in report
    assert "Stage 1: own validation AUC and token health" in report
    assert "Task `conversion`:" in report and set(results["variants_by_task"]) == {
        "click",
        "conversion",
    }  # every task reported
    assert results["logloss_unit"] == "nats" and set(results["variants"]) >= {"none", "labels-only (transformer)"}
    assert {"valid", "time-consistent"} <= set(results["stage1"]["user-s0"])
    assert (experiment / "report" / "metrics_per_variant.png").stat().st_size > 10_000
    assert (experiment / "report" / "valid_auc_over_steps.png").stat().st_size > 10_000
    assert set(results["seconds"]) >= {
        "compress-temporal-s0",
        "export-user-time-consistent-s0",
        "rank-none-transformer-s0",
    }


def test_evaluate_reproduces_the_run_metrics(experiment, capsys):
    run = experiment / "rank-iat-temporal-din-s0"
    before = json.loads((run / "metrics.json").read_text())
    assert main(["evaluate", "--run", str(run), "--nproc", "2"]) == 0
    after = json.loads((run / "metrics.json").read_text())
    assert after["auc"] == pytest.approx(before["auc"], abs=1e-6) and after["n"] == before["n"]


def local(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    """This rank's shards (or whole tensors) of the entries under ``prefix``, copied."""
    out = {}
    for k, v in state.items():
        if k.startswith(prefix):
            parts = [s.tensor.flatten() for s in v.local_shards()] if hasattr(v, "local_shards") else [v.flatten()]
            out[k] = torch.cat(parts).detach().clone() if parts else torch.empty(0)
    return out


def warm_start_and_frozen_tokens(env: DistEnv, data: str, tokens: str, stage1: str, out: str) -> dict:
    """On each rank (run by on_ranks): stage 2 with --warm-start and --stage1 loads the stage-1
    feature weights with the stage-1 plan, and training never changes the token table."""
    cfg = Stage2Config(
        data=data, out=out, tokens=tokens, stage1=stage1, warm_start=True, steps=6, batch_size=32, progress=False
    )
    cfg.ranker.history, cfg.ranker.max_len = "both", 16
    built = build(cfg, env, plan_out=None)
    s1cfg, _, s1log = load_stage1(stage1)
    compressor = DistributedModelParallel(
        build_compressor(s1log, s1cfg), device=env.device, plan=load_plan(f"{stage1}/plan.json")
    )
    ckpt.load_weights(ckpt.latest(stage1), compressor)
    want = local(compressor.state_dict(), "base.sparse.")
    got = local(built.model.state_dict(), "base.sparse.")
    warm = sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)
    before = local(built.model.state_dict(), "tokens.")
    trainer = Trainer(
        env,
        cfg,
        built.model,
        make_optimizer(built.model, cfg),
        dataset(built, cfg, "train"),
        None,
        built.log.schema.task_names,
        32,
    )
    trainer.fit()
    after = local(built.model.state_dict(), "tokens.")
    changed_features = any(
        not torch.equal(got[k], v) for k, v in local(built.model.state_dict(), "base.sparse.").items()
    )
    frozen = sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    result = torch.tensor([warm, frozen, changed_features], dtype=torch.int64)
    torch.distributed.all_reduce(result, op=torch.distributed.ReduceOp.MIN)
    return {
        "frozen_tables": frozen_tables(built.model),  # marked by requires_grad before sharding
        "optimized_token_keys": [k for k in trainer.optimizer.state_dict()["state"] if k.startswith("tokens.")],
        "checkpointed_token_keys": [k for k in trainer._weights() if k.startswith("tokens.")],
        "warm_start_equal": bool(result[0]),
        "tokens_unchanged": bool(result[1]),
        "features_trained": bool(result[2]),
        "token_params": sorted(before),
    }


def test_warm_start_loads_stage1_weights_and_tokens_stay_frozen(tiny_log, stage1_run, tokens, tmp_path):
    got = on_ranks(warm_start_and_frozen_tokens, tiny_log, tokens, stage1_run, tmp_path / "r")[0]  # rank 0's
    assert got["token_params"], "the model holds the token table"
    assert got == {
        **got,
        "frozen_tables": ["tokens"],
        "optimized_token_keys": [],
        "checkpointed_token_keys": [],
        "warm_start_equal": True,
        "tokens_unchanged": True,
        "features_trained": True,
    }


def test_cross_domain_requests_read_the_source_token_table(tiny_log, tokens, tmp_path):
    """Requests from another log (same user ids, other instances) fetch from the source table."""
    other = synth_log(tmp_path / "other", users=120, mean_instances=20, seed=5)  # same user keys, new events
    args = [
        "rank",
        "--data",
        str(other.path),
        "--tokens",
        str(tokens),
        "--history",
        "iat",
        "--out",
        str(tmp_path / "x"),
        *"--nproc 2 --steps 4 --batch-size 32 --max-len 16".split(),
        *"--no-progress --emb-dim 8".split(),
    ]
    assert main(args) == 2, "a table of another log is cross-domain only when asked for"
    assert not (tmp_path / "x").exists()
    run_cli(*args, "--cross-domain")
    m = json.loads((tmp_path / "x" / "metrics.json").read_text())
    assert m["n"] == len(time_split(other)["test"])  # every request of the other log scored


def test_bad_input_is_one_clear_error(tiny_log, tmp_path, capsys):
    assert main(["rank", "--data", str(tiny_log), "--history", "iat", "--out", str(tmp_path / "r")]) == 2
    assert "needs --tokens" in capsys.readouterr().err
    assert main(["rank", "--data", str(tiny_log), "--reader", "lstm", "--out", str(tmp_path / "r")]) == 2
    assert main(["evaluate", "--run", str(tmp_path / "nothing")]) == 2
    longer = [
        "rank",
        "--data",
        str(tiny_log),
        "--history",
        "labels",
        "--reader",
        "longer",
        "--out",
        str(tmp_path / "r"),
    ]
    assert main([*longer, "--length-bucket", "6"]) == 2  # LONGER's groups of 4 steps would move
    assert "multiples of 4" in capsys.readouterr().err
    assert main([*longer, "--pack-history"]) == 2  # packing is the transformer's
    assert "transformer reader's" in capsys.readouterr().err
    plain = ["rank", "--data", str(tiny_log), "--history", "labels", "--out", str(tmp_path / "r")]
    assert main([*plain, "--pack-history", "--length-bucket", "4"]) == 2
    assert "cut nothing more" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_stage2_resume_continues_exactly_with_loader_workers(tiny_log, tokens, tmp_path):
    args = [
        "--data",
        str(tiny_log),
        "--tokens",
        str(tokens),
        *"--history both --nproc 2 --batch-size 32 --max-len 16".split(),
        *"--emb-dim 8 --num-workers 1 --eval-batches 1".split(),
        "--no-progress",
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    run_cli("rank", *args, "--out", str(full), "--steps", "8")
    run_cli("rank", *args, "--out", str(part), "--steps", "4")
    run_cli("rank", *args, "--out", str(part), "--steps", "8", "--resume")

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]

    assert losses(part)[-4:] == losses(full)[-4:]
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(part / "checkpoints" / "step_00000008")).read_metadata().state_dict_metadata
    assert any(k.startswith("model.base.sparse.") for k in saved)
    assert not any("tokens" in k for k in saved), "the frozen token table stays out of checkpoints"


def test_tensorboard_gets_each_runs_options_and_test_metrics(experiment):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = next(experiment.glob("rank-handcrafted-transformer-s*"))
    acc = EventAccumulator(str(run / "tb" / "hparams"))
    acc.Reload()
    assert {"test/auc", "test/logloss"} <= set(acc.Tags()["scalars"])
    assert acc.Scalars("test/auc")[0].value == pytest.approx(json.loads((run / "metrics.json").read_text())["auc"])


def test_each_result_is_written_once(experiment):
    run = next(experiment.glob("rank-none-transformer-s*"))
    assert not (run / "config.json").exists()  # the config is run.json's
    assert "test" not in json.loads((run / "result.json").read_text())  # the test figures are metrics.json's
    assert json.loads((run / "run.json").read_text())["config"]["out"] == str(run)


def test_range_reads_train_the_same_model_as_the_lookup(tiny_log, stage1_run, tokens, tmp_path, capfd):
    """--token-fetch ranges (a replicated table read by row ranges) and sharded_ranges (row
    shards, histories sent to their owners as ranges) fetch exactly the tokens of TorchRec's
    sharded lookup, so the same seed trains the same model to the same losses.
    The feature tables are warm-started: a fresh sharded table's random init depends on the
    rank that holds it, and the plan differs once the token table is not TorchRec's.
    Reading the histories in length buckets (rows sorted by length within each batch), or
    packed (the reader's position-wise layers on the valid steps only), is the same function
    of each batch: the same losses up to summation order."""
    args = ["rank", "--data", str(tiny_log), "--tokens", str(tokens), *"--history iat --query token".split()]
    args += ["--stage1", str(stage1_run), *"--warm-start --nproc 2 --steps 6 --batch-size 32".split()]
    args += [*"--max-len 16 --eval-every 3 --eval-batches 2".split(), *"--no-progress --reader-layers 1".split()]
    args += ["--head", "32"]
    losses = {}
    metrics = {}
    runs = {
        "lookup": [],
        "ranges": [],
        "sharded_ranges": [],
        "buckets": ["--length-bucket", "4"],
        "packed": ["--pack-history"],
    }
    for fetch, extra in runs.items():
        token_fetch = "ranges" if fetch in ("buckets", "packed") else fetch
        run_cli(*args, "--token-fetch", token_fetch, *extra, "--out", str(tmp_path / fetch))
        metrics[fetch] = json.loads((tmp_path / fetch / "metrics.json").read_text())
        losses[fetch] = [json.loads(x)["loss"] for x in (tmp_path / fetch / "train_log.jsonl").read_text().splitlines()]
        plan = json.loads((tmp_path / fetch / "plan.json").read_text())
        assert ("iat_tokens" in json.dumps(plan)) == (fetch == "lookup")  # ranges: no TorchRec token table
    shares = re.findall(
        r"length buckets of 4: the first batch is read in (\d+) buckets \(widths ([\d, ]+)\), (\d+)% of the steps",
        capfd.readouterr().out,
    )
    assert len(shares) == 1 and int(shares[0][2]) < 100, shares  # the buckets were read
    # the transformer reader prepends the query: query + width fills whole multiples of L (or width is T)
    assert all((int(w) + 1) % 4 == 0 or int(w) == 16 for w in shares[0][1].split(", ")), shares
    for layout in ("buckets", "packed"):
        assert losses[layout] == pytest.approx(losses["ranges"], abs=1e-5), layout
        assert metrics[layout]["auc"] == pytest.approx(metrics["ranges"]["auc"], abs=1e-4), layout
    for fetch in ("ranges", "sharded_ranges"):
        assert len(losses[fetch]) == 6 and losses[fetch] == pytest.approx(losses["lookup"], abs=1e-6), fetch
        assert metrics[fetch]["auc"] == pytest.approx(metrics["lookup"]["auc"], abs=1e-6), fetch
        assert metrics[fetch]["logloss"] == pytest.approx(metrics["lookup"]["logloss"], abs=1e-6), fetch
