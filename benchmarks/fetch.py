"""Fetch: the frozen token-table lookup of B x T history tokens through TorchRec, in GB/s,
against the copy bandwidth and a plain ``index_select`` on a dense tensor (same ids, same
run); and two ways of getting the ids to the device: a KJT of ids built on the CPU, or only
the (first, length) ranges, expanded on the device.

    iat-rec bench fetch [--batch 8192] [--max-len 256] [--dim 64] [--dtype fp16] [--tile 8]

The history ranges are real: ``HistoryIndex.ranges`` over a synthetic log for B requests
drawn from its last time split. The token table is the export's: ``shard_token_table``
(planned by TorchRec, row-wise on GPU, frozen), randomly initialised. To make the table
outgrow the L2 cache and requests rarely share rows, the log is tiled ``--tile`` times: the
table has ``rows x tile`` rows and request i reads tile ``i % tile`` (as if there were
``tile`` times as many users with the same histories).

Cases (N = total history ids of the batch, about B x mean length):

* ``index_select``: ``weight.index_select(0, ids)`` on a dense [rows, dim] tensor, ids on the
  device: the peer.
* ``fbgemm_index_select``: ``torch.ops.fbgemm.index_select_dim0`` on the same (a row-wise
  gather kernel, where torch's index_select works element by element).
* ``model_ranges``: the model's path with ``--ranker.token_fetch ranges``: the ranker's own
  ``RangeTokenTable`` (``modules.range_gather``; Triton on CUDA) copies each request's
  contiguous block of rows straight into the padded [B, T, dim] tensor the reader consumes,
  from (first, length) on the device; its bytes count the padded output written.
* ``model_sharded_ranges``: the model's path with ``--ranker.token_fetch sharded_ranges``:
  each rank holds one block of rows (``even_bounds``); the ranges are cut at the bounds and
  sent to their owners, and the rows come back by all-to-all (``exchange_ranges``). On one
  rank the all-to-alls are local copies; launched on W ranks (torchrun) it is the cross-GPU
  fetch of a table too large to replicate.
* ``all_to_all``: ``all_to_all_single`` of as many bytes as the rows ``model_sharded_ranges``
  moves, evenly split: the interconnect's bandwidth in the same run (its peer on W ranks).
* ``ec_lookup``: the sharded EmbeddingCollection on a KJT already on the device.
* ``ids_kjt``: a KJT of the N ids built on the CPU (``expand_ranges``, pinned) copied to the
  device (8 N bytes), then looked up; ``cpu_build_ms`` is what the loader pays to build it.
* ``ranges_device``: only (first, length) copied (12 B bytes); ids expanded on the device
  (``asynchronous_complete_cumsum`` + ``repeat_interleave`` + ``arange``), then looked up.

GB/s counts the rows read and the output written: N x dim x (table element + output element).
``--token-sharding`` and ``--output-dtype`` change the TorchRec table (default: the export's
plan, fp32 output) to measure what each costs.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.modules.embedding_configs import DataType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from benchmarks import common
from iat_rec.batching.history import HistoryIndex, expand_ranges
from iat_rec.data.instance_log import time_split
from iat_rec.tables import TOKEN_DTYPES, TOKEN_FEATURE, TOKEN_TABLE
from iat_rec.tokens.export import shard_token_table
from iat_rec.tokens.table import token_constraints
from modules.range_gather import RangeTokenTable, even_bounds, reference


def complete_cumsum(lengths: torch.Tensor) -> torch.Tensor:
    """[0, l0, l0 + l1, ...]: fbgemm's kernel (no host sync), else torch."""
    try:
        return torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
    except (AttributeError, RuntimeError):
        return torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0))


def expand_on_device(first: torch.Tensor, length: torch.Tensor, total: int) -> torch.Tensor:
    """The concatenated ranges [first_i, first_i + length_i) as int64 ids, on first's device.
    ``total`` (= length.sum(), known on the host) keeps repeat_interleave free of a sync."""
    length = length.long()
    start = first - complete_cumsum(length)[:-1]
    return torch.repeat_interleave(start, length, output_size=total) + torch.arange(total, device=first.device)


