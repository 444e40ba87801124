"""Filesystem backends for dogpile.cache: multi-process safe, size-bounded, LRU.

Configure them by entry-point name; importing this package is not needed::

    region = make_region().configure(
        "dogpile_fsbackend.pickled", arguments={"base_dir": "/var/cache/app"}
    )
"""

from .backends import PickleFSBackend, RawFSBackend
from .exceptions import CacheSizeWarning, ConfigError, FSBackendError, NotACacheError
from .rawfiles import CachedFile, CachedFileReader

__all__ = [
    "CacheSizeWarning",
    "CachedFile",
    "CachedFileReader",
    "ConfigError",
    "FSBackendError",
    "NotACacheError",
    "PickleFSBackend",
    "RawFSBackend",
]
__version__ = "0.1.0"
