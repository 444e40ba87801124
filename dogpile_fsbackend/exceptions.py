"""Exceptions and warnings raised by dogpile_fsbackend.

Hierarchy::

    FSBackendError
        ConfigError (also ValueError)       bad argument value or foreign directory
        NotACacheError (also ValueError)    maintenance pointed at a non-cache directory
        BookkeepingError (also OSError)     a bookkeeping file (marker, lock, accounting)
                                            is of the wrong type, damaged or unreadable
        ReadOnlyError (also OSError, EROFS) a change asked of a read-only cache
        RemoteError                         the shared tier failed (remote_errors="raise")
        MissingExtraError (also ImportError) an optional extra such as [redis] is not installed
    CacheSizeWarning (UserWarning)          a value larger than the whole cache
    RemoteConfigWarning (UserWarning)       a shared-tier setting with a known pitfall
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

    def within(self, tier: str) -> ConfigError:
        """The same error, named as an argument of ``tier`` (``local.base_dir``)."""
        message = f"{self.args[0]} (in the arguments of the {tier!r} tier)"
        return _rebuild_config_error(message, f"{tier}.{self.argument}")


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


class ReadOnlyError(FSBackendError, OSError):
    """A set, delete or maintenance scan asked of a cache opened read-only.

    Raised as ``ReadOnlyError(errno.EROFS, text, base_dir)``: ``text`` names what
    was refused (the key, the prefix, the scan) and why the cache is read-only
    (``read_only=True``, or a filesystem mounted read-only).  It is an OSError with
    errno EROFS, so ``write_errors="log"`` and code that handles EROFS treat it as
    the write error it is.
    """


class RemoteError(FSBackendError):
    """A call to the shared (remote) tier failed; the message names the remote."""


class MissingExtraError(FSBackendError, ImportError):
    """A feature needs an optional extra (``pip install dogpile_fsbackend[redis]``)."""


class RemoteConfigWarning(UserWarning):
    """A shared-tier setting falls into a known pitfall (the message says which and why)."""


class CacheSizeWarning(UserWarning):
    """A value is larger than ``cache_size`` and was therefore not cached."""
