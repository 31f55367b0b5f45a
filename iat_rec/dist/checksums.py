"""Size and checksum of every array file of an artifact, recorded in its manifest when it is
written and checked when the file is first read, so a damaged or edited file is an error,
never data (one cleared bit in a token table's label times once showed labels before they
were known)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from iat_rec.errors import IatError


def digest(path: Path) -> dict:
    """``{"bytes": size, "blake2b": hex digest}`` of a file."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "blake2b": h.hexdigest()}


def digests(folder: Path, names: list[str]) -> dict[str, dict]:
    """The manifest entry: file name -> digest, for ``names`` in ``folder``."""
    return {name: digest(folder / name) for name in sorted(names)}


_verified: set[tuple] = set()  # (path, inode, size, mtime, digest) checked in this process


def check(path: Path, manifest: dict) -> None:
    """Refuses ``path`` unless its size and checksum are those of the manifest's ``files``.
    A file is hashed once per process while it stays the same file (inode, size, mtime)."""
    expected = manifest.get("files", {}).get(path.name)
    if expected is None:
        raise IatError(f"{path}: not listed in its manifest's files")
    if not path.is_file():
        raise IatError(f"{path}: missing")
    st = path.stat()
    if st.st_size != expected["bytes"]:
        raise IatError(
            f"{path}: {st.st_size} bytes, its manifest says {expected['bytes']}: the file is truncated or was replaced"
        )
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, expected["blake2b"])
    if key in _verified:
        return
    if digest(path)["blake2b"] != expected["blake2b"]:
        raise IatError(f"{path}: checksum differs from its manifest: the file is damaged or was edited")
    _verified.add(key)
