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


def load_script(path: Path):
    """A script outside the package (bench/) as a module, loaded once, for its functions; it
    is registered under its stem, as its dataclasses look their module up."""
    if path.stem not in sys.modules:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    return sys.modules[path.stem]


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


# -- what the `iwarp serve` test modules share (test_streaming, test_serve_*, test_openapi) --
# A module may define a fixture of the same name to use its own (test_streaming's camera).


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained 64x64 `tiny_flow` checkpoint (~10 ms a frame): for the server's plumbing."""
    from test_streaming import _checkpoint

    return _checkpoint(tmp_path_factory.mktemp("ck"), 64)


@pytest.fixture(scope="module")
def small_animator(checkpoint):
    """A torch Animator on `checkpoint` with the packaged avatar as "default"."""
    from test_streaming import _animator

    return _animator(checkpoint)


@pytest.fixture
def no_uploads_left(small_animator):
    """The test starts and ends with the default avatar only (the animator is shared)."""
    yield
    for record in small_animator.avatars():
        if record.owner:
            small_animator.remove_avatar(record.avatar_id)


@pytest.fixture(scope="module")
def face_png() -> bytes:
    """A 128x128 PNG of the packaged portrait: a face the detector finds."""
    from test_streaming import _png

    from iwarp.media import read_image
    from iwarp.paths import DEFAULT_AVATAR

    return _png(read_image(DEFAULT_AVATAR)[::4, ::4])


@pytest.fixture(scope="module")
def camera():
    """30 frames of the swaying portrait at 128x128: a camera for WebRTC sessions."""
    from iwarp.media import read_image, synthetic_driving_frames
    from iwarp.paths import DEFAULT_AVATAR

    return synthetic_driving_frames(read_image(DEFAULT_AVATAR), 30, 128)
