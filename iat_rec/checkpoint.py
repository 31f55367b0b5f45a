"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically.

``RUN/checkpoints/step_00000100/`` holds the DCP files (sharded model, fused and dense
optimizer state, step) plus ``rank<r>.json`` with each rank's loader and RNG state.
All ranks write into ``.step_00000100.tmp``; rank 0 renames it into place after a
barrier and then points ``RUN/checkpoints/latest`` at it, so a job killed mid-save leaves
the previous checkpoint as the latest, intact.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from iat_rec.atomic import collective_atomic_dir, write_json
from iat_rec.errors import IatError


def _ckpt_root(run: Path) -> Path:
    return Path(run) / "checkpoints"


def latest(run: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = _ckpt_root(Path(run)) / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / ".metadata").is_file():
        raise IatError(f"{pointer} points at {path}, which is not a complete checkpoint")
    return path


def save(run: str | Path, step: int, app_state: dict[str, Any], rank_state: dict[str, Any], keep: int = 2) -> Path:
    """Collective: every rank calls it with its share of the state."""
    root = _ckpt_root(Path(run))
    name = f"step_{step:08d}"
    with collective_atomic_dir(root / name) as tmp:
        dcp.save(app_state, checkpoint_id=str(tmp))
        write_json(tmp / f"rank{dist.get_rank()}.json", rank_state)
        if dist.get_rank() == 0:
            write_json(tmp / "meta.json", {"step": step, "world_size": dist.get_world_size()})
    if dist.get_rank() == 0:
        pointer_tmp = root / ".latest.tmp"
        pointer_tmp.write_text(name + "\n")
        pointer_tmp.replace(root / "latest")
        for old in sorted(root.glob("step_*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return root / name


def load(path: str | Path, app_state: dict[str, Any]) -> dict[str, Any]:
    """Loads ``app_state`` in place (collective); returns this rank's rank_state."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file() or not (path / ".metadata").is_file():
        raise IatError(f"{path}: not a complete checkpoint (missing meta.json or .metadata)")
    meta = json.loads(meta_file.read_text())
    world = dist.get_world_size()
    if meta["world_size"] != world:
        # model and optimizer state reshard through DCP, but loader positions are per rank
        raise IatError(
            f"{path} was written by {meta['world_size']} ranks; resuming on {world} ranks would change "
            f"which rows each rank reads. Resume with --nproc {meta['world_size']}, or start a new run "
            f"from it with a warm start"
        )
    dcp_load(app_state, path)
    rank_file = path / f"rank{dist.get_rank()}.json"
    try:
        return json.loads(rank_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise IatError(f"{rank_file}: corrupt or missing rank state: {e}") from None


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def load_weights(path: str | Path | None, model: torch.nn.Module, prefix: str = "", skip: str | None = None) -> None:
    """Loads model weights whose names start with ``prefix`` and not with ``skip`` (any world
    size: DCP reshards), for export, evaluation and warm starts.

    DCP loads in place, but a state dict may hold copies (data-parallel tables, for one), so
    the loaded entries are handed back through ``load_state_dict``.
    """
    if path is None or not (Path(path) / ".metadata").is_file():
        raise IatError(f"{path}: not a complete checkpoint (missing .metadata)")
    full = model.state_dict()
    state = {"model": {k: v for k, v in full.items() if k.startswith(prefix) and not (skip and k.startswith(skip))}}
    if not state["model"]:
        raise IatError(f"the model has no weights named {prefix}* to load from {path}")
    dcp_load(state, Path(path))
    # a full dict: TorchRec's sharded modules refuse a partial load_state_dict
    model.load_state_dict({**full, **state["model"]})


def dcp_load(state: dict[str, Any], path: Path, what: str = "checkpoint") -> None:
    """dcp.load with one clear error line for a corrupt or truncated ``what``."""
    try:
        with warnings.catch_warnings():
            # a single process is the intended case here, not a warning
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:  # a BaseException: DCP's wrapper of read errors
        cause = [line for line in str(e).splitlines() if line.strip()][-1:] or [type(e).__name__]
        raise IatError(f"{path}: corrupt or truncated {what}: {cause[0][:300]}") from None
