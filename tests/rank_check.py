"""Run as 2 ranks by the tests: stage 2 with --warm-start and --stage1 loads the stage-1
feature weights with the stage-1 plan, and training never changes the token table."""

import json
import sys

import torch

from iat_rec.dist import checkpoint as ckpt
from iat_rec.dist.env import init_distributed
from iat_rec.sharding.plan_json import load_plan
from iat_rec.train.stage1 import build_compressor, load_stage1
from iat_rec.train.trainer import DistributedModelParallel, Trainer, make_optimizer
from pipelines.rank import RankConfig, build, dataset


def local(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    """This rank's shards (or whole tensors) of the entries under ``prefix``, copied."""
    out = {}
    for k, v in state.items():
        if k.startswith(prefix):
            parts = [s.tensor.flatten() for s in v.local_shards()] if hasattr(v, "local_shards") else [v.flatten()]
            out[k] = torch.cat(parts).detach().clone() if parts else torch.empty(0)
    return out


def main(data: str, tokens: str, stage1: str, out: str) -> None:
    env = init_distributed("cpu")
    cfg = RankConfig(
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
        make_optimizer(built.model, 1e-2),
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
    if env.rank == 0:
        print(
            "RESULT"
            + json.dumps(
                {
                    "warm_start_equal": bool(result[0]),
                    "tokens_unchanged": bool(result[1]),
                    "features_trained": bool(result[2]),
                    "token_params": sorted(before),
                }
            )
        )
    torch.distributed.barrier()  # leave with the group torn down: a live gloo group can abort a rank at exit
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
