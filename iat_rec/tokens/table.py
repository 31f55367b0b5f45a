"""The token table: row i = the instance token of instance i, a sharded TorchRec table.

A token-table directory::

    manifest.json   format, version, dim, dtype, rows, scheme, which models encoded the rows
                    (``tokens_from``, ``sources``), per-dimension mean/std (``token_stats``),
                    the token-health report (``health``), source-run and log fingerprints
    table/          torch.distributed.checkpoint of the EmbeddingCollection's state dict
                    (key ``embeddings.iat_tokens.weight``), loadable on any number of ranks
    ts.npy user_offsets.npy user_keys.npy labels.npy label_time.npy
                    the source log's history index and per-instance side info, so stage 2
                    can fetch histories for requests of another log (cross-domain); their
                    sizes and checksums are in the manifest (``files``), checked when read

    iat-rec tokens show TOKENS --rows 0:5
    iat-rec tokens show TOKENS --health
"""

from __future__ import annotations

import argparse
import json
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.modules.embedding_configs import data_type_to_dtype
from torchrec.modules.embedding_modules import EmbeddingCollection

from iat_rec.batching.history import HistoryIndex
from iat_rec.dist import checksums
from iat_rec.dist.atomic import collective_atomic_dir, read_manifest, write_json
from iat_rec.dist.checkpoint import dcp_load, read_metadata
from iat_rec.errors import IatError
from iat_rec.tables import TOKEN_DTYPES, TOKEN_TABLE, frozen_collection, token_table_config

FORMAT = "iat-token-table"
VERSION = 3  # 2: token_stats, tokens_from and health in the manifest; 3: side arrays' sizes and checksums
WEIGHT_KEY = f"embeddings.{TOKEN_TABLE}.weight"
SIDE_ARRAYS = ("ts", "user_offsets", "user_keys", "labels", "label_time")


def token_constraints(device_type: str) -> dict[str, ParameterConstraints]:
    """Never replicate the token table; row-wise on GPU (TorchRec has no row-wise on CPU)."""
    types = ["row_wise", "table_row_wise"] if device_type == "cuda" else ["table_wise", "column_wise"]
    return {TOKEN_TABLE: ParameterConstraints(sharding_types=types)}


def token_collection(rows: int, dim: int, dtype: str, device: torch.device | str = "meta") -> EmbeddingCollection:
    return frozen_collection(token_table_config(rows, dim, dtype), device)


