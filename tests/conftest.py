"""Shared fixtures: a tiny synthetic log, and a 2-rank stage-1 run with its token table.

Multi-process fixtures launch 2 gloo ranks through the real command line (the elastic
agent), exactly as a user would, and are built once per test session. Shared helpers and
constants are tests/helpers.py's.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import STAGE1, run_cli, synth_log

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real multi-process launches")


@pytest.fixture(scope="session")
def tiny_log(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "log"
    synth_log(path)
    return path


@pytest.fixture(scope="session")
def stage1_run(tiny_log, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("stage1") / "run"
    run_cli("compress", "--data", str(tiny_log), "--out", str(run), "--nproc", "2", *STAGE1)
    return run


@pytest.fixture(scope="session")
def tokens(stage1_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokens") / "tokens"
    run_cli(
        "export", "--stage1", str(stage1_run), "--out", str(out), *"--nproc 2 --batch-size 512 --no-progress".split()
    )
    return out
