"""Domain errors. The gRPC service maps each to one status code, in one place (service.STATUS_OF)."""
from __future__ import annotations


class TwoStageError(Exception):
    """Base class: the message is sent to the client as the status details."""


class InvalidArgument(TwoStageError):
    """A request field is wrong; the message names the field, the problem and the limit."""

    def __init__(self, field: str, problem: str):
        self.field = field
        super().__init__(f"{field}: {problem}")


class NotFound(TwoStageError):
    """Referenced documents do not exist."""


class ResourceExhausted(TwoStageError):
    """A queue or concurrency bound is full; retry later."""


class DeadlineExceeded(TwoStageError):
    """The request's deadline passed before its work could run."""


class Cancelled(TwoStageError):
    """The client cancelled the request."""


class FailedPrecondition(TwoStageError):
    """The server state does not allow this (e.g. writes to a read-only index)."""


class Unavailable(TwoStageError):
    """The server is shutting down or not ready."""
