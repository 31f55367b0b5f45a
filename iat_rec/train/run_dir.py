"""A training run's directory and its record, ``RUN/run.json`` (format ``iat-rec-run``).

The trainer writes run.json once a resume has loaded: the stage, the whole config, the world
size, the instance log's fingerprint, what it resumed from, ``train_until`` and provenance.
Everything that reads a run (export, stage 2's ``--stage1``, evaluate, ``--resume`` and
``--resume-from``, the online compressor) goes through ``read_run``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from iat_rec.dist.atomic import check_out, read_json
from iat_rec.errors import IatError

RUN_FORMAT = "iat-rec-run"
RUN_INFO = "run.json"
STAGES = {"compress": "stage-1 (compress)", "rank": "stage-2 (rank)"}  # run.json's "stage" -> its name in errors


def read_run(run: str | Path, stage: str | None = None, option: str = "") -> dict[str, Any]:
    """``run``'s run.json, refused with one line if it is not a run (of ``stage``, when given).
    ``option`` names the flag that gave the run, for the error."""
    where = f"{option} {run}" if option else str(run)
    kind = f"a {STAGES[stage]} run" if stage else "a run"
    path = Path(run) / RUN_INFO
    info = read_json(path, f"{where}: not {kind} (no {RUN_INFO})")
    if not isinstance(info, dict) or info.get("format") != RUN_FORMAT:
        raise IatError(f"{path}: not {kind} (format is not {RUN_FORMAT})")
    if stage is not None and info.get("stage") != stage:
        raise IatError(f"{where}: {kind} is wanted, this is a {STAGES.get(info.get('stage'), info.get('stage'))} run")
    return info


def check_run_out(cfg, inputs: tuple[str, ...]) -> None:
    """A training run's ``--out``: never an input; an existing run only with --resume (continue
    it) or --overwrite (replace it)."""
    check_out(cfg.out, "a run", {RUN_FORMAT}, RUN_INFO, cfg.resume or cfg.overwrite, tuple(i for i in inputs if i))
