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
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner.types import ParameterConstraints

from iat_rec.dist import checkpoint as ckpt
from iat_rec.dist.atomic import check_out, write_json
from iat_rec.batching.batch import make_batch
from iat_rec.dist.env import init_distributed, rank_main, run_ranks
from iat_rec.errors import IatError
from iat_rec.sharding.planning import build_topology, load_plan, make_plan
from iat_rec.tables import TOKENS_PATH
from iat_rec.tokens.health import format_health, table_health
from iat_rec.tokens.table import FORMAT as TABLE_FORMAT
from iat_rec.tokens.table import SIDE_ARRAYS, WEIGHT_KEY, TokenTable, save_table, token_collection, token_constraints
from pipelines.compress import build_compressor, first_train_step, load_stage1
from iat_rec.train.trainer import progress_bar, shard


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


TOKENS_FROM = ("time-consistent", "final", "initial")


def token_sources(run: str | Path, cfg, info: dict, log, mode: str) -> tuple[list[Path], np.ndarray]:
    """(model weights to load, index into them per row) for ``--tokens-from``.

    * ``time-consistent``: a row the compressor trained on gets its token from the last
      snapshot taken *before* its training step, so its token never saw its own label nor
      anything later (the streaming semantics: a production source model encodes an
      instance when it is logged, before learning from its label). Valid/test rows, never
      trained on, get the final model's token.
    * ``final``: every row from the final checkpoint. Training rows' tokens then come from a
      model fitted on their own labels (and on the future of their users): the label-leak
      gap of the token-health report measures it.
    * ``initial``: every row from the untrained model (the step-0 snapshot): the ablation
      that shows what training the compressor adds.
    """
    if mode not in TOKENS_FROM:
        raise IatError(f"--tokens-from must be one of {list(TOKENS_FROM)}, not '{mode}'")
    final = ckpt.latest(run)
    if final is None:
        raise IatError(f"{run}: no checkpoint to export from")
    if mode == "final":
        return [final], np.zeros(log.rows, dtype=np.int64)
    snaps = sorted(Path(run).glob("snapshots/step_*"))
    steps = np.array([int(p.name.split("_")[1]) for p in snaps], dtype=np.int64)
    if not len(steps) or steps[0] != 0:
        raise IatError(f"{run}: no model snapshots (stage 1 ran with --slices 0?): --tokens-from {mode} needs them; use --tokens-from final")
    if mode == "initial":
        return [snaps[0]], np.zeros(log.rows, dtype=np.int64)
    first = first_train_step(log, cfg, info["world_size"], (info.get("resume_from") or {}).get("train_until"))
    source = np.full(log.rows, len(snaps), dtype=np.int64)  # the final model
    trained = first >= 0
    # the snapshot at step c has trained on steps 0..c-1: the last one with c <= the row's step
    source[trained] = np.searchsorted(steps, first[trained], side="right") - 1
    return snaps + [final], source


def copy_rows(old: TokenTable, kept: np.ndarray, blocks) -> None:
    """Writes row i of ``old`` into row ``kept[i]`` of this rank's shards, bytes unchanged."""
    src = old.read_rows(0, old.rows)
    for r0, n, cols in blocks:
        lo, hi = np.searchsorted(kept, [r0, r0 + n])  # kept is ascending
        at = torch.from_numpy(kept[lo:hi] - r0)
        for c0, shard_t in cols:
            shard_t[at.to(shard_t.device)] = src[lo:hi, c0 : c0 + shard_t.shape[1]].to(shard_t.device)


