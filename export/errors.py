"""Errors raised by the export step. Pure standard library."""
from __future__ import annotations

from typing import Any


class ExportError(Exception):
    """The export cannot proceed; the message names the source, file or option at fault."""


class GateFailed(ExportError):
    """The accuracy gate found the served model too far from its reference. `figures` holds the gate record."""

    def __init__(self, message: str, figures: dict[str, Any]):
        super().__init__(message)
        self.figures = figures
