"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically.

``RUN/checkpoints/step_00000100/`` holds the DCP files (sharded model, fused and dense
optimizer state, step) plus ``rank<r>.json`` with each rank's loader and RNG state.
All ranks write into ``.step_00000100.tmp``; rank 0 renames it into place after a
barrier and then points ``RUN/checkpoints/latest`` at it, so a job killed mid-save leaves
the previous checkpoint as the latest, intact.

Every load (checkpoints and token tables) goes through ``SafeReader`` and ``SafePlanner``:
nothing in the files can run code, and damaged bytes are an error, never other weights.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata

from iat_rec.dist.atomic import collective_atomic_dir, write_json
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


def save_snapshot(path: str | Path, model_state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Collective: model weights alone (no optimizer, no loader), loadable with ``load_weights``
    on any world size; ``meta`` goes to ``meta.json``. Replaces an existing snapshot atomically."""
    path = Path(path)
    with collective_atomic_dir(path) as tmp:
        dcp.save({"model": model_state}, checkpoint_id=str(tmp))
        if dist.get_rank() == 0:
            write_json(tmp / "meta.json", meta)
    dist.barrier()
    return path


def load(path: str | Path, app_state: dict[str, Any]) -> dict[str, Any]:
    """Loads ``app_state`` in place (collective); returns this rank's rank_state."""
    path = Path(path)
    check_world_size(path, dist.get_world_size())
    dcp_load(app_state, path)
    rank_file = path / f"rank{dist.get_rank()}.json"
    try:
        return json.loads(rank_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise IatError(f"{rank_file}: corrupt or missing rank state: {e}") from None


def check_world_size(path: Path, world: int) -> None:
    """Refuses to resume checkpoint ``path`` on another number of ranks."""
    meta_file = path / "meta.json"
    if not meta_file.is_file() or not (path / ".metadata").is_file():
        raise IatError(f"{path}: not a complete checkpoint (missing meta.json or .metadata)")
    written = json.loads(meta_file.read_text())["world_size"]
    if written != world:
        # model and optimizer state reshard through DCP, but loader positions are per rank
        raise IatError(
            f"{path} was written by {written} ranks; resuming on {world} ranks would change "
            f"which rows each rank reads. Resume with --nproc {written}, or start a new run "
            f"from it with a warm start"
        )


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def under(key: str, paths: tuple[str, ...]) -> bool:
    """Whether the state-dict key or module path ``key`` is one of ``paths`` or inside one."""
    return any(key == p or key.startswith(p + ".") for p in paths)


def load_weights(path: str | Path | None, model: torch.nn.Module, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """Loads model weights whose names start with ``prefix`` and lie in no module of ``skip``
    (any world size: DCP reshards), for export, evaluation and warm starts.

    DCP loads in place, but a state dict may hold copies (data-parallel tables, for one), so
    the loaded entries are handed back through ``load_state_dict``.
    """
    if path is None or not (Path(path) / ".metadata").is_file():
        raise IatError(f"{path}: not a complete checkpoint (missing .metadata)")
    full = model.state_dict()
    state = {"model": {k: v for k, v in full.items() if k.startswith(prefix) and not under(k, skip)}}
    if not state["model"]:
        raise IatError(f"the model has no weights named {prefix}* to load from {path}")
    dcp_load(state, Path(path))
    # a full dict: TorchRec's sharded modules refuse a partial load_state_dict
    model.load_state_dict({**full, **state["model"]})


def dcp_load(state: dict[str, Any], path: Path, what: str = "checkpoint") -> None:
    """dcp.load, safe and with one clear error line for a corrupt, truncated or unsafe ``what``."""
    try:
        with warnings.catch_warnings():
            # a single process is the intended case here, not a warning
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(state, storage_reader=SafeReader(path), planner=SafePlanner(), no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:  # a BaseException: DCP's wrapper of read errors
        raise IatError(f"{path}: corrupt, truncated or unsafe {what}: {_last_line(e)}") from None


def read_metadata(path: Path, what: str = "checkpoint") -> Metadata:
    """The DCP metadata of ``path`` (names, shapes, dtypes), read safely."""
    try:
        return SafeReader(path).read_metadata()
    except Exception as e:
        raise IatError(f"{path}: corrupt, truncated or unsafe {what}: {_last_line(e)}") from None


def _last_line(e: BaseException) -> str:
    return ([line for line in str(e).splitlines() if line.strip()][-1:] or [type(e).__name__])[0][:300]


# Every global a DCP .metadata file of this torch refers to (torch dtypes are checked apart).
_METADATA_GLOBALS = {
    ("pathlib", "PosixPath"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    ),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unsafe pickle: {module}.{name} is not a checkpoint metadata class")


class SafeReader(FileSystemReader):
    """DCP's reader, made safe and strict: ``.metadata`` (a pickle, which DCP unpickles with no
    restriction) is first vetted by an unpickler that allows the metadata classes only, and
    each entry's CRC-32s are checked before it loads (torch.load ignores them, so damaged
    tensor bytes would load silently)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with open(Path(self.path) / ".metadata", "rb") as f:
            _MetadataUnpickler(f).load()
        return super().read_metadata(*args, **kwargs)

    def _slice_file(self, file, sinfo):
        if not sinfo.transform_descriptors:  # each entry is one torch.save zip archive
            bad = zipfile.ZipFile(_Window(file, sinfo.offset, sinfo.length)).testzip()
            if bad is not None:
                raise ValueError(f"CRC-32 mismatch in {sinfo.relative_path}, entry at byte {sinfo.offset} ({bad})")
        return super()._slice_file(file, sinfo)


class _Window(io.RawIOBase):
    """Bytes [offset, offset + length) of a seekable file, as a file of their own (zipfile
    seeks from the end, which DCP's own file view gets wrong)."""

    def __init__(self, file, offset: int, length: int):
        super().__init__()
        self.file, self.offset, self.length, self.pos = file, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = min(max(base + offset, 0), self.length)
        return self.pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.length - self.pos)
        self.file.seek(self.offset + self.pos)
        n = self.file.readinto(memoryview(buffer)[:n])
        self.pos += n
        return n


class SafePlanner(DefaultLoadPlanner):
    """DCP's planner, whose non-tensor entries (DCP loads them with weights_only=False) are
    first vetted by ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            why = next((line for line in str(e).splitlines() if "GLOBAL" in line), "not plain data")
            raise pickle.UnpicklingError(f"unsafe pickle in entry {read_item.dest_index.fqn}: {why}") from None
        value.seek(0)
        super().load_bytes(read_item, value)
