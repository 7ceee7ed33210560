"""Runtime: one Animator over interchangeable backends, with cached avatars."""

from iwarp.runtime.animator import Animator, DrivingStream, FaceCropper
from iwarp.runtime.avatar_store import AvatarStore
from iwarp.runtime.backends import create_backend

__all__ = ["Animator", "AvatarStore", "DrivingStream", "FaceCropper", "create_backend"]
