"""``iat-rec plan``: what sharding plan TorchRec would pick for a cluster that need not exist.

The tables are built on the meta device (shapes and dtypes, no memory) and planned for
``--world-size`` hypothetical GPUs with ``--hbm-gb`` each, so a 10^10-row token table on
512 GPUs plans on a laptop. Feature tables are planned at module path ``features``
(one ``t_<feature>`` table per sparse feature) and the token table at ``tokens``.

``--json`` prints one object (schema version 1)::

    format, version                 "iat-rec-plan-report", 1
    inputs                          {schema_source, dim, token_rows, token_dim, token_dtype,
                                     history_len, batch_size, constraints}
    topology                        {world_size, local_world_size, compute_device,
                                     hbm_bytes_per_rank, ddr_bytes_per_rank, hbm_bytes_total,
                                     ddr_bytes_total, ddr_source: given|torchrec_default}
    tables[]                        {name, module, rows, dim, dtype, bytes, sharding_type,
                                     compute_kernel, ranks[], num_shards, cache_load_factor}
    per_rank                        {hbm_bytes[], ddr_bytes[]}   table weights (+ UVM cache)
    summary                         {hbm_bytes, ddr_bytes}: {min, max, mean}
    estimate                        planner model: {perf_ms (slowest rank, per step),
                                     rank_perf_ms {min,max,mean}, table_perf_ms {table: ms},
                                     hbm_bytes, ddr_bytes ({min,max,mean}, incl. optimizer,
                                     IO buffers, cache state), num_proposals, num_plans,
                                     planning_seconds}
    stats_text                      the planner's own stats table (EmbeddingStats)
    plan_file                       where --save wrote the plan, or null
"""

from __future__ import annotations

import argparse
import json
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml
from torchrec.distributed.planner.constants import DDR_CAP

from iat_rec.data.schema import Schema, load_schema
from iat_rec.dist.atomic import read_json
from iat_rec.errors import IatError
from iat_rec.sharding.constraints import parse_constraints
from iat_rec.sharding.describe import describe_plan
from iat_rec.sharding.plan_json import save_plan
from iat_rec.sharding.planning import make_plan_with_stats, quiet_planner_logs
from iat_rec.sharding.topology import GB, build_topology
from iat_rec.tables import TOKEN_DTYPES, TOKEN_TABLE, build_tables_module, feature_table_configs, token_table_config

REPORT_FORMAT = "iat-rec-plan-report"
REPORT_VERSION = 1


def cli(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help or a usage error, already printed
        return int(e.code or 0)
    report = run(args)  # an IatError is the command line's one error line, exit 2
    if args.json:
        json.dump(report, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_report(report, show_stats=not args.no_stats))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iat-rec plan",
        description="Plan the sharding of the feature tables and the token table for hypothetical GPUs.",
    )
    src = p.add_mutually_exclusive_group()  # neither: the token table alone (--token-rows)
    src.add_argument("--schema", help="schema YAML (the demo's: iat_rec/configs/demo_schema.yaml)")
    src.add_argument("--data", help="instance-log directory (its manifest.json has the schema and row count)")
    p.add_argument("--world-size", type=int, required=True, help="number of GPUs (ranks)")
    p.add_argument("--local-world-size", type=int, required=True, help="GPUs per host")
    p.add_argument("--hbm-gb", type=float, required=True, help="HBM per GPU in GB (1024^3 bytes), e.g. 80")
    p.add_argument("--ddr-gb", type=float, help="host memory per rank in GB (default: TorchRec's 128)")
    p.add_argument("--dim", type=int, default=64, help="feature embedding dim (default 64)")
    p.add_argument(
        "--token-rows",
        type=_count,
        help="token table rows, e.g. 1e10 (default: the log's row count with --data, else no token table; 0: none)",
    )
    p.add_argument("--token-dim", type=int, default=64, help="token dim (default 64)")
    p.add_argument("--token-dtype", choices=sorted(TOKEN_DTYPES), default="fp32", help="default fp32")
    p.add_argument(
        "--history-len",
        type=int,
        default=256,
        help="tokens looked up per sample, the token table's pooling factor for the estimates (default 256)",
    )
    p.add_argument("--batch-size", type=int, default=8192, help="batch size per rank (default 8192)")
    p.add_argument(
        "--constraints", help="JSON object or a JSON/YAML file: table -> {sharding_types, compute_kernels, ...}"
    )
    p.add_argument(
        "--save",
        metavar="PLAN.json",
        help="also write the plan as JSON (load with iat_rec.sharding.plan_json.load_plan)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON (schema in the module docstring)")
    p.add_argument("--no-stats", action="store_true", help="leave the planner's stats table out of the text report")
    return p


