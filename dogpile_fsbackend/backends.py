"""The two dogpile.cache backends: pickled values and raw files, on one base."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from hashlib import sha256  # layout.key_digest, inlined for the hit path
from typing import TYPE_CHECKING, Any

from dogpile.cache.api import (
    NO_VALUE,
    BytesBackend,
    CacheBackend,
    CachedValue,
    CacheMutex,
)

from . import eviction, layout, listing, maintenance, rawfiles, records
from .config import SETTING_NAMES, documented, parse_arguments
from .exceptions import CacheSizeWarning
from .lookups import LookupTracker, RecheckingMutex, ThreadMutexes
from .store import DataFile, Store, remove_quietly

if TYPE_CHECKING:  # dogpile.cache 1.3.3+ only; at run time we support 1.3.0
    from dogpile.cache.api import NoValueType

log = logging.getLogger(__name__)
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class _FSBackendBase(CacheBackend):
    """Arguments, mutexes, deletes and maintenance shared by both backends."""

    _kind: int
    _accepted_arguments: frozenset[str]

    def __init__(self, arguments: Mapping[str, Any]) -> None:
        self.settings = parse_arguments(arguments, self._accepted_arguments)
        self.store = Store(self.settings, self._kind)
        self.evictor = eviction.Evictor(self.store)
        self._room = int(self.settings.cache_size * self.settings.eviction_low_water)
        self._lookups = LookupTracker()
        self._thread_mutexes = ThreadMutexes()  # for distributed_lock=False

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

    def get_mutex(self, key: str) -> RecheckingMutex:
        """The key's mutex: across processes (a byte of the lock file), or among this
        process's threads only with ``distributed_lock=False`` or on a read-only cache
        (which may not lock its lock file, and stores nothing another process could use)."""
        key_bytes = checked_key(key)
        if self.settings.distributed_lock and self.store.writable:
            mutex: CacheMutex = self.store.key_mutex(key_bytes)
        else:
            mutex = self._thread_mutexes.get(key)
        return self.rechecking(mutex, key)

    def rechecking(self, mutex: CacheMutex, key: str) -> RecheckingMutex:
        """``mutex`` (this backend's own, or one a tier above uses in its place) made to
        count dogpile's look again under it as part of the same lookup (lookups.py)."""
        return RecheckingMutex(mutex, self._lookups, key)

    def delete(self, key: str) -> None:
        digest = _digest(key)
        self.store.check_writable(f"delete key {key[:80]!r}")
        self.store.delete(digest)

    def delete_multi(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.delete(key)

    # -- listing --------------------------------------------------------------

    def keys(self, prefix: str | None = None) -> Iterator[str]:
        """The keys of the live entries (those starting with ``prefix``), as stored.

        An iterator in constant memory: it reads one shard directory at a time,
        in no particular order.  It changes nothing (no recency, no removal)
        and leaves out damaged, foreign and expired entries.  The keys are
        those the backend was given: after a region's ``key_mangler``, if any.
        Entries written or removed while it runs may or may not be listed.
        """
        encoded = b"" if prefix is None else _prefix_bytes(prefix)
        return (entry.key for entry in listing.entries(self.store, encoded))

    def delete_matching(self, prefix: str) -> int:
        """Remove every entry whose key starts with ``prefix``, expired and damaged ones
        too; the number removed.

        Safe while other processes use the cache: each entry is removed under
        its shard's lock for a moment, and only if it is still the file that
        was judged, so a value written meanwhile stays.  ``prefix`` is matched
        against the stored keys (see :meth:`keys`) and must not be empty: to
        remove everything, use :meth:`clear`.
        """
        encoded = _prefix_bytes(prefix)
        if not encoded:
            raise ValueError(
                "delete_matching() needs a non-empty prefix (an empty one matches every "
                "key); to remove every entry, use clear()"
            )
        self.store.check_writable(f"delete the keys starting with {prefix[:80]!r}")
        return listing.delete_matching(self.store, encoded).removed

    # -- maintenance ----------------------------------------------------------

    def prune(self) -> maintenance.PruneResult:
        """Remove expired entries, evict down to the low-water mark if over a limit, and
        reconcile the accounting."""
        self.store.check_writable("prune")
        return maintenance.prune(self.store)

    def verify(self) -> maintenance.ScanReport:
        """Check every entry, remove damaged ones and fix the accounting."""
        self.store.check_writable("verify")  # it repairs what it finds
        return maintenance.verify(self.store)

    def clear(self) -> maintenance.PruneResult:
        """Remove every entry, safely while other processes use the cache."""
        self.store.check_writable("clear")
        return maintenance.clear(self.store)

    def stats(self) -> dict[str, int | None]:
        """Shared size figures plus hits, misses, writes and evictions of this instance.

        A lookup counts once: a ``get_or_create`` (``cache_on_arguments``) call is
        one miss when its creator runs and one hit when it returns a cached value
        (see lookups.py); every ``get`` and every key of ``get_multi`` is one.
        """
        size, entries = self.store.totals()
        return {
            "entries": entries,
            "bytes": size,
            "limit": self.settings.cache_size,
            "entry_limit": self.settings.max_entries,
            "hits": self.store.hits,
            "misses": self.store.misses,
            "writes": self.store.writes,
            "evictions": self.store.evictions,
            "write_errors": self.store.write_errors,
        }

    # -- shared write path ----------------------------------------------------

    def _refuse_set(self, key: str) -> None:
        """A set on a read-only cache.

        dogpile's ``get_or_create`` stores the value it created while it holds
        the key's mutex: that set is skipped, so a miss still returns its value
        (uncached).  Any other set raises ReadOnlyError, or with
        ``write_errors="log"`` is logged and counted.
        """
        if self._thread_mutexes.is_held(key):
            log.debug("read-only cache: the value created for key %r is not stored", key[:80])
            return

        def refuse() -> None:
            raise self.store.read_only_error(f"store key {key[:80]!r}")

        self._write(key, refuse, retry=False)

    def _write(self, key: str, attempt: Callable[[], None], retry: bool = True) -> None:
        """Run one write (see ``_attempt``); after one that succeeded, enforce the limits
        (a bounded step, see eviction.py)."""
        if self._attempt(key, attempt, retry):
            self.evictor.after_write()

    def _attempt(self, key: str, attempt: Callable[[], None], retry: bool = True) -> bool:
        """Run one write; when the disk is full, evict a batch and try once more.

        A write that still fails raises (``write_errors="raise"``) or is logged
        and counted, and the value is simply not cached (``"log"``: False).
        """
        try:
            try:
                attempt()
            except OSError as exc:
                if exc.errno not in _NO_SPACE or not retry or not self._made_room(exc):
                    raise
                attempt()
        except OSError as exc:
            if self.settings.write_errors == "raise":
                raise
            self.store.write_errors += 1
            log.warning("value for key %r was not cached: %s", key[:80], exc)
            return False
        return True

    def _made_room(self, error: OSError) -> bool:
        """Evict one batch after ``error`` (a full disk); False if nothing could go."""
        try:
            freed = self.evictor.make_room()
        except OSError as exc:
            log.warning("could not evict after %s: %s", error, exc)
            return False
        log.warning("%s: evicted %d entries to make room, retrying", error, freed)
        return freed > 0

    def _fits(self, key: str, size: int, at_least: bool = False) -> bool:
        """False (with a warning) for a value that cannot stay after an eviction.

        Eviction frees down to ``eviction_low_water * cache_size``; a bigger
        value would push out every other entry and then itself.
        """
        room = self._room
        if size <= room:
            return True
        message = (
            f"value of {'more than ' if at_least else ''}{size} bytes for key {key[:80]!r} "
            "is larger than cache_size x "
            f"eviction_low_water ({self.settings.cache_size} x "
            f"{self.settings.eviction_low_water} = {room} bytes) and was not cached"
        )
        log.warning(message)
        warnings.warn(message, CacheSizeWarning, stacklevel=4)
        # The key's old value must not outlive this set; where it cannot go (a read-only
        # cache), that refused write follows write_errors like any other.
        if self.store.writable:
            self._attempt(key, lambda: self.store.delete(_digest(key)), retry=False)
        else:
            self._refuse_set(key)
        return False

    def room(self) -> int:
        """The largest entry that can stay after an eviction (low-water share of the limit)."""
        return self._room

    def _count(self, key: str | None, found: bool) -> None:
        lookups = self._lookups
        if found and lookups.recheck is None and lookups.missed is None:
            self.store.hits += 1  # the common hit: nothing pending, nothing to record
            return
        if lookups.is_recheck(key, found):  # the first look counted a miss
            if found:
                self.store.misses -= 1
                self.store.hits += 1
        elif found:
            self.store.hits += 1
        else:
            self.store.misses += 1


def checked_key(key: str) -> bytes:
    """The bytes that identify ``key``; TypeError (saying what to do) unless it is a str."""
    if not isinstance(key, str):
        raise TypeError(
            f"dogpile_fsbackend keys must be str, got {type(key).__name__}: {key!r:.80} "
            "(use a key_mangler or str() to turn other keys into strings)"
        )
    return layout.encode_key(key)


def _prefix_bytes(prefix: str) -> bytes:
    if not isinstance(prefix, str):
        raise TypeError(
            f"a key prefix must be str, like the keys; got {type(prefix).__name__}: {prefix!r:.80}"
        )
    return layout.encode_key(prefix)


def _digest(key: str) -> str:
    return layout.key_digest(checked_key(key))


_PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL
# CachedValue (a NamedTuple) from a (value, metadata) tuple without its Python-level __new__.
_new_cached_value = tuple.__new__


def dogpile_bytes(value: CachedValue) -> bytes:
    """``value`` as a region with dogpile's default serializer (pickle) hands it over:
    ``metadata|value``, the bytes every other region and tier can read."""
    return b"%b|%b" % (json.dumps(value.metadata).encode("ascii"), pickle.dumps(value.payload))


def from_dogpile_bytes(data: bytes) -> CachedValue | NoValueType:
    """The CachedValue in ``dogpile_bytes``; NO_VALUE for bytes that cannot be loaded (a
    class renamed or removed, another serializer's bytes), so dogpile regenerates it."""
    try:
        metadata, _, payload = data.partition(b"|")
        return CachedValue(pickle.loads(payload), json.loads(metadata))
    except Exception as exc:
        log.warning("a cached value could not be unpickled (%s); regenerating it", exc)
        return NO_VALUE


def _as_dogpile_bytes(payload: bytes) -> bytes | None:
    """``dogpile_bytes`` of a stored CachedValue's payload; None if it cannot be loaded."""
    try:
        value, metadata = pickle.loads(payload)
        return dogpile_bytes(CachedValue(value, metadata))
    except Exception as exc:
        log.warning("a cached value could not be unpickled (%s); regenerating it", exc)
        return None


class PickleFSBackend(_FSBackendBase, BytesBackend):
    """Stores any value dogpile can pickle (or a region's serializer can turn into bytes).

    Basic usage::

        from dogpile.cache import make_region

        region = make_region().configure(
            "dogpile_fsbackend.pickled",
            expiration_time=3600,
            arguments={"base_dir": "/var/cache/myapp", "cache_size": "2GiB"},
        )

    Region ``serializer=`` and ``deserializer=`` are honoured; without them,
    dogpile hands the ``CachedValue`` itself to :meth:`set`, which pickles the
    value and its metadata in one go (no JSON step); a region with a
    ``deserializer=`` alone gets dogpile's pickled bytes.  Every argument
    (``:param:`` below, from ``config.ARGUMENT_DOCS``) may also be an ini
    string (``configure_from_config``); a bad one raises :class:`ConfigError`,
    an unknown one is logged once.
    """

    _kind = records.KIND_PICKLED
    _accepted_arguments = SETTING_NAMES - {"file_movable"}
    # None: a region without its own serializer calls get/set with CachedValue objects.
    serializer = None
    deserializer = None
    # A region given a deserializer= but no serializer= reads bytes (get_serialized) while
    # it hands set() CachedValue objects.  Once this instance has seen both, its writes are
    # stored as dogpile's pickled bytes, and what it finds stored as a CachedValue (its own
    # writes before its first read, a region's without a serializer) is handed over as
    # those bytes.  A region with a serializer= never hands over a CachedValue, so another
    # region's pickle never reaches its deserializer.
    _read_serialized = False
    _handed_cached_values = False

    def get(self, key: str) -> CachedValue | NoValueType:
        """The ``CachedValue`` of ``key``, or NO_VALUE (also for a value that cannot be
        unpickled any more: its class renamed or removed, so dogpile regenerates it)."""
        key_bytes = checked_key(key)
        record = self.store.read_record(sha256(key_bytes).hexdigest(), key_bytes)
        value: CachedValue | NoValueType = NO_VALUE
        if record is not None and record.form == records.FORM_VALUE:
            try:
                value = _new_cached_value(CachedValue, pickle.loads(record.payload))
            except Exception as exc:
                log.warning("a cached value could not be unpickled (%s); regenerating it", exc)
        elif record is not None:
            # Bytes a region serialized (one with a serializer=, writing to the same
            # directory): dogpile's "metadata|value", pickled as dogpile's default.
            value = from_dogpile_bytes(record.payload)
        self._count(key, value is not NO_VALUE)  # a value that cannot be loaded: a miss
        return value

    def get_multi(self, keys: Iterable[str]) -> list[CachedValue | NoValueType]:
        return [self.get(key) for key in keys]

    def set(self, key: str, value: CachedValue | bytes) -> None:
        """Store a ``CachedValue``: its value and metadata pickled together (bytes, as
        :meth:`set_serialized` stores them)."""
        if isinstance(value, bytes):
            self.set_serialized(key, value)
            return
        self._handed_cached_values = True
        if self._read_serialized:  # a region with a deserializer= alone: it reads bytes
            self._put(key, dogpile_bytes(value), records.FORM_SERIALIZED)
            return
        data = pickle.dumps((value.payload, value.metadata), _PICKLE_PROTOCOL)
        self._put(key, data, records.FORM_VALUE)

    def set_multi(self, mapping: Mapping[str, CachedValue | bytes]) -> None:
        for key, value in mapping.items():
            self.set(key, value)

    def get_serialized(self, key: str) -> bytes | NoValueType:
        self._read_serialized = True
        found = self.get_serialized_stamped(key, as_bytes=self._handed_cached_values)
        return found[0] if found is not NO_VALUE else NO_VALUE

    def get_serialized_stamped(
        self, key: str, count: bool = True, as_bytes: bool = False
    ) -> tuple[bytes, float] | NoValueType:
        """Like :meth:`get_serialized`, plus when this cache stored the bytes.

        A tier above this cache (``dogpile_fsbackend.tiered``) judges whether
        it may still trust a local copy by that time; with ``count=False`` it
        looks at a copy without that look counting as a hit or a miss.  A value
        stored as a CachedValue is a miss, unless ``as_bytes`` (see
        ``_handed_cached_values``) asks for it as dogpile's pickled bytes.
        """
        key_bytes = checked_key(key)
        record = self.store.read_record(layout.key_digest(key_bytes), key_bytes)
        payload = None
        if record is not None and record.form == records.FORM_SERIALIZED:
            payload = record.payload
        elif record is not None and as_bytes:
            payload = _as_dogpile_bytes(record.payload)
        if count:
            self._count(key, payload is not None)
        return (payload, record.created) if record and payload is not None else NO_VALUE

    def get_serialized_multi(self, keys: Iterable[str]) -> list[bytes | NoValueType]:
        return [self.get_serialized(key) for key in keys]

    def set_serialized(self, key: str, value: bytes) -> None:
        self._put(key, value, records.FORM_SERIALIZED)

    def _put(self, key: str, payload: bytes, form: int) -> None:
        key_bytes = checked_key(key)
        digest = layout.key_digest(key_bytes)
        if not self.store.writable:  # refused like any set, too large or not
            self._refuse_set(key)
            return
        data = records.encode(records.KIND_PICKLED, key_bytes, payload, time.time(), form)
        if not self._fits(key, len(data)):
            return
        self._write(key, lambda: self.store.write_and_publish(digest, data))

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
    creator left its file; the call that runs the creator gets the creator's own
    object back from dogpile, not a reader.  With ``file_movable=True`` a named
    file on the cache's filesystem is renamed into the cache instead of copied;
    it then *is* the cached value, so do not write to it after ``set()`` (a
    changed length makes the entry a miss).  The arguments (``:param:`` below,
    from ``config.ARGUMENT_DOCS``) are the pickled backend's plus ``file_movable``.
    """

    _kind = records.KIND_RAW
    _accepted_arguments = SETTING_NAMES

    def get(self, key: str) -> CachedValue | Any:
        key_bytes = checked_key(key)
        digest = layout.key_digest(key_bytes)
        value = self._open(digest, key_bytes)
        self._count(key, value is not NO_VALUE)
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
        self._count(None, value is not NO_VALUE)
        return value

    def _open(self, digest: str, key_bytes: bytes | None) -> Any:
        record = self.store.read_record(digest, key_bytes)
        if record is None:
            return NO_VALUE
        try:
            meta = records.RawMeta.from_bytes(record.payload)
            data_path = self.store.layout.data_path(digest, meta.token)
            reader = rawfiles.open_cached(
                data_path, meta, record.created, quiet=not self.store.writable
            )
        except (records.DamagedRecord, FileNotFoundError):
            # Only the record we read: a no-op if a writer replaced it since.
            self.store.discard_unusable(digest, record=record)
            return NO_VALUE
        if meta.metadata is None:
            return reader
        return CachedValue(reader, meta.metadata)

    def get_multi(self, keys: Iterable[str]) -> list[Any]:
        return [self.get(key) for key in keys]

    def set(self, key: str, value: Any) -> None:
        metadata = None
        if isinstance(value, CachedValue):
            value, metadata = value.payload, value.metadata
        fileobj, filename, content_type = rawfiles.unwrap(value)
        key_bytes = checked_key(key)
        if not self.store.writable:
            self._refuse_set(key)
            return
        digest = layout.key_digest(key_bytes)
        created = time.time()

        def encode_record(token: str, size: int, position: int) -> bytes:
            meta = records.RawMeta(token, size, position, metadata, filename, content_type)
            return records.encode(records.KIND_RAW, key_bytes, meta.to_bytes(), created)

        largest_record = len(encode_record("0" * layout.TOKEN_LEN, self.room(), self.room()))
        source = rawfiles.inspect(fileobj)
        known_size = source.size
        # Refuse before a byte is copied or the caller's file is moved.
        if known_size is not None and not self._fits(key, known_size + largest_record):
            return

        def attempt() -> None:
            if self.settings.file_movable and self._moved_in(digest, source, encode_record):
                return
            data_fd, data_temp = self.store.open_temp(digest)
            try:
                try:
                    size, position = rawfiles.stage(
                        source, data_fd, limit=max(0, self.room() - largest_record)
                    )
                    self.store.sync_if_asked(data_fd)
                finally:
                    os.close(data_fd)
            except rawfiles.TooLarge as exc:  # a stream: stopped as soon as it could not fit
                remove_quietly(data_temp)
                self._fits(key, exc.size + largest_record, at_least=True)
                return
            except BaseException:
                remove_quietly(data_temp)
                raise
            data = DataFile(data_temp, layout.new_token())
            record = encode_record(data.token, size, position)
            if not self._fits(key, size + len(record)):  # a file that grew meanwhile
                remove_quietly(data_temp)
                return
            self.store.publish_raw(digest, data, size, record)

        # A stream read part-way cannot be read again: retry only what can be re-read.
        self._write(key, attempt, retry=source.can_reread)

    def _moved_in(
        self, digest: str, source: rawfiles.Source, encode_record: Callable[[str, int, int], bytes]
    ) -> bool:
        """Publish the caller's file itself (``file_movable``); False if it must be copied.

        Its size was known, and checked against the limit, before: a moved file
        is not read, so what it holds is what its ``fstat`` said.
        """
        settings = self.settings
        move = rawfiles.movable(source, settings.base_dir, self.store.data_dev, settings.file_mode)
        if move is None or source.size is None:
            return False
        size = source.size
        self.store.sync_if_asked(move.fd)
        data = DataFile(move.name, layout.new_token(), move)
        record = encode_record(data.token, size, min(source.position or 0, size))
        return self.store.publish_raw(digest, data, size, record)

    def set_multi(self, mapping: Mapping[str, Any]) -> None:
        for key, value in mapping.items():
            self.set(key, value)

    # -- for a tier above this cache (rawtiered.py) ---------------------------

    def peek(self, key: str) -> CachedValue | Any:
        """Like :meth:`get`, but not counted as a lookup (a tier reading back what it stored).

        A hit still counts as a use for LRU eviction.
        """
        key_bytes = checked_key(key)
        return self._open(layout.key_digest(key_bytes), key_bytes)

    def set_incoming(
        self, key: str, meta: records.RawMeta, created: float, fill: Callable[[int], None]
    ) -> CachedValue | Any:
        """Make the bytes that ``fill(fd)`` writes the entry of ``key``, described by ``meta``.

        For bytes that arrive from elsewhere (another host's entry, from a
        bucket): ``fill`` writes them to the descriptor of a fresh temp file in
        the entry's own directory, which is then published like any raw write
        (a rename: never a second copy), keeping ``meta``'s token, position,
        metadata, file name and content type and ``created`` as the entry's
        time.  A write of another length than ``meta.size`` raises ValueError
        and publishes nothing; so does whatever ``fill`` raises.  Returns the
        new entry as :meth:`peek` would, or NO_VALUE when it was not stored (a
        value too big for this cache, or a failed write with
        ``write_errors="log"``).
        """
        key_bytes = checked_key(key)
        digest = layout.key_digest(key_bytes)
        record = records.encode(records.KIND_RAW, key_bytes, meta.to_bytes(), created)
        if not self._fits(key, meta.size + len(record)):
            return NO_VALUE
        stored = False

        def attempt() -> None:
            nonlocal stored
            data_fd, data_temp = self.store.open_temp(digest)
            try:
                try:
                    fill(data_fd)
                    written = os.fstat(data_fd).st_size
                    self.store.sync_if_asked(data_fd)
                finally:
                    os.close(data_fd)
                if written != meta.size:
                    raise ValueError(f"{written} bytes arrived for an entry of {meta.size}")
            except BaseException:
                remove_quietly(data_temp)
                raise
            self.store.publish_raw(digest, DataFile(data_temp, meta.token), meta.size, record)
            stored = True

        self._write(key, attempt, retry=False)  # the bytes arrive once: nothing to re-read
        return self._open(digest, key_bytes) if stored else NO_VALUE


for _backend in (PickleFSBackend, RawFSBackend):
    _backend.__doc__ = documented(_backend.__doc__, _backend._accepted_arguments)
