"""Exceptions and warnings raised by dogpile_fsbackend.

Hierarchy::

    FSBackendError
        ConfigError (also ValueError)       bad argument value or foreign directory
        NotACacheError (also ValueError)    maintenance pointed at a non-cache directory
        BookkeepingError (also OSError)     a bookkeeping file (marker, lock, accounting)
                                            is of the wrong type, damaged or unreadable
    CacheSizeWarning (UserWarning)          a value larger than the whole cache
"""

from __future__ import annotations

from collections.abc import Callable


class FSBackendError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(FSBackendError, ValueError):
    """A backend argument has a value that is not allowed."""

    def __init__(self, argument: str, allowed: str, got: object) -> None:
        super().__init__(f"{argument!r} must be {allowed}; got {got!r}")
        self.argument = argument

    def __reduce__(self) -> tuple[Callable[[str, str], ConfigError], tuple[str, str]]:
        # keep picklable across multiprocessing
        return (_rebuild_config_error, (self.args[0], self.argument))


def _rebuild_config_error(message: str, argument: str) -> ConfigError:
    error = ConfigError.__new__(ConfigError)
    FSBackendError.__init__(error, message)
    error.argument = argument
    return error


class NotACacheError(FSBackendError, ValueError):
    """A directory given to maintenance is not a dogpile_fsbackend cache."""


class BookkeepingError(FSBackendError, OSError):
    """A bookkeeping file cannot be used; raised as ``BookkeepingError(errno, text, path)``.

    ``text`` says what is wrong with the file and what to do about it.
    """


class CacheSizeWarning(UserWarning):
    """A value is larger than ``cache_size`` and was therefore not cached."""
