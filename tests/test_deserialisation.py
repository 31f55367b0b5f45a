"""No unsafe deserialisation: nothing read from disk can run code.

Checkpoints and token tables load through DCP, which unpickles ``.metadata`` and its
non-tensor entries with no restriction; ``iat_rec.dist.checkpoint`` vets both first. Every other
loader in the source tree is checked by reading the source.
"""

import os
import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from iat_rec.dist.checkpoint import dcp_load, read_metadata
from iat_rec.errors import IatError
from tests.helpers import REPO

SOURCES = ["iat_rec", "pipelines", "modules", "benchmarks", "torchx_components", "tests"]

# (pattern, why it is unsafe); this file, which spells them out, is not scanned
UNSAFE = [
    (r"torch\.load\((?![^)]*weights_only=True)", "torch.load without weights_only=True"),
    (r"yaml\.(load|load_all|unsafe_load|full_load)\(", "YAML not through yaml.safe_load"),
    (r"yaml\.(Unsafe|Full)?Loader\b", "a YAML loader that builds objects"),
    (r"pickle\.loads?\(|cloudpickle|dill\b|marshal\.loads?\(|shelve\.", "unpickling"),
    (r"allow_pickle=True", "np.load with pickles"),
]


def test_no_unsafe_loader_in_the_source_tree():
    found = []
    for path in sorted(p for d in SOURCES for p in (REPO / d).rglob("*.py")):
        if path == Path(__file__):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for pattern, why in UNSAFE:
                if re.search(pattern, line):
                    found.append(f"{path.relative_to(REPO)}:{number}: {why}: {line.strip()}")
    assert not found, "\n".join(found)


class MakesDir:
    """Unpickling it creates a directory: a stand-in for any code a pickle can run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_checkpoint_entries_that_would_run_code_are_refused(tmp_path):
    ran = tmp_path / "ran"
    path = tmp_path / "ckpt"
    dcp.save({"w": torch.ones(2), "evil": MakesDir(ran)}, checkpoint_id=str(path), no_dist=True)
    dcp.load({"w": torch.empty(2), "evil": None}, checkpoint_id=str(path), no_dist=True)
    assert ran.is_dir(), "DCP alone runs the pickled code"
    ran.rmdir()
    with pytest.raises(IatError, match=r"unsafe pickle in entry evil: .*GLOBAL posix\.mkdir"):
        dcp_load({"w": torch.empty(2), "evil": None}, path)
    assert not ran.exists()


def test_checkpoint_metadata_that_would_run_code_is_refused(tmp_path):
    ran = tmp_path / "ran"
    path = tmp_path / "ckpt"
    dcp.save({"w": torch.ones(2)}, checkpoint_id=str(path), no_dist=True)
    (path / ".metadata").write_bytes(pickle.dumps(MakesDir(ran)))
    for load in (lambda: dcp_load({"w": torch.empty(2)}, path), lambda: read_metadata(path)):
        with pytest.raises(IatError, match=r"unsafe pickle: posix\.mkdir is not a checkpoint metadata class"):
            load()
    assert not ran.exists()
