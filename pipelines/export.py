"""Export: run the trained compressor over every instance and write the sharded token table.

    iat-rec export --stage1 RUN --out TOKENS [--dtype fp32|fp16] [--nproc N]
    iat-rec export --stage1 RUN --append OLD_TOKENS --out TOKENS   (day-by-day refresh)

The compressor is sharded with the plan of its stage-1 run (re-planned when the world size
differs) and loaded from the run's latest checkpoint. The token table is planned by
TorchRec (row-wise on GPU, table- or column-wise on CPU where row-wise is unavailable);
each rank computes the tokens of the rows its shards own and writes them in place, then
the table is saved with torch.distributed.checkpoint.

With ``--append OLD_TOKENS`` (a table of an earlier version of the run's log, see ``iat-rec data
append``) only the rows appended since are encoded; every old row keeps its bytes, moved to its
row in the new version. The manifest's ``segments`` names the model that encoded each segment's
rows and ``table_version`` counts the refreshes. Each rank reads the old table whole.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from iat_rec.batching.batch import make_batch
from iat_rec.dist import checkpoint as ckpt
from iat_rec.dist.atomic import check_out, write_json
from iat_rec.dist.env import init_distributed, rank_main, run_ranks
from iat_rec.sharding.plan_json import load_plan
from iat_rec.tables import TOKEN_DTYPES, TOKENS_PATH
from iat_rec.tokens.export import (
    TOKENS_FROM,
    check_append,
    check_resumed,
    copy_rows,
    gather_rows,
    local_row_blocks,
    local_stats,
    shard_token_table,
    token_sources,
)
from iat_rec.tokens.health import format_health, table_health
from iat_rec.tokens.table import FORMAT as TABLE_FORMAT
from iat_rec.tokens.table import SIDE_ARRAYS, WEIGHT_KEY, TokenTable, save_table
from iat_rec.train.config import DEVICES
from iat_rec.train.run_dir import RUN_INFO
from iat_rec.train.stage1 import build_compressor, load_stage1
from iat_rec.train.trainer import progress_bar, shard


def export(
    run: str,
    out: str,
    dtype: str = "fp32",
    batch_size: int = 4096,
    device: str = "auto",
    progress: bool = True,
    tokens_from: str = "time-consistent",
    append: str = "",
) -> Path:
    env = init_distributed(device)
    cfg, info, log = load_stage1(run)
    check_resumed(run, info, tokens_from, append)
    old = TokenTable(append) if append else None
    kept = check_append(old, log, cfg.model.iat_dim, dtype) if old else np.zeros(0, dtype=np.int64)
    model = build_compressor(log, cfg)  # no streaming prefix table: export needs the tokens only
    plan = None
    if info["world_size"] == env.world_size:
        plan = load_plan(Path(run) / "plan.json")
        plan.plan.pop(TOKENS_PATH, None)
    cfg.device = env.device.type
    dmp, _ = shard(model, env, cfg, plan_out=None, plan=plan)
    sources, source_of_row = token_sources(run, cfg, info, log, tokens_from)
    source_of_row[kept] = -1  # rows the old table holds: copied, never encoded
    dmp.eval()
    compressor = dmp.module

    table = shard_token_table(log.rows, cfg.model.iat_dim, dtype, env, batch_size)
    weight = table.module.tokens.state_dict()[WEIGHT_KEY]
    blocks = local_row_blocks(weight)
    if old is not None:
        copy_rows(old, kept, blocks)
    # per source: (rows, their offsets inside the shard, column shards) per batch
    plans = []
    for k in range(len(sources)):
        batches = []
        for r0, n, cols in blocks:
            at = np.flatnonzero(source_of_row[r0 : r0 + n] == k)
            batches += [
                (at[i : i + batch_size] + r0, at[i : i + batch_size], cols) for i in range(0, len(at), batch_size)
            ]
        plans.append(batches)
    counts = torch.tensor([len(b) for b in plans], device=env.device)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)  # the compressor's sharded EBC is collective
    bar = progress_bar(int(counts.sum()), 0, "export", "batch", env.is_main and progress)
    with torch.no_grad():
        for k, path in enumerate(sources):
            if not int(counts[k]):
                continue
            ckpt.load_weights(path, dmp)
            for i in range(int(counts[k])):
                rows_k, at, cols = (
                    plans[k][i] if i < len(plans[k]) else (np.zeros(0, np.int64), np.zeros(0, np.int64), [])
                )
                rows = np.full(batch_size, -1, dtype=np.int64)
                rows[: len(rows_k)] = rows_k
                tokens = compressor.encode(make_batch(log, rows).to(env.device))[: len(rows_k)]
                index = torch.from_numpy(at).to(env.device)
                for c0, shard_t in cols:
                    shard_t[index] = tokens[:, c0 : c0 + shard_t.shape[1]].to(shard_t.dtype)
                bar.update(1)
    bar.close()
    mean, std = local_stats(weight, cfg.model.iat_dim, env.device)
    final = ckpt.latest(run)
    source = hashlib.blake2b(
        (Path(run) / RUN_INFO).read_bytes() + final.name.encode() + tokens_from.encode(), digest_size=16
    ).hexdigest()
    segment = {
        "rows": int((source_of_row >= 0).sum()),
        "source_run": str(Path(run).resolve()),
        "source_checkpoint": final.name,
        "tokens_from": tokens_from,
        "log_fingerprint": log.fingerprint,
    }
    earlier = (
        (old.manifest.get("segments") or [{k: old.manifest.get(k) for k in segment} | {"rows": old.rows}])
        if old
        else []
    )
    manifest = {
        "dim": cfg.model.iat_dim,
        "table_version": (old.manifest.get("table_version", 1) + 1) if old else 1,
        "segments": [*earlier, segment],  # per segment of rows: the model that encoded them
        "dtype": dtype,
        "rows": log.rows,
        "scheme": cfg.scheme,
        "tokens_from": tokens_from,
        "sources": {
            p.parent.name + "/" + p.name: int((source_of_row == k).sum()) for k, p in enumerate(sources)
        },  # rows encoded here
        "split": list(cfg.split),
        "tasks": log.schema.task_names,
        "token_stats": {"mean": mean.tolist(), "std": std.tolist()},
        "source_run": str(Path(run).resolve()),
        "source_checkpoint": final.name,
        "source_fingerprint": source,
        "log_fingerprint": log.fingerprint,
        "log_path": str(log.path.resolve()),
    }
    path = save_table(out, table.module.tokens, manifest, {name: getattr(log, name) for name in SIDE_ARRAYS})
    health = table_health(TokenTable(path), read=lambda rows: gather_rows(weight, rows, cfg.model.iat_dim, env.device))
    if env.is_main:
        write_json(path / "manifest.json", {**TokenTable(path).manifest, "health": health})
        if old is not None:
            print(
                f"appended {segment['rows']} rows to {len(kept)} rows of {old.path} "
                f"(table version {manifest['table_version']})",
                flush=True,
            )
        print(
            f"token table {path}: {log.rows} rows x {cfg.model.iat_dim} {dtype}, tokens from {tokens_from} "
            f"({len(sources)} model(s), final {final.name})\n{format_health(health)}",
            flush=True,
        )
    dist.barrier()
    return path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iat-rec export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # --stage1 first: torchrun's parser (torchx jobs) refuses --run as an abbreviation of its --run-path
    p.add_argument("--stage1", "--run", dest="run", required=True, help="stage-1 run directory")
    p.add_argument("--out", required=True, help="token table directory to write")
    p.add_argument("--dtype", choices=sorted(TOKEN_DTYPES), default="fp32")
    p.add_argument(
        "--tokens-from",
        choices=TOKENS_FROM,
        default="time-consistent",
        help="which model encodes each row (default time-consistent: a training row's token comes from "
        "the last snapshot before its training step; final: the last checkpoint for every row; "
        "initial: the untrained model)",
    )
    p.add_argument(
        "--append",
        default="",
        metavar="OLD_TOKENS",
        help="a token table of an earlier version of the run's log (iat-rec data append): encode only the rows "
        "appended since and keep every old row's bytes",
    )
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--nproc", type=int, default=None, help="local ranks to launch (default: GPUs, else 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing token table at --out")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def cli(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    cfg, info, log = load_stage1(args.run)  # clear errors before any rank starts
    log.check_files()
    check_resumed(args.run, info, args.tokens_from, args.append)
    check_out(
        args.out,
        "a token table",
        {TABLE_FORMAT},
        "manifest.json",
        args.overwrite,
        (args.run, log.path, *([args.append] if args.append else [])),
    )
    if args.append:
        old = TokenTable(args.append)
        old.check_files()
        check_append(old, log, cfg.model.iat_dim, args.dtype)
    return run_ranks(
        "pipelines.export",
        argv,
        args.nproc,
        lambda: export(
            args.run, args.out, args.dtype, args.batch_size, args.device, args.progress, args.tokens_from, args.append
        ),
    )


if __name__ == "__main__":
    rank_main(cli)
