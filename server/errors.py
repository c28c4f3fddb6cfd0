"""Domain errors. The gRPC service maps each to one status code, in one place (service.STATUS_OF)."""
from __future__ import annotations

# The base class and InvalidArgument live in the model layer (tokenization raises InvalidArgument); re-exported here.
from twostage.model.errors import InvalidArgument, TwoStageError

__all__ = ["TwoStageError", "InvalidArgument", "NotFound", "ResourceExhausted", "DeadlineExceeded", "Cancelled",
           "FailedPrecondition", "Unavailable"]


class NotFound(TwoStageError):
    """Referenced documents do not exist."""


class ResourceExhausted(TwoStageError):
    """A queue or concurrency bound is full, or the work queued ahead makes the deadline impossible; retry later.
    `predicted_wait_ms`: for a refusal by prediction, the predicted wait (the service sends it as trailing metadata
    too)."""

    def __init__(self, message: str, *, predicted_wait_ms: float | None = None):
        super().__init__(message)
        self.predicted_wait_ms = predicted_wait_ms


class DeadlineExceeded(TwoStageError):
    """The request's deadline passed before its work could run."""


class Cancelled(TwoStageError):
    """The client cancelled the request."""


class FailedPrecondition(TwoStageError):
    """The server state does not allow this (e.g. writes to a read-only index)."""


class Unavailable(TwoStageError):
    """The server is shutting down or not ready."""
