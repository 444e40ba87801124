"""Filesystem backends for dogpile.cache: multi-process safe, size-bounded, LRU.

Configure them by entry-point name; importing this package is not needed::

    region = make_region().configure(
        "dogpile_fsbackend.pickled", arguments={"base_dir": "/var/cache/app"}
    )
"""

__version__ = "0.1.0"  # the one version source: setup.cfg reads it (attr:)

from .backends import PickleFSBackend, RawFSBackend
from .exceptions import (
    BookkeepingError,
    CacheSizeWarning,
    ConfigError,
    FSBackendError,
    MissingExtraError,
    NotACacheError,
    ReadOnlyError,
    RemoteConfigWarning,
    RemoteError,
)
from .invalidation import SharedInvalidation
from .maintenance import PruneResult, ScanReport
from .rawfiles import CachedFile, CachedFileReader
from .rawtiered import RawTieredBackend
from .tiered import TieredBackend, TieredProxy
from .wsgi import CacheFileApp, mount

# The public API, all of it; the modules behind it are internal.
__all__ = [
    "BookkeepingError",
    "CacheFileApp",
    "CacheSizeWarning",
    "CachedFile",
    "CachedFileReader",
    "ConfigError",
    "FSBackendError",
    "MissingExtraError",
    "NotACacheError",
    "PickleFSBackend",
    "PruneResult",
    "RawFSBackend",
    "RawTieredBackend",
    "ReadOnlyError",
    "RemoteConfigWarning",
    "RemoteError",
    "ScanReport",
    "SharedInvalidation",
    "TieredBackend",
    "TieredProxy",
    "mount",
]
