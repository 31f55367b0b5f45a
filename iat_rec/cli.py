"""The ``iat-rec`` command line: one subcommand per stage, each a module's ``cli(argv)``."""

from __future__ import annotations

import importlib
import os
import sys

from iat_rec import VERBOSE_ENV
from iat_rec.errors import IatError

# command words -> (module[:function], one-line help); the function (default cli) takes argv, returns the exit code
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("data", "ingest"): ("iat_rec.data.ingest_cli", "ingest a CSV/Parquet file into an instance log"),
    ("data", "append"): (
        "iat_rec.data.ingest_cli:append_cli",
        "write the next version of an instance log with a later segment",
    ),
    ("data", "synth"): ("iat_rec.data.synth", "generate a synthetic instance log"),
    ("data", "movielens"): ("iat_rec.data.movielens", "build the MovieLens-1M instance log"),
    ("data", "stats"): ("iat_rec.data.stats", "summarise an instance log"),
    ("compress",): ("pipelines.compress", "stage 1: train the instance compressor"),
    ("export",): ("pipelines.export", "write every instance's token into the token table"),
    ("tokens", "show"): ("iat_rec.tokens.table", "print rows of a token table"),
    ("tokens", "lookup"): ("iat_rec.tokens.serving", "the history of one request: tokens and labels known before t"),
    ("tokens", "export"): (
        "iat_rec.tokens.serving:export_cli",
        "every row of a token table as Parquet or npy, for a feature store",
    ),
    ("tokens", "compressor"): (
        "iat_rec.tokens.serving:compressor_cli",
        "the compressor's token part as a standalone module for online inference",
    ),
    ("rank",): ("pipelines.rank", "stage 2: train the downstream ranker"),
    ("evaluate",): ("pipelines.evaluate", "evaluate a stage-2 run on the test split"),
    ("pipeline",): ("pipelines.pipeline", "all stages in order, in one job"),
    ("experiment",): ("pipelines.experiment", "compare history variants over seeds, write a report"),
    ("plan",): ("iat_rec.sharding.plan_cli", "print TorchRec's sharding plan for a topology"),
    ("bench",): ("benchmarks.run", "run a benchmark"),
    ("demo",): ("pipelines.demo", "the whole pipeline on default synthetic data"),
}


def _usage() -> str:
    lines = [
        "usage: iat-rec [--verbose] COMMAND [ARGS...]",
        "       iat-rec --version",
        "",
        "--verbose shows every third-party warning (hidden by default).",
        "",
        "commands:",
    ]
    for words, (_, text) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<16} {text}")
    lines.append("\n'iat-rec COMMAND --help' for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--verbose"]:  # every third-party warning too, in this process and its ranks
        os.environ[VERBOSE_ENV] = "1"
        argv = argv[1:]
    for words, (module, _) in COMMANDS.items():
        if tuple(argv[: len(words)]) == words:
            module, _, entry = module.partition(":")
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as e:
                if e.name and module.startswith(e.name):
                    print(f"iat-rec: '{' '.join(words)}' is not available in this version", file=sys.stderr)
                    return 2
                raise
            try:
                return int(getattr(mod, entry or "cli")(argv[len(words) :]) or 0)
            except IatError as e:
                print(f"iat-rec: error: {e}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print("iat-rec: interrupted", file=sys.stderr)
                return 130
    if argv[:1] == ["--version"]:
        from iat_rec import __version__

        print(f"iat-rec {__version__}")
        return 0
    if argv and argv[0] not in ("-h", "--help"):
        print(f"iat-rec: unknown command {' '.join(argv[:2])!r}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    print(_usage())
    return 0


if __name__ == "__main__":
    sys.exit(main())
