"""Filesystem backends for dogpile.cache: multi-process safe, size-bounded, LRU.

Configure them by entry-point name; importing this package is not needed::

    region = make_region().configure(
        "dogpile_fsbackend.pickled", arguments={"base_dir": "/var/cache/app"}
    )
"""

from .backends import PickleFSBackend, RawFSBackend
from .exceptions import (
    CacheSizeWarning,
    ConfigError,
    FSBackendError,
    MissingExtraError,
    NotACacheError,
    RemoteConfigWarning,
    RemoteError,
)
from .rawfiles import CachedFile, CachedFileReader
from .tiered import TieredBackend, TieredProxy
from .wsgi import CacheFileApp, mount

__all__ = [
    "CacheFileApp",
    "CacheSizeWarning",
    "CachedFile",
    "CachedFileReader",
    "ConfigError",
    "FSBackendError",
    "MissingExtraError",
    "NotACacheError",
    "PickleFSBackend",
    "RawFSBackend",
    "RemoteConfigWarning",
    "RemoteError",
    "TieredBackend",
    "TieredProxy",
    "mount",
]
__version__ = "0.1.0"
