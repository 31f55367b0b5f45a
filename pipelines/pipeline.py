"""All stages in order, inside one launched job: compress -> export -> rank.

    iat-rec pipeline --data LOG --work DIR [--scheme user] [--history iat] [--reader transformer]

Each rank runs the stages one after another in the same process group, so a torchx or
torchrun job pays the launch once. Stage options beyond the flags below come from
``--compress-config`` / ``--rank-config`` YAML files (any option of ``iat-rec compress`` /
``iat-rec rank``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch.distributed as dist

from iat_rec.dist import checkpoint as ckpt
from iat_rec.dist.atomic import write_json
from iat_rec.dist.env import init_distributed, rank_main, run_ranks
from iat_rec.errors import IatError
from iat_rec.tables import TOKEN_DTYPES
from iat_rec.tokens.export import TOKENS_FROM
from iat_rec.train.config import DEVICES, SCHEMES, CompressConfig, check_values, from_dict, load_yaml, to_dict
from iat_rec.train.run_dir import RUN_INFO, read_run
from iat_rec.train.stage2 import Stage2Config
from modules.ranker import READERS
from pipelines import compress, rank
from pipelines.export import export


@dataclasses.dataclass
class Variant:
    """One stage-2 run: a history mode and, for iat/both, the stage-1 scheme of its tokens and
    which models encoded them (``export --tokens-from``)."""

    history: str
    scheme: str | None = None
    reader: str = "transformer"
    tokens_from: str = "time-consistent"

    @property
    def name(self) -> str:
        if self.history == "labels":
            return "labels-only"
        if self.scheme is None:
            return self.history
        if self.tokens_from == "initial" and self.history == "iat" and self.scheme == "user":
            return "iat-untrained"
        suffix = "" if self.tokens_from == "time-consistent" else f"@{self.tokens_from}"
        return f"{self.history}-{self.scheme}{suffix}"


def check_stage_yaml(c1: dict, c2: dict) -> None:
    """The stage configs' values (type, range, choices), before any rank starts. A stage here
    runs to its end: ``time_limit`` (a job's bound, resumed with --resume) is refused."""
    for flag, c, cls in (("--compress-config", c1, CompressConfig), ("--rank-config", c2, Stage2Config)):
        check_values(from_dict(cls, c, where=flag))
        if c.get("time_limit"):
            raise IatError(f"{flag}: time_limit stops a run unfinished; the pipeline runs each stage to its end")


def stage1_config(base: dict, data: str, out: Path, scheme: str, seed: int, device: str) -> CompressConfig:
    """``batch_size`` counts instances for both schemes (``stage1.units_per_batch``), so
    temporal and user-order runs of one config see the same instances per step."""
    # the experiment owns its work dir: a stage it reruns (unfinished, or another config) is replaced
    cfg = from_dict(
        CompressConfig,
        {**base, "data": data, "out": str(out), "scheme": scheme, "seed": seed, "device": device, "overwrite": True},
    )
    compress.check_config(cfg)
    return cfg


def stage2_config(
    base: dict, data: str, out: Path, v: Variant, seed: int, device: str, tokens: Path | None, stage1: Path | None
) -> Stage2Config:
    ranker = {**base.get("ranker", {}), "history": v.history, "reader": v.reader}
    if v.history not in ("iat", "both"):
        ranker.pop("query", None)  # the token query needs tokens; the other variants read the features
    d = {**base, "data": data, "out": str(out), "seed": seed, "device": device, "ranker": ranker, "overwrite": True}
    if tokens is not None:  # the stage-1 plan for the shared tables; no warm start: every variant starts alike
        d.update(tokens=str(tokens), stage1=str(stage1))
    cfg = from_dict(Stage2Config, d)
    rank.check_config(cfg)
    return cfg


class Stages:
    """Runs stages under ``work``, one stage-1 run and token table per (scheme, seed).

    A stage whose output is already complete under ``work`` with the same config is reused,
    so re-running an interrupted experiment continues where it stopped.
    """

    def __init__(
        self,
        data: str,
        work: Path,
        c1: dict,
        c2: dict,
        dtype: str,
        device: str,
        report_only: bool = False,
        progress: bool = True,
    ):
        # --no-progress reaches every stage (the YAML files may say so too)
        c1, c2 = ({**c, "progress": c.get("progress", True) and progress} for c in (c1, c2))
        self.data, self.work, self.c1, self.c2, self.dtype, self.device = data, work, c1, c2, dtype, device
        self.progress = progress
        self.report_only = report_only  # reuse finished stages only: a missing one is an error
        self.stage1: dict[str, dict] = {}  # per stage-1 run: its valid metrics and each table's token health
        # one file per stage: experiments of different seeds may run at once in one work dir
        self._seconds_dir = work / "seconds"
        self.seconds: dict[str, float] = {
            p.stem: json.loads(p.read_text()) for p in sorted(self._seconds_dir.glob("*.json"))
        }

    def _missing(self, path: Path) -> None:
        if self.report_only:
            raise IatError(f"--report-only: {path} is not finished with this config")

    def _timed(self, key: str, fn):
        start = time.perf_counter()
        out = fn()
        self.seconds[key] = time.perf_counter() - start
        if dist.get_rank() == 0:
            write_json(self._seconds_dir / f"{key}.json", self.seconds[key])
        return out

    def tokens(self, scheme: str, seed: int, tokens_from: str = "time-consistent") -> tuple[Path, Path]:
        """(stage-1 run, token table) for a scheme, seed and export mode."""
        run1 = self.work / f"stage1-{scheme}-s{seed}"
        table = self.work / f"tokens-{scheme}-{tokens_from}-s{seed}"
        cfg = stage1_config(self.c1, self.data, run1, scheme, seed, self.device)
        if not _done(run1, "result.json", cfg):
            self._missing(run1)
            self._timed(f"compress-{scheme}-s{seed}", lambda: compress.train(cfg))
        last = ckpt.latest(run1)
        manifest = json.loads((table / "manifest.json").read_text()) if (table / "manifest.json").is_file() else {}
        if (manifest.get("source_checkpoint"), manifest.get("tokens_from")) != (last.name, tokens_from):
            self._missing(table)
            self._timed(
                f"export-{scheme}-{tokens_from}-s{seed}",
                lambda: export(
                    str(run1),
                    str(table),
                    self.dtype,
                    device=self.device,
                    progress=self.progress,
                    tokens_from=tokens_from,
                ),
            )
        entry = self.stage1.setdefault(f"{scheme}-s{seed}", {})
        entry["valid"] = json.loads((run1 / "result.json").read_text()).get("valid")
        entry[tokens_from] = json.loads((table / "manifest.json").read_text()).get("health")
        return run1, table

    def rank(self, v: Variant, seed: int) -> dict:
        run1, table = self.tokens(v.scheme, seed, v.tokens_from) if v.scheme else (None, None)
        out = self.work / f"rank-{v.name}-{v.reader}-s{seed}"
        cfg = stage2_config(self.c2, self.data, out, v, seed, self.device, table, run1)
        if _done(out, "metrics.json", cfg):
            metrics = json.loads((out / "metrics.json").read_text())
        else:
            self._missing(out)
            metrics = self._timed(f"rank-{v.name}-{v.reader}-s{seed}", lambda: rank.train(cfg))
        history = json.loads((out / "eval_history.json").read_text())
        return {
            "variant": v.name,
            "reader": v.reader,
            "seed": seed,
            "run": str(out),
            "metrics": metrics,
            "history": history,
        }


def _done(run: Path, final_file: str, cfg) -> bool:
    """True when ``run`` finished (``final_file`` written) with this very config."""
    if not ((run / final_file).is_file() and (run / RUN_INFO).is_file()):
        return False

    def how(config: dict) -> dict:  # showing progress or not changes no result
        return {k: v for k, v in config.items() if k != "progress"}

    return how(read_run(run)["config"]) == how(json.loads(json.dumps(to_dict(cfg))))  # tuples -> lists


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iat-rec pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", required=True, help="instance log")
    p.add_argument("--work", required=True, help="directory for every stage's output")
    p.add_argument("--scheme", default="user", choices=SCHEMES)
    p.add_argument("--history", default="iat", choices=["iat", "both"])
    p.add_argument("--tokens-from", default=TOKENS_FROM[0], choices=TOKENS_FROM)
    p.add_argument("--reader", default="transformer", choices=list(READERS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="fp32", choices=sorted(TOKEN_DTYPES))
    p.add_argument("--compress-config", help="YAML of iat-rec compress options")
    p.add_argument("--rank-config", help="YAML of iat-rec rank options")
    add_launch_flags(p)
    return p


def add_launch_flags(p: argparse.ArgumentParser) -> None:
    """--device, --nproc and --progress of the programs that run every stage (pipeline, experiment)."""
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--nproc", type=int, default=None, help="local ranks to launch (default: GPUs, else 2)")
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars in every stage"
    )


def cli(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    c1, c2 = load_yaml(args.compress_config), load_yaml(args.rank_config)

    def body() -> None:
        init_distributed(args.device)
        stages = Stages(args.data, Path(args.work), c1, c2, args.dtype, args.device, progress=args.progress)
        stages.rank(Variant(args.history, args.scheme, args.reader, args.tokens_from), args.seed)

    if not Path(args.data).exists():
        raise IatError(f"--data {args.data} does not exist")
    check_stage_yaml(c1, c2)
    return run_ranks("pipelines.pipeline", argv, args.nproc, body)


if __name__ == "__main__":
    rank_main(cli)
