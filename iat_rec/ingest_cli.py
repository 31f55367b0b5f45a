"""``iat-rec data ingest``: CSV/Parquet + schema -> instance log."""

from __future__ import annotations

import argparse

from iat_rec.ingest import ingest, input_files
from iat_rec.instance_log import check_log_out
from iat_rec.schema import load_schema


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="iat-rec data ingest", description=__doc__)
    p.add_argument("--input", required=True,
                   help="a .csv or .parquet file, a directory of them, a glob ('logs/day-*.parquet') or a file:// URL")
    p.add_argument("--schema", required=True, help="schema YAML (see iat_rec/schema.py)")
    p.add_argument("--out", required=True, help="instance log directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing instance log at --out")
    args = p.parse_args(argv)
    check_log_out(args.out, args.overwrite, (*input_files(args.input), args.schema))
    log = ingest(args.input, load_schema(args.schema), args.out)
    print(f"wrote {log.path}: {log.rows} instances, {log.users} users, fingerprint {log.fingerprint}")
    return 0
