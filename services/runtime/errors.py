"""Errors the runtime raises for bad input. Each says what was expected.

`InvalidRequestError.field` names the offending request field, so a front door can map it
to INVALID_ARGUMENT with the field named.
"""

from __future__ import annotations


class TandemError(Exception):
    """Base class of the errors Tandem raises on purpose."""


class ModelLoadError(TandemError, ValueError):
    """A model could not be found, read or is of an unsupported kind."""


class InvalidRequestError(TandemError, ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):  # picklable, so it crosses Ray actor calls as itself
        return type(self), (self.field, self.message)


class ResourceExhaustedError(TandemError, RuntimeError):
    """Not enough KV blocks (or queue room) for a request right now; retry later or elsewhere."""


class WorkerLostError(TandemError, RuntimeError):
    """The worker serving a request died; the request cannot go on there."""
