"""The root of every FLOps exception; each package derives its domain errors from it.

A ``FlopsError`` carries a public ``message`` (one or two sentences naming the cause and
the fix) and optional ``details`` (a list of strings or dicts), which the manager's API
returns as ``{"error", "message", "details"}``.
"""

from typing import Any


class FlopsError(Exception):
    """Base class of FLOps errors. ``code`` is the stable machine-readable error name."""

    code = "flops_error"

    def __init__(self, message: str, details: list[Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []
