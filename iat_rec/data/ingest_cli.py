"""``iat-rec data ingest``: CSV/Parquet + schema -> instance log; ``iat-rec data append``: a later segment -> its next
version."""

from __future__ import annotations

import argparse

from iat_rec.data.ingest import append, ingest, input_files
from iat_rec.data.instance_log import InstanceLog, check_log_out
from iat_rec.data.schema import load_schema


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="iat-rec data ingest", description=__doc__)
    p.add_argument(
        "--input",
        required=True,
        help="a .csv or .parquet file, a directory of them, a glob ('logs/day-*.parquet') or a file:// URL",
    )
    p.add_argument("--schema", required=True, help="schema YAML (see iat_rec/data/schema.py)")
    p.add_argument("--out", required=True, help="instance log directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing instance log at --out")
    args = p.parse_args(argv)
    check_log_out(args.out, args.overwrite, (*input_files(args.input), args.schema))
    log = ingest(args.input, load_schema(args.schema), args.out)
    print(f"wrote {log.path}: {log.rows} instances, {log.users} users, fingerprint {log.fingerprint}")
    return 0


def append_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="iat-rec data append",
        description="Write the next version of an instance log: a later segment (e.g. one day; no timestamp before "
        "the log's last) merged in, encoded and normalised as the log was. Old rows keep their order, so "
        "a token table of the old version extends with export --append.",
    )
    p.add_argument("--log", required=True, help="the instance log to extend (left unchanged)")
    p.add_argument(
        "--input", required=True, help="the new segment: a .csv or .parquet file, a directory, a glob or a file:// URL"
    )
    p.add_argument("--out", required=True, help="directory of the new version")
    p.add_argument("--overwrite", action="store_true", help="replace an existing instance log at --out")
    args = p.parse_args(argv)
    log = InstanceLog(args.log)
    log.check_files()
    check_log_out(args.out, args.overwrite, (*input_files(args.input), args.log))
    new = append(log, args.input, args.out)
    added = new.segments[-1]
    print(
        f"wrote {new.path}: {new.rows} instances ({added['rows']} appended, segment {len(new.segments) - 1}), "
        f"{new.users} users, fingerprint {new.fingerprint}"
    )
    return 0
