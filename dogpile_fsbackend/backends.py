"""The two dogpile.cache backends: pickled values and raw files, on one base."""

from __future__ import annotations

import logging
import os
import secrets
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from dogpile.cache.api import (
    NO_VALUE,
    BytesBackend,
    CacheBackend,
    CachedValue,
    NoValueType,
)

from . import layout, maintenance, rawfiles, records
from .config import SETTING_NAMES, parse_arguments
from .exceptions import CacheSizeWarning
from .locking import FileMutex
from .store import Store, remove_quietly

log = logging.getLogger(__name__)
_TOKEN_LENGTH = 16  # hex digits naming a raw entry's data file; new for every write


class _FSBackendBase(CacheBackend):
    """Arguments, mutexes, deletes and maintenance shared by both backends."""

    _kind: int
    _accepted_arguments: frozenset[str]

    def __init__(self, arguments: Mapping[str, Any]) -> None:
        self.settings = parse_arguments(arguments, self._accepted_arguments)
        self.store = Store(self.settings, self._kind)

    @classmethod
    def from_config_dict(cls, config_dict: Mapping[str, Any], prefix: str) -> _FSBackendBase:
        """Arguments from ``configure_from_config``, which has already turned numeric
        strings into numbers: an ini ``file_mode = 640`` arrives as the int 640 (which
        would be read as 0o1200, or silently wrong bits for 440), so the permission
        arguments get their digits back and are parsed as octal."""
        arguments = {k[len(prefix) :]: v for k, v in config_dict.items() if k.startswith(prefix)}
        for name in ("file_mode", "dir_mode"):
            value = arguments.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                arguments[name] = str(value)
        return cls(arguments)

    def get_mutex(self, key: str) -> FileMutex | None:
        if not self.settings.distributed_lock:
            return None
        return self.store.key_mutex(layout.encode_key(key))

    def delete(self, key: str) -> None:
        self.store.delete(_digest(key))

    def delete_multi(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.delete(key)

    # -- maintenance ----------------------------------------------------------

    def prune(self) -> maintenance.PruneResult:
        """Remove expired entries, evict down to the limit, and reconcile the accounting."""
        return maintenance.prune(self.store)

    def verify(self) -> maintenance.ScanReport:
        """Check every entry, remove damaged ones and fix the accounting."""
        return maintenance.verify(self.store)

    def clear(self) -> maintenance.PruneResult:
        """Remove every entry, safely while other processes use the cache."""
        return maintenance.clear(self.store)

    def stats(self) -> dict[str, int]:
        """Shared size figures plus hits, misses, writes and evictions of this instance."""
        size, entries = self.store.totals()
        return {
            "entries": entries,
            "bytes": size,
            "limit": self.settings.cache_size,
            "hits": self.store.hits,
            "misses": self.store.misses,
            "writes": self.store.writes,
            "evictions": self.store.evictions,
        }

    # -- shared write path ----------------------------------------------------

    def _fits(self, key: str, size: int) -> bool:
        """False (with a warning) for a value that cannot stay after an eviction.

        Eviction frees down to ``eviction_low_water * cache_size``; a bigger
        value would push out every other entry and then itself.
        """
        room = int(self.settings.cache_size * self.settings.eviction_low_water)
        if size <= room:
            return True
        message = (
            f"value of {size} bytes for key {key[:80]!r} is larger than cache_size x "
            f"eviction_low_water ({self.settings.cache_size} x "
            f"{self.settings.eviction_low_water} = {room} bytes) and was not cached"
        )
        self.store.delete(_digest(key))  # the key's old value must not outlive this set
        log.warning(message)
        warnings.warn(message, CacheSizeWarning, stacklevel=4)
        return False

    def _count(self, found: bool) -> None:
        if found:
            self.store.hits += 1
        else:
            self.store.misses += 1


def _digest(key: str) -> str:
    return layout.key_digest(layout.encode_key(key))


class PickleFSBackend(_FSBackendBase, BytesBackend):
    """Stores any value dogpile can serialize (pickle by default), one file per key.

    Basic usage::

        from dogpile.cache import make_region

        region = make_region().configure(
            "dogpile_fsbackend.pickled",
            expiration_time=3600,
            arguments={"base_dir": "/var/cache/myapp", "cache_size": "2GiB"},
        )

    Arguments are listed in the README ("Arguments").  Region ``serializer=``
    and ``deserializer=`` are honoured; the default is pickle.
    """

    _kind = records.KIND_PICKLED
    _accepted_arguments = SETTING_NAMES - {"file_movable"}

    def get_serialized(self, key: str) -> bytes | NoValueType:
        found = self.get_serialized_stamped(key)
        return found[0] if found is not NO_VALUE else NO_VALUE

    def get_serialized_stamped(self, key: str) -> tuple[bytes, float] | NoValueType:
        """Like :meth:`get_serialized`, plus when this cache stored the bytes.

        A tier above this cache (``dogpile_fsbackend.tiered``) judges whether
        it may still trust a local copy by that time.
        """
        key_bytes = layout.encode_key(key)
        found = self.store.read_record(layout.key_digest(key_bytes), key_bytes)
        self._count(found is not None)
        return (found.record.payload, found.record.created) if found else NO_VALUE

    def get_serialized_multi(self, keys: Sequence[str]) -> list[bytes | NoValueType]:
        return [self.get_serialized(key) for key in keys]

    def set_serialized(self, key: str, value: bytes) -> None:
        key_bytes = layout.encode_key(key)
        digest = layout.key_digest(key_bytes)
        created = time.time()
        data = records.encode(records.KIND_PICKLED, key_bytes, value, created)
        if not self._fits(key, len(data)):
            return
        self.store.publish(digest, self.store.write_temp(digest, data), len(data))
        maintenance.enforce_limit(self.store)

    def set_serialized_multi(self, mapping: Mapping[str, bytes]) -> None:
        for key, value in mapping.items():
            self.set_serialized(key, value)


class RawFSBackend(_FSBackendBase):
    """Stores file-like values as files, never loading them into memory.

    Basic usage::

        raw = make_region().configure(
            "dogpile_fsbackend.raw",
            arguments={"base_dir": "/var/cache/myapp-files", "file_movable": True},
        )

        @raw.cache_on_arguments()
        def render(clip_id):
            f = tempfile.NamedTemporaryFile(dir="/var/cache/myapp-files", delete=False)
            ...  # write
            f.seek(0)
            return f

    A hit returns a new read-only :class:`CachedFileReader` positioned where the
    creator left its file.  With ``file_movable=True`` a named file on the
    cache's filesystem is renamed into the cache instead of copied.
    """

    _kind = records.KIND_RAW
    _accepted_arguments = SETTING_NAMES

    def get(self, key: str) -> CachedValue | Any:
        key_bytes = layout.encode_key(key)
        digest = layout.key_digest(key_bytes)
        value = self._open(digest, key_bytes)
        self._count(value is not NO_VALUE)
        return value

    def get_by_digest(self, digest: str) -> CachedValue | Any:
        """Like :meth:`get`, for a caller that has only the key's SHA-256 hex (a URL).

        A hit counts as a use, as with ``get``; a string that is not a digest
        is a miss.
        """
        if layout.split_entry_name(digest) != (digest, None):
            value = NO_VALUE
        else:
            value = self._open(digest, None)
        self._count(value is not NO_VALUE)
        return value

    def _open(self, digest: str, key_bytes: bytes | None) -> Any:
        found = self.store.read_record(digest, key_bytes)
        if found is None:
            return NO_VALUE
        record = found.record
        try:
            meta = records.RawMeta.from_bytes(record.payload)
            data_path = f"{self.store.layout.entry_path(digest)}.{meta.token}"
            reader = rawfiles.open_cached(data_path, meta, record.created)
        except (records.DamagedRecord, FileNotFoundError):
            # Only the file we read: a no-op if a writer replaced (or a reader used) it since.
            self.store.discard(digest, found.inode, found.used_ns)
            return NO_VALUE
        if meta.metadata is None:
            return reader
        return CachedValue(reader, meta.metadata)

    def get_multi(self, keys: Sequence[str]) -> list[Any]:
        return [self.get(key) for key in keys]

    def set(self, key: str, value: Any) -> None:
        metadata = None
        if isinstance(value, CachedValue):
            value, metadata = value.payload, value.metadata
        fileobj, filename, content_type = rawfiles.unwrap(value)
        key_bytes = layout.encode_key(key)
        digest = layout.key_digest(key_bytes)
        created = time.time()

        def encode_record(token: str, size: int, position: int) -> bytes:
            meta = records.RawMeta(token, size, position, metadata, filename, content_type)
            return records.encode(records.KIND_RAW, key_bytes, meta.to_bytes(), created)

        known_size = rawfiles.file_size(fileobj)
        if known_size is not None:  # refuse before a byte is copied or the caller's file moved
            largest_record = encode_record("0" * _TOKEN_LENGTH, known_size, known_size)
            if not self._fits(key, known_size + len(largest_record)):
                return
        data_fd, data_temp = self.store.open_temp(digest)
        record_temp = None
        try:
            try:
                size, position = rawfiles.stage(
                    fileobj,
                    data_temp,
                    data_fd,
                    movable=self.settings.file_movable,
                    data_dir=self.store.layout.data_dir,
                    file_mode=self.settings.file_mode,
                )
            finally:
                os.close(data_fd)
            self.store.sync_path_if_asked(data_temp)  # by path: it may be the caller's file now
            token = secrets.token_hex(_TOKEN_LENGTH // 2)
            record = encode_record(token, size, position)
            if not self._fits(key, size + len(record)):  # a stream, or a file that grew
                remove_quietly(data_temp)
                return
            record_temp = self.store.write_temp(digest, record)
            self.store.publish(digest, record_temp, size + len(record), data_temp, token)
        except BaseException:
            remove_quietly(data_temp)
            remove_quietly(record_temp)
            raise
        maintenance.enforce_limit(self.store)

    def set_multi(self, mapping: Mapping[str, Any]) -> None:
        for key, value in mapping.items():
            self.set(key, value)