def ranges_kjt(first: torch.Tensor, length: torch.Tensor, total: int) -> KeyedJaggedTensor:
    ids = expand_on_device(first, length, total)
    return KeyedJaggedTensor(keys=[TOKEN_FEATURE], values=ids, lengths=length, stride=int(length.numel()))


def ids_kjt(first: np.ndarray, length: np.ndarray) -> KeyedJaggedTensor:
    """What the stage-2 batch maker builds on the CPU (Stage2BatchMaker.history_ids)."""
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[TOKEN_FEATURE],
        values=torch.from_numpy(expand_ranges(first, length)),
        lengths=torch.from_numpy(length.astype(np.int32)),
    )


def table_constraints(args, device: torch.device) -> dict[str, ParameterConstraints] | None:
    """The token table's constraints with --token-sharding / --output-dtype applied; None = the export's."""
    if args.token_sharding is None and args.output_dtype is None:
        return None
    types = (
        [args.token_sharding]
        if args.token_sharding
        else list(token_constraints(device.type)[TOKEN_TABLE].sharding_types)
    )
    out_dtype = {"fp16": DataType.FP16, "fp32": DataType.FP32, None: None}[args.output_dtype]
    return {TOKEN_TABLE: ParameterConstraints(sharding_types=types, output_dtype=out_dtype)}


