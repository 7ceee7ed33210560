"""Where iwarp keeps things: packaged assets, the default weights, the user's cache."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"
DEFAULT_CHECKPOINT = ASSETS_DIR / "tiny.safetensors"
DEFAULT_AVATAR = ASSETS_DIR / "astronaut.jpg"


def user_cache_dir() -> Path:
    """$IWARP_CACHE, else $XDG_CACHE_HOME/iwarp, else ~/.cache/iwarp."""
    if os.environ.get("IWARP_CACHE"):
        return Path(os.environ["IWARP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "iwarp"


def shared_data_dir() -> Path | None:
    """The real footage next to the checkout ($IWARP_DATA or ../shared/data), if present."""
    candidates = [os.environ.get("IWARP_DATA"), PACKAGE_DIR.parent.parent / "shared" / "data"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None
