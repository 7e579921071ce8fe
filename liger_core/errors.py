"""Errors raised by the dispatch core.

Every message names what the caller passed and what was expected, so that a user can act on it without reading
the dispatcher's source.
"""

from __future__ import annotations


class LigerError(Exception):
    """Base class of the errors specific to this package."""


class SpecError(LigerError, ValueError):
    """A malformed operator, kernel or backend specification (a plugin author's mistake)."""


class BackendUnavailableError(LigerError, RuntimeError):
    """No kernel can serve a call under the current forcing, or a forced backend cannot serve it.

    ``reasons`` maps each backend considered to the list of reasons it declined.
    """

    def __init__(self, message: str, reasons: dict[str, list[str]] | None = None):
        super().__init__(message)
        self.reasons = dict(reasons or {})


class EnvironmentSettingError(LigerError, ValueError):
    """An environment variable of this package holds a value it does not accept."""