def request_ranges(
    log, batch: int, max_len: int, tile: int, count: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` batches of (first, length) for requests drawn from the log's last time split."""
    index = HistoryIndex.from_log(log)
    test = time_split(log)["test"]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        rows = rng.choice(test, batch)
        first, length = index.ranges(np.asarray(log.user)[rows], np.asarray(log.ts)[rows], max_len)
        first = first + (np.arange(batch) % tile) * log.rows
        out.append((first.astype(np.int64), length.astype(np.int64)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser("fetch", __doc__)
    p.add_argument("--batch", type=int, default=None, help="requests per step B (default 8192; tiny 32)")
    p.add_argument("--max-len", type=int, default=None, help="history length T (default 256; tiny 16)")
    p.add_argument("--dim", type=int, default=64, help="token dim (default 64)")
    p.add_argument("--dtype", default="fp16", choices=sorted(TOKEN_DTYPES), help="token table dtype")
    p.add_argument("--tile", type=int, default=None, help="table = log rows x tile (default 8; tiny 2)")
    p.add_argument("--users", type=int, default=None, help="synthetic users (default 4000; tiny 60)")
    p.add_argument("--mean-instances", type=float, default=None, help="per user (default 300; tiny 40)")
    p.add_argument(
        "--token-sharding",
        default=None,
        choices=["row_wise", "table_wise"],
        help="the table's sharding (default: the export's constraints, row-wise on GPU)",
    )
    p.add_argument(
        "--output-dtype",
        default=None,
        choices=sorted(TOKEN_DTYPES),
        help="the EmbeddingCollection's output dtype (default: TorchRec's, fp32)",
    )
    args = p.parse_args(argv)
    with common.bench_run("fetch", args, warmup=(2, 10)) as run, common.dist_env(run.device) as env:
        tiny, dev = run.tiny, run.device
        batch = common.pick(args.batch, tiny, 32, 8192)
        max_len = common.pick(args.max_len, tiny, 16, 256)
        tile = common.pick(args.tile, tiny, 2, 8)
        users = common.pick(args.users, tiny, 60, 4000)
        mean = common.pick(args.mean_instances, tiny, 40, 300)
        log = common.synth_log(run, "fetch", users, mean)
        ranges = request_ranges(log, batch, max_len, tile, count=4, seed=args.seed)
        rows_total = log.rows * tile
        table = shard_token_table(
            rows_total,
            args.dim,
            args.dtype,
            env,
            batch,
            constraints=table_constraints(args, run.device),
            bounds_check=False,
        )
        tokens = table.module.tokens
        plan = common.plan_summary(table.plan)
        wdtype = torch.float16 if args.dtype == "fp16" else torch.float32
        dense = torch.empty(rows_total, args.dim, dtype=wdtype, device=dev).uniform_(-1, 1)

        # inputs of every case, built before timing
        t0 = time.perf_counter()
        cpu_kjts = [ids_kjt(f, ln) for f, ln in ranges]
        cpu_build_ms = (time.perf_counter() - t0) * 1e3 / len(ranges)
        if run.cuda:
            cpu_kjts = [k.pin_memory() for k in cpu_kjts]
        dev_kjts = [k.to(dev) for k in cpu_kjts]
        dev_ids = [k.values() for k in dev_kjts]
        host_ranges = [(torch.from_numpy(f), torch.from_numpy(ln.astype(np.int32)), int(ln.sum())) for f, ln in ranges]
        if run.cuda:
            host_ranges = [(f.pin_memory(), ln.pin_memory(), n) for f, ln, n in host_ranges]
        totals = [n for _, _, n in host_ranges]
        n_ids = sum(totals) / len(totals)

        ids_match = all(
            torch.equal(expand_on_device(f.to(dev), ln.to(dev), n).cpu(), k.values().cpu())
            for (f, ln, n), k in zip(host_ranges, cpu_kjts)
        )
        with torch.no_grad():
            out_elem = tokens(dev_kjts[0])[TOKEN_FEATURE].values().element_size()
        state = {"i": 0}

        def nxt() -> int:
            state["i"] = (state["i"] + 1) % len(ranges)
            return state["i"]

        def lookup(kjt: KeyedJaggedTensor) -> torch.Tensor:
            return tokens(kjt)[TOKEN_FEATURE].values()

        def case_index_select():
            dense.index_select(0, dev_ids[nxt()])

        def case_fbgemm_index_select():
            torch.ops.fbgemm.index_select_dim0(dense, dev_ids[nxt()], skip_indices_sorting_fwd=True)

        dev_ranges = [(f.to(dev), ln.to(dev)) for f, ln, _ in host_ranges]
        model_rows = RangeTokenTable(args.dim, wdtype).to(dev)
        model_rows.load(dense)
        bounds = even_bounds(rows_total, env.world_size)
        sharded_rows = RangeTokenTable(args.dim, wdtype, sharded=True).to(dev)
        sharded_rows.load(dense[bounds[env.rank] : bounds[env.rank + 1]], bounds)
        a2a_rows = -(-int(n_ids) // env.world_size) * env.world_size
        a2a_in = torch.empty(a2a_rows, args.dim, dtype=wdtype, device=dev)
        a2a_out = torch.empty_like(a2a_in)

        def case_model_sharded_ranges():
            f, ln = dev_ranges[nxt()]
            sharded_rows(f, ln, max_len)

        def case_all_to_all():
            dist.all_to_all_single(a2a_out, a2a_in)

        def case_model_ranges():
            f, ln = dev_ranges[nxt()]
            model_rows(f, ln, max_len)

        def case_ec():
            lookup(dev_kjts[nxt()])

        def case_ids():
            lookup(cpu_kjts[nxt()].to(dev, non_blocking=True))

        def case_ranges():
            f, ln, n = host_ranges[nxt()]
            lookup(ranges_kjt(f.to(dev, non_blocking=True), ln.to(dev, non_blocking=True), n))

        elem = dense.element_size()
        f, ln = dev_ranges[0]
        gather_ok = torch.equal(model_rows(f, ln, max_len), reference(dense, f, ln, max_len))
        sharded_ok = torch.equal(sharded_rows(f, ln, max_len), reference(dense, f, ln, max_len))
        cases = (
            ("index_select", case_index_select, elem, 0, 0.0),
            ("fbgemm_index_select", case_fbgemm_index_select, elem, 0, 0.0),
            ("model_ranges", case_model_ranges, elem, 0, 0.0),
            ("model_sharded_ranges", case_model_sharded_ranges, elem, 0, 0.0),
            ("all_to_all", case_all_to_all, elem, 0, 0.0),
            ("ec_lookup", case_ec, out_elem, 0, 0.0),
            ("ids_kjt", case_ids, out_elem, 8 * n_ids + 4 * batch, cpu_build_ms),
            ("ranges_device", case_ranges, out_elem, 12 * batch, 0.0),
        )
        rows: list[dict[str, Any]] = []
        with torch.no_grad():
            for name, fn, oelem, h2d, cpu_ms in cases:
                common.reset_peak_memory(dev)
                t = common.time_fn(fn, dev, run.warmup, run.iters)
                common.profile_case(run, name, fn)
                nbytes = n_ids * args.dim * (elem + oelem)
                if name in ("model_ranges", "model_sharded_ranges"):  # rows read + the padded output written
                    nbytes = n_ids * args.dim * elem + batch * max_len * args.dim * oelem
                if name == "all_to_all":  # each row sent and received once
                    nbytes = 2 * a2a_rows * args.dim * elem
                gbs = nbytes / (t.median_ms * 1e-3) / 1e9
                rows.append(
                    common.row(
                        name,
                        t,
                        batch,
                        common.peak_memory_bytes(dev),
                        ids_per_step=n_ids,
                        tokens_per_s=n_ids / (t.median_ms * 1e-3),
                        bytes_per_step=nbytes,
                        gbs=gbs,
                        copy_ratio=common.ratio(gbs, run.limits["copy_gbs"]),
                        h2d_bytes_per_step=h2d,
                        cpu_build_ms=cpu_ms,
                    )
                )
        by = {r["case"]: r for r in rows}
        for r in rows:
            r["index_select_ratio"] = common.ratio(r["gbs"], by["index_select"]["gbs"])
        config = {
            "batch": batch,
            "max_len": max_len,
            "dim": args.dim,
            "dtype": args.dtype,
            "tile": tile,
            "log_rows": log.rows,
            "users": users,
            "table_rows": rows_total,
            "table_bytes": rows_total * args.dim * elem,
            "mean_history_len": n_ids / batch,
            "output_element_bytes": out_elem,
            "plan": plan,
            "ids_match": ids_match,
            "token_sharding": args.token_sharding,
            "output_dtype": args.output_dtype,
            "model_ranges_matches": gather_ok,
            "model_sharded_ranges_matches": sharded_ok,
            "world_size": env.world_size,
        }
        moved = n_ids * args.dim * elem  # token bytes a sharded fetch moves: the rows, once

        def gbs(metric: str, case: str, vs: str = "copy bandwidth", key: str = "copy_ratio", target: str | None = None):
            return common.summary_item(run, metric, by[case]["gbs"], "GB/s", vs, by[case][key], target)

        sharded_ms = by["model_sharded_ranges"]["ms_per_step"]
        summary = [
            common.summary_item(
                run,
                f"sharded range fetch on {env.world_size} rank(s), token bytes/s",
                moved / (sharded_ms * 1e-3) / 1e9,
                "GB/s",
                "all-to-all of the same bytes",
                common.ratio(by["all_to_all"]["ms_per_step"], sharded_ms),
            ),
            gbs("token fetch in the model's path (ranges)", "model_ranges", target="fetch_copy_ratio_model_path"),
            gbs("token fetch (ec_lookup)", "ec_lookup", target="fetch_copy_ratio"),
            gbs("token fetch vs index_select", "ec_lookup", "index_select", "index_select_ratio"),
            gbs("index_select", "index_select"),
            common.versus(run, "ranges on device vs ids KJT", by, "ranges_device", "ids_kjt"),
        ]
        columns = common.DEFAULT_COLUMNS + (
            ("GB/s", "gbs", ""),
            ("vs copy", "copy_ratio", "x"),
            ("vs index_select", "index_select_ratio", "x"),
            ("H2D", "h2d_bytes_per_step", "bytes"),
            ("cpu build ms", "cpu_build_ms", ""),
        )
        notes = [] if ids_match else ["ranges expanded on the device differ from expand_ranges: a bug"]
        if not gather_ok:
            notes.append("model_ranges differs from its torch reference: a bug")
        if not sharded_ok:
            notes.append("model_sharded_ranges differs from the whole table's reference: a bug")
        common.finish(run, config, rows, summary, columns, notes=notes)
        table = tokens = dense = model_rows = None  # the cases hold them: release before free()
    return 0


if __name__ == "__main__":
    common.main_guard(main)
