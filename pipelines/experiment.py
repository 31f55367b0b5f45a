"""Compare history variants with the same budget and seeds, and write a report.

    iat-rec experiment --data LOG --work DIR [--seeds 3] [--variants none,labels-only,handcrafted,iat-user,...]

Per seed, stage 1 is trained once per scheme the variants need (temporal, user) and
exported (time-consistent tokens unless a variant says ``@final`` or ``@initial``); every
stage-2 variant then trains with the same budget and seed, and none is warm-started. The
ablations ``labels-only`` (side info without tokens or ids) and ``iat-untrained`` (tokens of
the untrained compressor) show what the tokens themselves add. The report (Markdown table
of mean ± std test AUC/GAUC/LogLoss in nats, plots, stage-1 validation AUC and token
health, stage wall times) goes to ``WORK/report/`` unless ``--report`` says otherwise.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import torch.distributed as dist

from iat_rec.dist.env import init_distributed, rank_main, run_ranks
from iat_rec.errors import IatError
from iat_rec.eval.report import markdown_table, summarise, write_report
from iat_rec.tables import TOKEN_DTYPES
from iat_rec.train.config import SCHEMES, load_yaml
from pipelines.pipeline import Stages, Variant, add_launch_flags, check_stage_yaml

DEFAULT_VARIANTS = "none,labels-only,handcrafted,iat-temporal,iat-user,both-user,iat-untrained"
ALIASES = {"labels-only": "labels", "iat-untrained": "iat-user@initial"}
TOKENS_FROM = ("time-consistent", "final", "initial")


def parse_variants(spec: str, readers: list[str]) -> list[Variant]:
    """``none``, ``labels-only``, ``handcrafted``, ``iat-SCHEME[@FROM]``, ``both-SCHEME[@FROM]``
    (SCHEME temporal|user, FROM an ``export --tokens-from`` mode) and ``iat-untrained``
    (``iat-user@initial``), each once per reader (``none`` reads no history: once)."""
    out = []
    for item in spec.split(","):
        item = ALIASES.get(item.strip(), item.strip())
        body, _, tokens_from = item.partition("@")
        history, _, scheme = body.partition("-")
        if history not in ("none", "labels", "handcrafted", "iat", "both"):
            raise IatError(f"unknown variant '{item}' (history must be none, labels-only, handcrafted, iat or both)")
        if history in ("iat", "both") and scheme not in SCHEMES:
            raise IatError(f"variant '{item}' needs a scheme: {history}-temporal or {history}-user")
        if history not in ("iat", "both") and (scheme or tokens_from):
            raise IatError(f"variant '{item}': {history} reads no tokens, so it takes no scheme")
        if tokens_from and tokens_from not in TOKENS_FROM:
            raise IatError(f"variant '{item}': @{tokens_from} is not one of {list(TOKENS_FROM)}")
        for reader in readers if history != "none" else readers[:1]:
            out.append(Variant(history, scheme or None, reader, tokens_from or "time-consistent"))
    return out


def run(args: argparse.Namespace) -> Path | None:
    env = init_distributed(args.device)
    variants = parse_variants(args.variants, args.readers.split(","))
    stages = Stages(
        args.data,
        Path(args.work),
        load_yaml(args.compress_config),
        load_yaml(args.rank_config),
        args.dtype,
        args.device,
        report_only=args.report_only,
        progress=args.progress,
    )
    seeds = [args.only_seed] if args.only_seed is not None else range(args.seeds)
    results = [stages.rank(v, seed) for seed in seeds for v in variants]
    dist.barrier()
    if not env.is_main or args.only_seed is not None:  # one seed of several: the full run reports
        return None
    command = "iat-rec experiment " + " ".join(shlex.quote(a) for a in args.argv)
    report = write_report(
        args.report or Path(args.work) / "report",
        args.title,
        results,
        stages.seconds,
        command,
        dataset=args.dataset or Path(args.data).name,
        stage1=stages.stage1,
    )
    print("\n" + markdown_table(summarise(results)) + f"\n\nreport: {report}", flush=True)
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iat-rec experiment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", required=True, help="instance log")
    p.add_argument("--work", required=True, help="directory for every run")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--only-seed",
        type=int,
        default=None,
        help="run this seed's stages alone (seeds can run at once in one --work; a later run without it "
        "reuses every finished stage and writes the report of all seeds)",
    )
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated (default {DEFAULT_VARIANTS})")
    p.add_argument("--readers", default="transformer", help="comma-separated readers for the history variants")
    p.add_argument("--compress-config", help="YAML of iat-rec compress options (budget of stage 1)")
    p.add_argument("--rank-config", help="YAML of iat-rec rank options (budget of stage 2)")
    p.add_argument("--report-only", action="store_true", help="write the report of finished stages; train nothing")
    p.add_argument("--dtype", default="fp32", choices=sorted(TOKEN_DTYPES), help="token table dtype")
    p.add_argument("--report", help="report directory (default WORK/report)")
    p.add_argument("--title", default="IAT history variants")
    p.add_argument("--dataset", help="dataset name in the results (default: the log directory's name)")
    add_launch_flags(p)
    return p


def cli(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    args.argv = argv
    parse_variants(args.variants, args.readers.split(","))
    if args.seeds < 1:
        raise IatError("--seeds must be >= 1")
    if not Path(args.data).exists():
        raise IatError(f"--data {args.data} does not exist")
    check_stage_yaml(load_yaml(args.compress_config), load_yaml(args.rank_config))
    return run_ranks("pipelines.experiment", argv, args.nproc, lambda: run(args))


if __name__ == "__main__":
    rank_main(cli)
