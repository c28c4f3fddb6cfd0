"""Errors whose message is meant for the caller. Defined here, below the server, because tokenization refuses
over-long input naming the request field; the server's other errors (server/errors.py) derive from the same base
and its gRPC service maps each to one status code."""
from __future__ import annotations


class TwoStageError(Exception):
    """Base class: the message is sent to the client as the status details."""


class InvalidArgument(TwoStageError):
    """A request field is wrong; the message names the field, the problem and the limit."""

    def __init__(self, field: str, problem: str):
        self.field = field
        super().__init__(f"{field}: {problem}")
