"""The backends compared, and a minimal dogpile adapter for diskcache.

Every peer is configured through ``make_region().configure(...)`` exactly as an
application would, so region overhead (key handling, CachedValue wrapping,
pickling) is paid by all of them alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import dbm
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import diskcache
from common import OURS, GiB
from dogpile.cache import make_region, register_backend
from dogpile.cache.api import NO_VALUE, BytesBackend, CacheMutex, NoValueType
from dogpile.cache.region import CacheRegion

DISKCACHE_BACKEND = "benchmarks.diskcache"
BIG_CACHE = 16 * GiB  # workloads 1-3: the same limit for everyone, large enough never to evict


class DiskCacheMutex(CacheMutex):
    """A cross-process dogpile mutex on a diskcache key (what ``diskcache.Lock`` does)."""

    def __init__(self, cache: diskcache.Cache, key: str) -> None:
        self._cache = cache
        self._key = f"dogpile-lock:{key}"

    def acquire(self, wait: bool = True) -> bool:
        while not self._cache.add(self._key, None, expire=60, retry=True):
            if not wait:
                return False
            time.sleep(0.001)
        return True

    def release(self) -> None:
        self._cache.delete(self._key, retry=True)

    def locked(self) -> bool:
        return self._key in self._cache


class DiskCacheBackend(BytesBackend):
    """dogpile backend over ``diskcache.Cache``: arguments are Cache's, plus ``directory``."""

    def __init__(self, arguments: Mapping[str, Any]) -> None:
        settings = dict(arguments)
        self.distributed_lock = bool(settings.pop("distributed_lock", True))
        self.cache = diskcache.Cache(settings.pop("directory"), **settings)

    def get_serialized(self, key: str) -> bytes | NoValueType:
        return self.cache.get(key, default=NO_VALUE, retry=True)

    def get_serialized_multi(self, keys: Sequence[str]) -> list[bytes | NoValueType]:
        return [self.get_serialized(key) for key in keys]

    def set_serialized(self, key: str, value: bytes) -> None:
        self.cache.set(key, value, retry=True)

    def set_serialized_multi(self, mapping: Mapping[str, bytes]) -> None:
        with self.cache.transact(retry=True):
            for key, value in mapping.items():
                self.cache.set(key, value)

    def delete(self, key: str) -> None:
        self.cache.delete(key, retry=True)

    def get_mutex(self, key: str) -> CacheMutex | None:
        return DiskCacheMutex(self.cache, key) if self.distributed_lock else None


register_backend(DISKCACHE_BACKEND, "peers", "DiskCacheBackend")


@dataclasses.dataclass(frozen=True)
class Peer:
    """One backend under test: a name and how to configure a region on a directory."""

    name: str
    backend: str
    arguments: Callable[[str, int], dict[str, Any]]
    size_limit: bool = True  # honours a cache size
    shared: bool = True  # processes on one directory see each other's entries

    @property
    def is_ours(self) -> bool:
        return self.name == OURS

    def region(self, directory: str, cache_size: int = BIG_CACHE) -> CacheRegion:
        os.makedirs(directory, exist_ok=True)
        return make_region().configure(
            self.backend, arguments=self.arguments(directory, cache_size)
        )


def _dbm_arguments(directory: str, cache_size: int) -> dict[str, Any]:
    return {"filename": os.path.join(directory, "cache.dbm")}


OURS_PEER = Peer(
    OURS, "dogpile_fsbackend.pickled", lambda d, size: {"base_dir": d, "cache_size": size}
)
DOGPILE_FILESYSTEM = Peer(
    "dogpile_filesystem",
    "paylogic.filesystem",
    lambda d, size: {"base_dir": d, "cache_size": size},
)
DISKCACHE = Peer(
    "diskcache", DISKCACHE_BACKEND, lambda d, size: {"directory": d, "size_limit": size}
)
DISKCACHE_LRU = Peer(
    "diskcache (LRU)",
    DISKCACHE_BACKEND,
    lambda d, size: {
        "directory": d,
        "size_limit": size,
        "eviction_policy": "least-recently-used",
    },
)
DBM = Peer("dogpile.cache.dbm", "dogpile.cache.dbm", _dbm_arguments, size_limit=False)
MEMORY = Peer(
    "dogpile.cache.memory", "dogpile.cache.memory", lambda d, size: {}, False, shared=False
)

ALL = (OURS_PEER, DOGPILE_FILESYSTEM, DISKCACHE, DISKCACHE_LRU, DBM, MEMORY)
BY_NAME = {peer.name: peer for peer in ALL}


def bulk_set(peer: Peer, region: CacheRegion, mapping: Mapping[str, Any]) -> None:
    """Pre-populate through the region; dogpile_filesystem skips its per-set directory scan.

    dogpile_filesystem lists and stats its whole directory on every set, which
    makes filling it O(n^2); its own set path minus that scan writes the same
    files (nothing is evicted because the cache is far below its limit).
    """
    if peer is not DOGPILE_FILESYSTEM:
        region.set_multi(mapping)
        return
    backend = region.backend
    backend.prune = lambda: None  # instance attribute shadows the method
    try:
        region.set_multi(mapping)
    finally:
        del backend.prune


def close_region(region: CacheRegion) -> None:
    """Release what a peer keeps open (diskcache's SQLite connection)."""
    cache = getattr(region.backend, "cache", None)
    if cache is not None and hasattr(cache, "close"):
        cache.close()


def dbm_flavour() -> str:
    """Which dbm module ``dogpile.cache.dbm`` gets on this Python (``dbm.dumb`` is slow)."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "probe")
        with contextlib.closing(dbm.open(path, "c")):
            pass
        return dbm.whichdb(path) or "unknown"
