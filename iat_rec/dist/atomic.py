"""Atomic artifacts: write into a temporary sibling, rename into place at the end.

A writer killed mid-way leaves the previous artifact intact; a reader never sees a
half-written one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def artifact_format(path: str | os.PathLike, manifest: str) -> str | None:
    """The ``format`` of the artifact at ``path`` (its ``manifest`` JSON file), None if none."""
    try:
        return json.loads((Path(path) / manifest).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def read_json(path: str | os.PathLike, missing: str) -> Any:
    """The JSON file at ``path``, refused with one clear error line when it is absent (the
    message ``missing``) or not valid JSON."""
    from iat_rec.errors import IatError

    path = Path(path)
    if not path.is_file():
        raise IatError(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IatError(f"{path}: corrupt, not valid JSON: {e}") from None


def read_manifest(path: str | os.PathLike, name: str, what: str, fmt: str, version: int, remedy: str) -> dict:
    """The JSON file ``name`` of the artifact directory ``path`` (``what``, with its article:
    "a token table"), refused with one clear error when it is absent, corrupt, or of another
    format or version (``remedy`` says how to write it again)."""
    from iat_rec.errors import IatError

    manifest = read_json(Path(path) / name, f"{path}: not {what} (no {name})")
    if not isinstance(manifest, dict) or manifest.get("format") != fmt or manifest.get("version") != version:
        got = manifest if not isinstance(manifest, dict) else f"{manifest.get('format')} v{manifest.get('version')}"
        raise IatError(f"{path}: format {got}, expected {fmt} v{version}: {remedy}")
    return manifest


def check_out(
    out: str | os.PathLike,
    kind: str,
    formats: set[str],
    manifest: str,
    overwrite: bool,
    inputs: tuple[str | os.PathLike, ...] = (),
) -> None:
    """Refuses an output path that would lose data, before anything is written: one that is,
    holds or lies inside an input; an existing non-empty path that is not ``kind`` (an
    artifact whose ``manifest`` file's ``format`` is in ``formats``); or one that is, without
    ``overwrite``. ``kind`` takes its article: "an instance log"."""
    from iat_rec.errors import IatError

    target = Path(out).resolve()
    for given in inputs:
        src = Path(given).resolve()
        if target == src or src.is_relative_to(target) or target.is_relative_to(src):
            raise IatError(f"--out {out} would overwrite the input {given}: write {kind} elsewhere")
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return
    if artifact_format(target, manifest) not in formats:
        raise IatError(f"--out {out} exists and is not {kind}: refusing to replace it")
    if not overwrite:
        raise IatError(f"--out {out} is {kind} already: pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary directory beside ``path``; on success it replaces ``path`` (callers
    decide beforehand whether an existing ``path`` may be replaced: ``check_out``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{_HOST}-{os.getpid()}-", dir=path.parent))
    os.chmod(tmp, _by_umask(0o777))  # mkdtemp makes it 0700 whatever the umask
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _put_dir(tmp, path, path.parent / f".{path.name}.old-{os.getpid()}")


_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())  # no '-': it separates the name's fields


def _remove_orphans(path: Path) -> None:
    """Removes the temporary siblings of ``path`` left by writers of this host that were
    killed (their process is gone); a live writer's are kept, and so is every other host's
    (on a shared filesystem this host cannot tell whether that writer lives)."""
    for sibling in path.parent.glob(f".{glob.escape(path.name)}.tmp-{glob.escape(_HOST)}-*-*"):
        pid = sibling.name[len(path.name) + 6 + len(_HOST) + 1 :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(sibling, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def collective_atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Collective ``atomic_dir``: every rank writes into one temporary sibling (a shared
    filesystem, as DCP assumes); rank 0 renames it into place once every rank has finished."""
    import torch.distributed as dist

    def barrier() -> None:
        if dist.is_initialized():
            dist.barrier()

    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    main = not dist.is_initialized() or dist.get_rank() == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    yield tmp
    barrier()
    if main:
        old = path.parent / f".{path.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        _put_dir(tmp, path, old)
    barrier()


def _put_dir(tmp: Path, path: Path, old: Path) -> None:
    """Moves the finished directory ``tmp`` to ``path``, replacing what is there.

    A directory cannot be renamed over a non-empty one, so an existing ``path`` is swapped
    with ``tmp`` in one step where the filesystem can; elsewhere it is renamed to ``old``
    first, and a kill between the two renames leaves the previous artifact at ``old``.
    """
    if path.exists() and _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous artifact
        return
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths atomically (Linux renameat2); False where the OS or filesystem cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, _by_umask(0o666))  # mkstemp makes it 0600 whatever the umask
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    """Writes JSON through a temporary file and an atomic rename. A float that is NaN or
    infinite (an AUC of one class only) is written as null: NaN is not JSON."""
    write_text(path, json.dumps(finite_or_null(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def finite_or_null(obj):
    """``obj`` with every NaN or infinite float as None (JSON null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def _by_umask(mode: int) -> int:
    """``mode`` less the process umask: what open() and mkdir() would have made. Read from
    /proc where it can be: setting the umask to read it would let another thread create a
    file under umask 0 meanwhile."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return mode & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mode & ~mask
