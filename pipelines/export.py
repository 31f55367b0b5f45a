"""Export: run the trained compressor over every instance and write the sharded token table.

    iat-rec export --stage1 RUN --out TOKENS [--dtype fp32|fp16] [--nproc N]

The compressor is sharded with the plan of its stage-1 run (re-planned when the world size
differs) and loaded from the run's latest checkpoint. The token table is planned by
TorchRec (row-wise on GPU, table- or column-wise on CPU where row-wise is unavailable);
each rank computes the tokens of the rows its shards own and writes them in place, then
the table is saved with torch.distributed.checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner.types import ParameterConstraints

from iat_rec import checkpoint as ckpt
from iat_rec.batch import make_batch
from iat_rec.distenv import init_distributed, rank_main, run_ranks
from iat_rec.errors import IatError
from iat_rec.planning import build_topology, load_plan, make_plan
from iat_rec.token_table import WEIGHT_KEY, save_table, token_collection, token_constraints
from pipelines.compress import build_compressor, load_stage1
from pipelines.trainer import progress_bar, shard


def shard_token_table(rows: int, dim: int, dtype: str, env, batch_size: int, hbm_gb: float = 0.0,
                      constraints: dict[str, ParameterConstraints] | None = None) -> DistributedModelParallel:
    """The token table alone, planned and sharded (frozen: no optimizer ever touches it).
    ``constraints`` replaces ``token_constraints`` (benchmarks try other shardings with it)."""
    holder = nn.Module()
    holder.tokens = token_collection(rows, dim, dtype)
    topology = build_topology(env.world_size, env.local_world_size, env.device.type, hbm_gb=hbm_gb or None)
    plan = make_plan(holder, topology, batch_size, constraints or token_constraints(env.device.type), pg=dist.group.WORLD)
    return DistributedModelParallel(holder, device=env.device, plan=plan)


def local_row_blocks(weight) -> list[tuple[int, int, list[tuple[int, torch.Tensor]]]]:
    """This rank's shards grouped by row range: [(row0, rows, [(col0, shard tensor), ...])]."""
    shards = weight.local_shards() if hasattr(weight, "local_shards") else []
    blocks: dict[tuple[int, int], list] = {}
    for s in shards:
        (r0, c0), (n, _) = s.metadata.shard_offsets, s.metadata.shard_sizes
        blocks.setdefault((r0, n), []).append((c0, s.tensor))
    return [(r0, n, cols) for (r0, n), cols in sorted(blocks.items())]


def export(run: str, out: str, dtype: str = "fp32", batch_size: int = 4096, device: str = "auto", progress: bool = True) -> Path:
    env = init_distributed(device)
    cfg, info, log = load_stage1(run)
    model = build_compressor(log, cfg)  # no streaming prefix table: export needs the tokens only
    plan = None
    if info["world_size"] == env.world_size:
        plan = load_plan(Path(run) / "plan.json")
        plan.plan.pop("tokens", None)
    cfg.device = env.device.type
    dmp, _ = shard(model, env, cfg, plan_out=None, plan=plan)
    last = ckpt.latest(run)
    if last is None:
        raise IatError(f"{run}: no checkpoint to export from")
    ckpt.load_weights(last, dmp)
    dmp.eval()
    compressor = dmp.module

    table = shard_token_table(log.rows, cfg.model.iat_dim, dtype, env, batch_size)
    weight = table.module.tokens.state_dict()[WEIGHT_KEY]
    blocks = local_row_blocks(weight)
    # (first row, rows, offset inside the shard, column shards) per batch
    batches = [(r0 + i, min(batch_size, n - i), i, cols) for r0, n, cols in blocks for i in range(0, n, batch_size)]
    steps = torch.tensor([len(batches)], device=env.device)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)  # the compressor's sharded EBC is collective
    bar = progress_bar(int(steps), 0, "export", "batch", env.is_main and progress)
    with torch.no_grad():
        for k in range(int(steps)):
            first, n, at, cols = batches[k] if k < len(batches) else (0, 0, 0, [])
            rows = np.full(batch_size, -1, dtype=np.int64)
            rows[:n] = np.arange(first, first + n)
            tokens = compressor.encode(make_batch(log, rows).to(env.device))
            for c0, shard_t in cols:
                shard_t[at : at + n] = tokens[:n, c0 : c0 + shard_t.shape[1]].to(shard_t.dtype)
            bar.update(1)
    bar.close()
    source = hashlib.blake2b((Path(run) / "run.json").read_bytes() + last.name.encode(), digest_size=16).hexdigest()
    manifest = {
        "dim": cfg.model.iat_dim,
        "dtype": dtype,
        "rows": log.rows,
        "scheme": cfg.scheme,
        "source_run": str(Path(run).resolve()),
        "source_checkpoint": last.name,
        "source_fingerprint": source,
        "log_fingerprint": log.fingerprint,
        "log_path": str(log.path.resolve()),
    }
    side = {"ts": log.ts, "user_offsets": log.user_offsets, "user_keys": log.user_keys, "labels": log.labels, "label_time": log.label_time}
    path = save_table(out, table.module.tokens, manifest, side)
    if env.is_main:
        print(f"token table {path}: {log.rows} rows x {cfg.model.iat_dim} {dtype}, from {last}", flush=True)
    return path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iat-rec export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --stage1 first: torchrun's parser (torchx jobs) refuses --run as an abbreviation of its --run-path
    p.add_argument("--stage1", "--run", dest="run", required=True, help="stage-1 run directory")
    p.add_argument("--out", required=True, help="token table directory to write")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--nproc", type=int, default=None, help="local ranks to launch (default: GPUs, else 2)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def cli(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    load_stage1(args.run)  # clear errors before any rank starts
    return run_ranks(
        "pipelines.export", argv, args.nproc,
        lambda: export(args.run, args.out, args.dtype, args.batch_size, args.device, args.progress),
    )  # fmt: skip


if __name__ == "__main__":
    rank_main(cli)
