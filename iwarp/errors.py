"""User-facing errors: one line saying what is wrong and what to do.

The CLI prints these without a traceback and exits non-zero; the server turns them into 4xx
answers. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class IwarpError(Exception):
    """A problem caused by the user's input or environment, with a hint on how to fix it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class InputError(IwarpError):
    """A file or frame the user gave cannot be used (missing, corrupt, wrong type, empty)."""


class NoFaceError(InputError):
    """No face was found where one is needed (an avatar photo, a calibration clip)."""


class ConfigError(IwarpError):
    """A configuration cannot be used: an unknown preset, or settings that contradict each other."""


class CheckpointError(IwarpError):
    """A checkpoint, ONNX graph or engine does not exist or does not match the configuration."""