class TokenTable:
    """A token-table directory: its manifest, history index and side info (read-only)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(
            self.path, "manifest.json", "a token table", FORMAT, VERSION, "export it again with this version"
        )
        if not (self.path / "table" / ".metadata").is_file():
            raise IatError(f"{self.path}/table: missing or incomplete checkpoint (.metadata absent)")
        self.rows: int = int(self.manifest["rows"])
        self.dim: int = int(self.manifest["dim"])
        self.dtype: str = self.manifest["dtype"]
        self._check_shape()

    def _check_shape(self) -> None:
        """The manifest's shape is what every user of the table builds on: refuse a table
        whose stored weights disagree (an edited manifest, or files mixed from two tables)."""
        weight = read_metadata(self.path / "table", "token table").state_dict_metadata.get(WEIGHT_KEY)
        shape = tuple(weight.size) if weight is not None else None
        if shape != (self.rows, self.dim):
            held = f"weights of shape {list(shape)}" if shape else "no token weights"
            raise IatError(
                f"{self.path}: manifest.json says {self.rows} rows x dim {self.dim}, but the table holds {held}"
            )

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension (mean, std) of the tokens over every row (stage 2 standardises with them)."""
        st = self.manifest.get("token_stats") or {}
        mean, std = (torch.tensor(st.get(k, []), dtype=torch.float32) for k in ("mean", "std"))
        if mean.shape != (self.dim,) or std.shape != (self.dim,):
            raise IatError(f"{self.path}/manifest.json: token_stats needs mean and std of {self.dim} values")
        return mean, std

    def check_files(self) -> None:
        """Every side array against the manifest (size, checksum)."""
        for name in SIDE_ARRAYS:
            checksums.check(self.path / f"{name}.npy", self.manifest)

    def side(self, name: str) -> np.ndarray:
        f = self.path / f"{name}.npy"
        checksums.check(f, self.manifest)
        try:
            return np.load(f, mmap_mode=None if name == "user_keys" else "r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise IatError(f"{f}: missing or corrupt side info: {e}") from None

    @cached_property
    def history(self) -> HistoryIndex:
        return HistoryIndex(self.side("ts"), self.side("user_offsets"), self.side("user_keys"))

    def check_log(self, log) -> None:
        """Refuses a table made from another instance log (its rows would be other instances)."""
        if self.manifest["log_fingerprint"] != log.fingerprint:
            raise IatError(
                f"token table {self.path} was exported from instance log {self.manifest['log_fingerprint']} "
                f"({self.manifest.get('log_path')}), not from {log.path} ({log.fingerprint}): export it again "
                f"from a run on this log"
            )

    def check_dim(self, dim: int) -> None:
        if dim != self.dim:
            raise IatError(f"token table {self.path} has dim {self.dim}, the model expects {dim}")

    def load_into(self, collection: nn.Module) -> None:
        """Loads the table into an EmbeddingCollection (sharded or not): DCP reshards as needed."""
        state = collection.state_dict()
        if WEIGHT_KEY not in state:
            raise IatError(f"the module has no {WEIGHT_KEY} to load the token table into")
        dcp_load({WEIGHT_KEY: state[WEIGHT_KEY]}, self.path / "table", what="token table")

    def read_shard(self, start: int, stop: int) -> torch.Tensor:
        """Collective: rows [start, stop) on each rank, read from the DCP files without the rest
        of the table (one local shard of a row-sharded tensor; DCP reads the overlap)."""
        from torch.distributed._shard.sharded_tensor import Shard, ShardMetadata, init_from_local_shards

        if not 0 <= start <= stop <= self.rows:
            raise IatError(f"rows [{start}, {stop}) are not within the {self.rows} rows of {self.path}")
        if not dist.is_initialized():
            return self.read_rows(start, stop)
        local = torch.empty(stop - start, self.dim, dtype=data_type_to_dtype(TOKEN_DTYPES[self.dtype]))
        placement = f"rank:{dist.get_rank()}/cpu"
        shards = [Shard(local, ShardMetadata([start, 0], [stop - start, self.dim], placement))] if stop > start else []
        dcp_load(
            {WEIGHT_KEY: init_from_local_shards(shards, [self.rows, self.dim])}, self.path / "table", "token table"
        )
        return local

    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) in one process (loads the whole table: for inspection and tests)."""
        ec = token_collection(self.rows, self.dim, self.dtype, device="cpu")
        self.load_into(ec)
        return ec.state_dict()[WEIGHT_KEY][start:stop].clone()


def save_table(out: str | Path, collection: nn.Module, manifest: dict, side: dict[str, np.ndarray]) -> Path:
    """Collective: writes the (sharded) table with DCP, rank 0 the rest; renamed at the end."""
    out = Path(out)
    with collective_atomic_dir(out) as tmp:
        state = {WEIGHT_KEY: collection.state_dict()[WEIGHT_KEY]}
        dcp.save(state, checkpoint_id=str(tmp / "table"), no_dist=not dist.is_initialized())
        if not dist.is_initialized() or dist.get_rank() == 0:
            for name in SIDE_ARRAYS:
                np.save(tmp / f"{name}.npy", np.asarray(side[name]))
            files = checksums.digests(tmp, [f"{name}.npy" for name in SIDE_ARRAYS])
            write_json(tmp / "manifest.json", {"format": FORMAT, "version": VERSION, **manifest, "files": files})
    return out


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="iat-rec tokens show", description="print a token table's manifest and rows")
    p.add_argument("tokens", help="token table directory")
    p.add_argument("--rows", default=None, help="row range START:STOP (default 0:5; with --health, rows only if given)")
    p.add_argument(
        "--health",
        action="store_true",
        help="print the token-health report: saturation, dim std, effective rank, own-label probe AUC and leak gap "
        "(the manifest's stored report if fresh, else computed)",
    )
    p.add_argument(
        "--task", default=None, help="with --health: the label (name or column index) to probe (default: the first)"
    )
    args = p.parse_args(argv)
    table = TokenTable(args.tokens)
    if args.task is not None and not args.health:
        raise IatError("--task needs --health")
    if args.rows is not None or not args.health:
        rows_arg = args.rows if args.rows is not None else "0:5"
        try:
            start, stop = (int(x) for x in rows_arg.split(":"))
        except ValueError:
            raise IatError(f"--rows must be START:STOP, got {rows_arg!r}") from None
        if not 0 <= start < stop <= table.rows:
            raise IatError(f"--rows {start}:{stop} outside the table's {table.rows} rows")
        print(json.dumps(table.manifest, indent=2, sort_keys=True))
        rows = table.read_rows(start, stop).float()
        torch.set_printoptions(precision=4, linewidth=120, sci_mode=False)
        for i, r in zip(range(start, stop), rows):
            print(f"row {i}: {r.tolist()[:8]}{' ...' if table.dim > 8 else ''}  |norm| {r.norm():.4f}")
    if args.health:
        from iat_rec.tokens.health import format_health, stored_health, table_health

        task = args.task if args.task is not None else 0
        h = stored_health(table, task=task)
        print(format_health(h if h is not None else table_health(table, task=task)))
        print("  (stored in the manifest)" if h is not None else "  (computed now)")
    return 0
