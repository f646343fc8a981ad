"""Shared fixtures: a token cache shared by the whole run, so that the suite tokenizes tiny shakespeare once.

The suite runs on every core (pytest-xdist, `-n auto` in pyproject.toml), one torch thread per worker: two workers
on two cores share them instead of fighting over them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # set before torch is imported; the CLI's subprocesses inherit it
        os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    # Under xdist every worker has its own base temp dir inside one shared by the run; the cache lives there, as it
    # does for users whose parallel runs share one (its builder takes a file lock: one process tokenizes).
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = shared / "token_cache"
    path.mkdir(exist_ok=True)
    return path
