"""Shared fixtures: a session-wide token cache, so that the suite tokenizes tiny shakespeare once."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token_cache")
