"""Errors that carry their HTTP status; the server turns them into JSON {error, hint}."""

from __future__ import annotations

from iwarp.errors import CheckpointError, InputError, IwarpError, NoFaceError


class ApiError(IwarpError):
    def __init__(self, message: str, hint: str = "", status: int = 400) -> None:
        super().__init__(message, hint)
        self.status = status


def status_for(exc: IwarpError) -> int:
    """HTTP status for any iwarp error: the user's input is 4xx, our own setup 500."""
    if isinstance(exc, ApiError):
        return exc.status
    if isinstance(exc, NoFaceError):
        return 422
    if isinstance(exc, InputError):
        return 400
    if isinstance(exc, CheckpointError):
        return 500
    return 400
