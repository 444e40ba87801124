"""Filesystem backends for dogpile.cache: multi-process safe, size-bounded, LRU.

Configure them by entry-point name; importing this package is not needed::

    region = make_region().configure(
        "dogpile_fsbackend.pickled", arguments={"base_dir": "/var/cache/app"}
    )
"""

from .backends import PickleFSBackend, RawFSBackend
from .exceptions import (
    BookkeepingError,
    CacheSizeWarning,
    ConfigError,
    FSBackendError,
    NotACacheError,
)
from .rawfiles import CachedFile, CachedFileReader
from .wsgi import CacheFileApp, mount

__all__ = [
    "BookkeepingError",
    "CacheFileApp",
    "CacheSizeWarning",
    "CachedFile",
    "CachedFileReader",
    "ConfigError",
    "FSBackendError",
    "NotACacheError",
    "PickleFSBackend",
    "RawFSBackend",
    "mount",
]
__version__ = "0.1.0"
