"""The token table's export as a library: which model encodes each row (time-consistent,
final, initial), the sharded table's row blocks, copies and statistics, and the checks of a
day-by-day append. ``pipelines.export`` is the program.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner.types import ParameterConstraints

from iat_rec.dist import checkpoint as ckpt
from iat_rec.errors import IatError
from iat_rec.sharding.planning import make_plan, without_bounds_check
from iat_rec.sharding.topology import build_topology
from iat_rec.tokens.table import TokenTable, token_collection, token_constraints
from iat_rec.train.stage1 import first_train_step


def shard_token_table(
    rows: int,
    dim: int,
    dtype: str,
    env,
    batch_size: int,
    hbm_gb: float = 0.0,
    constraints: dict[str, ParameterConstraints] | None = None,
    bounds_check: bool = True,
) -> DistributedModelParallel:
    """The token table alone, planned and sharded (frozen: no optimizer ever touches it).
    ``constraints`` replaces ``token_constraints`` (benchmarks try other shardings with it);
    ``bounds_check=False``: FBGEMM's id check off (benchmarks)."""
    holder = nn.Module()
    holder.tokens = token_collection(rows, dim, dtype)
    topology = build_topology(env.world_size, env.local_world_size, env.device.type, hbm_gb=hbm_gb or None)
    plan = make_plan(
        holder, topology, batch_size, constraints or token_constraints(env.device.type), pg=dist.group.WORLD
    )
    return DistributedModelParallel(
        holder, device=env.device, plan=plan if bounds_check else without_bounds_check(plan)
    )


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
        raise IatError(
            f"{run}: no model snapshots (stage 1 ran with --slices 0?): --tokens-from {mode} needs them; "
            "use --tokens-from final"
        )
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
            raise IatError(
                "--append needs a stage-1 run continued (compress --resume-from) from the run that made "
                f"{append}; {run} was not"
            )
        return
    if tokens_from == "initial":
        raise IatError(
            f"--tokens-from initial: {run} continued {resumed['run']}, so its first model is trained; "
            "export from a fresh run"
        )
    if tokens_from == "time-consistent" and not append:
        raise IatError(
            f"{run} continued {resumed['run']}: its models trained on the earlier rows' labels, so only the rows "
            f"appended since get time-consistent tokens: --append the table exported from {resumed['run']} "
            "(or --tokens-from final)"
        )
    if append:
        m = TokenTable(append).manifest
        made = (m.get("source_run"), m.get("source_checkpoint"), m.get("log_fingerprint"))
        if made != (resumed["run"], resumed["checkpoint"], resumed["log_fingerprint"]):
            raise IatError(
                f"--append {append} was made by {made[0]} ({made[1]}) on log {made[2]}, but {run} continued "
                f"{resumed['run']} ({resumed['checkpoint']}) on log {resumed['log_fingerprint']}: append to the "
                "table of the run it continued"
            )


def check_append(old: TokenTable, log, dim: int, dtype: str) -> np.ndarray:
    """The rows of ``log`` that ``old`` (a table of an earlier version of it) already holds, in
    its row order; refuses a table of another log, dim or dtype."""
    fingerprint = old.manifest["log_fingerprint"]
    version = log.version_index(fingerprint)
    if version == len(log.segments) - 1:
        raise IatError(f"--append {old.path} is a table of {log.path} itself: nothing was appended since")
    if (old.dim, old.dtype) != (dim, dtype):
        raise IatError(
            f"--append {old.path} holds dim {old.dim} {old.dtype} tokens; this export writes dim {dim} {dtype}"
        )
    rows = log.rows_of_version(fingerprint)
    if len(rows) != old.rows:
        raise IatError(f"--append {old.path}: {old.rows} rows, but version {fingerprint} of {log.path} has {len(rows)}")
    return rows
