"""Errors: `KodkodError` is the base the command line catches; `ApiError` leaves the server as
`{"error": {"type", "message"}}` with its HTTP status."""
from __future__ import annotations


class KodkodError(Exception):
    """A failure with a message a user can act on: `kodkod` prints it, without a traceback."""

    exit_code = 1


class UsageError(KodkodError):
    """The command was given something it cannot use: a bad model directory, a device that is not there."""

    exit_code = 2


class ApiError(KodkodError):
    def __init__(self, status: int, type: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.headers = headers or {}
