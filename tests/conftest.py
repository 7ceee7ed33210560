"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Let `pytest tests/...` work from a plain checkout where the package is not installed.
if importlib.util.find_spec("iwarp") is None:
    sys.path.insert(0, str(REPO_ROOT))


def shared_data_dir() -> Path:
    """Real footage folder: $IWARP_DATA, else `shared/data` beside the repository."""
    env = os.environ.get("IWARP_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-footage folder; tests using it are skipped when it is absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (set IWARP_DATA)")
    return path