def local_stats(weight, dim: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std over every row of a (sharded) table: collective."""
    acc = torch.zeros(3, dim, dtype=torch.float64, device=device)  # count, sum, sum of squares
    for _, n, cols in local_row_blocks(weight):
        for c0, t in cols:
            x = t.double()
            acc[0, c0 : c0 + t.shape[1]] += n
            acc[1, c0 : c0 + t.shape[1]] += x.sum(0)
            acc[2, c0 : c0 + t.shape[1]] += (x * x).sum(0)
    dist.all_reduce(acc)
    mean = acc[1] / acc[0].clamp(min=1)
    std = (acc[2] / acc[0].clamp(min=1) - mean**2).clamp(min=0).sqrt()
    return mean.cpu().numpy(), std.cpu().numpy()


def gather_rows(weight, rows: np.ndarray, dim: int, device: torch.device) -> np.ndarray:
    """Rows ``rows`` of a (sharded, never replicated) table on every rank: collective."""
    out = torch.zeros(len(rows), dim, dtype=torch.float32, device=device)
    for r0, n, cols in local_row_blocks(weight):
        mine = np.flatnonzero((rows >= r0) & (rows < r0 + n))
        at = torch.from_numpy(mine).to(device)
        local = torch.from_numpy(rows[mine] - r0).to(device)
        for c0, t in cols:
            out[at, c0 : c0 + t.shape[1]] = t[local].float()
    dist.all_reduce(out)
    return out.cpu().numpy()


def check_resumed(run: str, info: dict, tokens_from: str, append: str) -> None:
    """A stage-1 run continued from another (--resume-from) starts from a model that trained on
    the earlier rows' labels: only the rows appended since get time-consistent tokens from it
    (--append to the table of the run it continued), and it has no untrained model."""
    resumed = info.get("resume_from") or {}
    if not resumed:
        if append:
            raise IatError(f"--append needs a stage-1 run continued (compress --resume-from) from the run that made {append}; {run} was not")
        return
    if tokens_from == "initial":
        raise IatError(f"--tokens-from initial: {run} continued {resumed['run']}, so its first model is trained; export from a fresh run")
    if tokens_from == "time-consistent" and not append:
        raise IatError(f"{run} continued {resumed['run']}: its models trained on the earlier rows' labels, so only the rows appended "
                       f"since get time-consistent tokens: --append the table exported from {resumed['run']} (or --tokens-from final)")
    if append:
        m = TokenTable(append).manifest
        made = (m.get("source_run"), m.get("source_checkpoint"), m.get("log_fingerprint"))
        if made != (resumed["run"], resumed["checkpoint"], resumed["log_fingerprint"]):
            raise IatError(f"--append {append} was made by {made[0]} ({made[1]}) on log {made[2]}, but {run} continued {resumed['run']} "
                           f"({resumed['checkpoint']}) on log {resumed['log_fingerprint']}: append to the table of the run it continued")


def check_append(old: TokenTable, log, dim: int, dtype: str) -> np.ndarray:
    """The rows of ``log`` that ``old`` (a table of an earlier version of it) already holds, in
    its row order; refuses a table of another log, dim or dtype."""
    fingerprint = old.manifest["log_fingerprint"]
    version = log.version_index(fingerprint)
    if version == len(log.segments) - 1:
        raise IatError(f"--append {old.path} is a table of {log.path} itself: nothing was appended since")
    if (old.dim, old.dtype) != (dim, dtype):
        raise IatError(f"--append {old.path} holds dim {old.dim} {old.dtype} tokens; this export writes dim {dim} {dtype}")
    rows = log.rows_of_version(fingerprint)
    if len(rows) != old.rows:
        raise IatError(f"--append {old.path}: {old.rows} rows, but version {fingerprint} of {log.path} has {len(rows)}")
    return rows


def export(run: str, out: str, dtype: str = "fp32", batch_size: int = 4096, device: str = "auto", progress: bool = True,
           tokens_from: str = "time-consistent", append: str = "") -> Path:
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
            batches += [(at[i : i + batch_size] + r0, at[i : i + batch_size], cols) for i in range(0, len(at), batch_size)]
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
                rows_k, at, cols = plans[k][i] if i < len(plans[k]) else (np.zeros(0, np.int64), np.zeros(0, np.int64), [])
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
    source = hashlib.blake2b((Path(run) / "run.json").read_bytes() + final.name.encode() + tokens_from.encode(), digest_size=16).hexdigest()
    segment = {"rows": int((source_of_row >= 0).sum()), "source_run": str(Path(run).resolve()), "source_checkpoint": final.name,
               "tokens_from": tokens_from, "log_fingerprint": log.fingerprint}  # fmt: skip
    earlier = (old.manifest.get("segments") or [{k: old.manifest.get(k) for k in segment} | {"rows": old.rows}]) if old else []
    manifest = {
        "dim": cfg.model.iat_dim,
        "table_version": (old.manifest.get("table_version", 1) + 1) if old else 1,
        "segments": [*earlier, segment],  # per segment of rows: the model that encoded them
        "dtype": dtype,
        "rows": log.rows,
        "scheme": cfg.scheme,
        "tokens_from": tokens_from,
        "sources": {p.parent.name + "/" + p.name: int((source_of_row == k).sum()) for k, p in enumerate(sources)},  # rows encoded here
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
            print(f"appended {segment['rows']} rows to {len(kept)} rows of {old.path} (table version {manifest['table_version']})", flush=True)
        print(f"token table {path}: {log.rows} rows x {cfg.model.iat_dim} {dtype}, tokens from {tokens_from} "
              f"({len(sources)} model(s), final {final.name})\n{format_health(health)}", flush=True)  # fmt: skip
    dist.barrier()
    return path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iat-rec export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --stage1 first: torchrun's parser (torchx jobs) refuses --run as an abbreviation of its --run-path
    p.add_argument("--stage1", "--run", dest="run", required=True, help="stage-1 run directory")
    p.add_argument("--out", required=True, help="token table directory to write")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--tokens-from", choices=TOKENS_FROM, default="time-consistent",
                   help="which model encodes each row (default time-consistent: a training row's token comes from "
                        "the last snapshot before its training step; final: the last checkpoint for every row; "
                        "initial: the untrained model)")  # fmt: skip
    p.add_argument("--append", default="", metavar="OLD_TOKENS",
                   help="a token table of an earlier version of the run's log (iat-rec data append): encode only the rows "
                        "appended since and keep every old row's bytes")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--nproc", type=int, default=None, help="local ranks to launch (default: GPUs, else 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing token table at --out")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def cli(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    cfg, info, log = load_stage1(args.run)  # clear errors before any rank starts
    log.check_files()
    check_resumed(args.run, info, args.tokens_from, args.append)
    check_out(args.out, "a token table", {TABLE_FORMAT}, "manifest.json", args.overwrite, (args.run, log.path, *([args.append] if args.append else [])))
    if args.append:
        old = TokenTable(args.append)
        old.check_files()
        check_append(old, log, cfg.model.iat_dim, args.dtype)
    return run_ranks(
        "pipelines.export", argv, args.nproc,
        lambda: export(args.run, args.out, args.dtype, args.batch_size, args.device, args.progress, args.tokens_from, args.append),
    )  # fmt: skip


if __name__ == "__main__":
    rank_main(cli)