def _count(s: str) -> int:
    """An integer that may be written like 1e10."""
    try:
        d = Decimal(s)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if d != d.to_integral_value() or d < 0:
        raise argparse.ArgumentTypeError(f"not a whole number >= 0: {s!r}")
    return int(d)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Builds the tables, plans them and returns the report (the --json object)."""
    schema, source, log_rows = _load_inputs(args)
    if args.dim < 1 or args.batch_size < 1 or args.history_len < 1:
        raise IatError("--dim, --batch-size and --history-len must be >= 1")
    token_rows = args.token_rows if args.token_rows is not None else log_rows
    features = feature_table_configs(schema, args.dim) if schema is not None else []
    token = token_table_config(token_rows, args.token_dim, args.token_dtype) if token_rows else None
    spec = _constraints_spec(args.constraints)
    if token is not None and isinstance(spec.get(TOKEN_TABLE, {}), dict):
        # The estimates should see T lookups per sample, not TorchRec's default of 1.
        spec.setdefault(TOKEN_TABLE, {}).setdefault("pooling_factors", [float(args.history_len)])
    constraints = parse_constraints(spec)
    # Hypothetical hosts: never this machine's memory; TorchRec's 128 GB unless told.
    ddr_gb = args.ddr_gb if args.ddr_gb is not None else DDR_CAP / GB
    topology = build_topology(args.world_size, args.local_world_size, "cuda", args.hbm_gb, ddr_gb)
    module = build_tables_module(features, token, device="meta")
    with quiet_planner_logs():
        result = make_plan_with_stats(module, topology, args.batch_size, constraints)
    if args.save:
        save_plan(result.plan, args.save)
    tables = features + ([token] if token is not None else [])
    report = describe_plan(result.plan, topology, tables, result)
    report["topology"]["ddr_source"] = "given" if args.ddr_gb is not None else "torchrec_default"
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "inputs": {
            "schema_source": source,
            "dim": args.dim,
            "token_rows": token_rows or 0,
            "token_dim": args.token_dim,
            "token_dtype": args.token_dtype,
            "history_len": args.history_len,
            "batch_size": args.batch_size,
            "constraints": spec,
        },
        **report,
        "stats_text": result.stats_text,
        "plan_file": args.save,
    }


def _load_inputs(args: argparse.Namespace) -> tuple[Schema | None, str | None, int]:
    """The schema, where it came from, and the instance count (0 without --data); no schema
    without --schema and --data (the token table alone)."""
    if not args.schema and not args.data:
        if args.token_rows is None:
            raise IatError("without --schema or --data only the token table is planned: give its --token-rows")
        return None, None, 0
    if args.schema:
        return load_schema(args.schema), str(args.schema), 0
    mf = Path(args.data) / "manifest.json"
    manifest = read_json(mf, f"{args.data}: not an instance log (no manifest.json)")
    if "schema" not in manifest:
        raise IatError(f"{mf}: no 'schema' key")
    return Schema.from_dict(manifest["schema"], source=str(mf)), str(mf), int(manifest.get("rows") or 0)


def _constraints_spec(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    if text.lstrip().startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise IatError(f"--constraints: not valid JSON: {e}") from None
    else:
        path = Path(text)
        if not path.is_file():
            raise IatError(f"--constraints: neither a JSON object nor a file: {text}")
        try:
            spec = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
        except yaml.YAMLError as e:
            raise IatError(f"{path}: not valid JSON/YAML: {e}") from None
    if not isinstance(spec, dict):
        raise IatError("--constraints: expected an object of table name -> constraints")
    return spec


# ---------------------------------------------------------------------------------------
# Text report


def format_report(r: dict[str, Any], show_stats: bool = True) -> str:
    t = r["topology"]
    ddr_note = {"given": "", "host": " (this host)", "torchrec_default": " (TorchRec default; set --ddr-gb)"}
    lines = [
        f"Plan for {t['world_size']} {t['compute_device']} ranks "
        f"({t['world_size'] // t['local_world_size']} hosts x {t['local_world_size']}), "
        f"HBM {_gb(t['hbm_bytes_per_rank'])}/rank, DDR {_gb(t['ddr_bytes_per_rank'])}/rank"
        f"{ddr_note.get(t.get('ddr_source', 'given'), '')}, batch {r['inputs']['batch_size']}/rank",
        "",
    ]
    header = ["table", "rows", "dim", "dtype", "size", "sharding", "kernel", "ranks"]
    body = [
        [
            x["name"],
            f"{x['rows']:,}",
            str(x["dim"]),
            x["dtype"],
            _gb(x["bytes"]),
            x["sharding_type"],
            x["compute_kernel"] + (f" (cache {x['cache_load_factor']:g})" if x["cache_load_factor"] else ""),
            _ranges(x["ranks"]),
        ]
        for x in r["tables"]
    ]
    lines += _table(header, body, right={1, 2, 4})
    lines += ["", "per-rank memory, table weights (+ UVM cache in HBM):"]
    mem = [[k.upper()] + [_gb(r["summary"][f"{k}_bytes"][s]) for s in ("min", "max", "mean")] for k in ("hbm", "ddr")]
    lines += _table(["", "min", "max", "mean"], mem, right={1, 2, 3}, indent="  ")
    e = r.get("estimate")
    if e:
        lines += [
            "",
            f"planner estimate (weights + optimizer + IO buffers + cache state): "
            f"HBM max {_gb(e['hbm_bytes']['max'])}, DDR max {_gb(e['ddr_bytes']['max'])} per rank",
            f"estimated sparse time per step: {e['perf_ms']:.2f} ms on the slowest rank "
            f"(mean rank {e['rank_perf_ms']['mean']:.2f} ms; TorchRec planner model)",
            f"planning took {e['planning_seconds']:.2f} s ({e['num_proposals']} proposals, {e['num_plans']} plans)",
        ]
    if r.get("plan_file"):
        lines += [f"plan written to {r['plan_file']}"]
    if show_stats and r.get("stats_text"):
        lines += ["", "planner stats:", r["stats_text"]]
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list[str]], right: set[int] = frozenset(), indent: str = "") -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def fmt(row: list[str]) -> str:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return (indent + "  ".join(cells)).rstrip()

    return [fmt(header)] + [fmt(row) for row in rows]


def _ranges(ranks: list[int]) -> str:
    """[0,1,2,3,8] -> '0-3,8'; a long list is cut after a few runs."""
    runs: list[str] = []
    xs = sorted(set(ranks))
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        runs.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(runs) if len(runs) <= 6 else ",".join(runs[:6]) + f",... ({len(xs)} ranks)"


def _gb(n: float) -> str:
    return f"{n / GB:,.1f} GB"


if __name__ == "__main__":
    sys.exit(cli())
