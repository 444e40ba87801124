"""Several hosts for large files: this host's raw cache in front of a shared S3 bucket.

``dogpile_fsbackend.raw_tiered``.  A set stores the file in the local tier
first (a copy, or a rename with ``file_movable``), then streams *that cached
copy* to the bucket.  A local miss streams the object into a temp file in the
cache directory and publishes it there (a rename, never a second copy), with
the creator's token, time, position, file name and content type, so every
host hands out a :class:`CachedFileReader` with the same attributes.  Every
download is checked byte for byte (length and CRC32, see s3tier.py) before
it is published.  One creator across hosts: this host's kernel lock, then the
lock of ``lock_backend`` (tierlock.py).  Outages of the bucket and of the lock
backend go through a :class:`RemoteGuard` each (remote.py).

**Freshness.**  A host serves its local copy until it is deleted or evicted
here; with ``local_expiration_time`` it checks an older copy against the
bucket (one HEAD request: the same token keeps the copy, another one fetches
the new object).  The copy's age is its data file's mtime: set when the bytes
were written (copied, moved in or downloaded) and again at each such check;
the cache itself dates entries by their records, never by their data files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, cast

from dogpile.cache.api import NO_VALUE, CacheBackend, CachedValue, CacheMutex

from . import layout, rawfiles, redisremote
from .backends import RawFSBackend, checked_key
from .config import parse_seconds
from .exceptions import ConfigError, RemoteConfigWarning
from .rawfiles import CachedFileReader
from .records import HEADER_SIZE, RawMeta
from .remote import OUTAGE, RemoteGuard, describe, load_backend
from .s3tier import (
    Bucket,
    DamagedObject,
    Description,
    RemoteObject,
    check_describable,
    file_crc32,
    parse_part_size,
)
from .tierconfig import (
    OUTAGE_DEFAULTS,
    OUTAGE_PARSERS,
    as_config,
    has_tier,
    local_tier,
    nest_dotted,
    parse_top_level,
    sub_config,
    tier_arguments,
    top_level_of_config,
)
from .tierlock import tier_mutex

log = logging.getLogger(__name__)

__all__ = ["RawTieredBackend"]

TIERS = ("local", "s3", "lock")
_RECORD_ROOM = 4096  # more than any record needs besides its key (checked by set_incoming)


def _bucket_name(name: str, value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # an ini "bucket = 2024" arrives as an int
    if not isinstance(value, str) or not value or "/" in value:
        raise ConfigError(name, "the name of an existing bucket, e.g. 'myapp-cache'", value)
    return value


def _prefix(name: str, value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or len(value.encode("utf-8", "surrogatepass")) > 900:
        raise ConfigError(name, "a string of at most 900 bytes, e.g. 'files/' (or '')", value)
    return value


def _lock_backend_name(name: str, value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    load_backend(value, name)  # checks that it names an installed backend
    return str(value)


def _concurrency(name: str, value: Any) -> int:
    number = int(value) if isinstance(value, str) and value.strip().isdigit() else value
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 64:
        raise ConfigError(name, "an integer from 1 to 64", value)
    return number


PARSERS = {
    **OUTAGE_PARSERS,
    "bucket": _bucket_name,
    "prefix": _prefix,
    "lock_backend": _lock_backend_name,
    "local_expiration_time": parse_seconds,
    "part_size": parse_part_size,
    "concurrency": _concurrency,
}
DEFAULTS = {
    **OUTAGE_DEFAULTS,
    "prefix": "",
    "lock_backend": None,
    "local_expiration_time": None,
    "part_size": 16 * 1024**2,
    "concurrency": 4,
}


class _Interrupted(Exception):
    """A bucket error while bytes were being written locally, carried past the local
    tier's handling of OSError (some botocore errors are OSErrors)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(cause)
        self.cause = cause


class RawTieredBackend(CacheBackend):
    """This host's raw cache (``dogpile_fsbackend.raw``) in front of a shared S3 bucket.

    Basic usage::

        files = make_region().configure(
            "dogpile_fsbackend.raw_tiered",
            arguments={
                "local": {"base_dir": "/var/cache/myapp-files", "file_movable": True,
                          "cache_size": "50GiB"},
                "bucket": "myapp-cache", "prefix": "files/",
                "s3": {"endpoint_url": "https://s3.example.net", "region_name": "eu-west-1"},
                "lock_backend": "dogpile.cache.redis",
                "lock": {"url": "redis://cache:6379/0", "lock_timeout": 600},
                "remote_errors": "raise",
            },
        )

    Values are what the raw backend takes, and a hit is a
    :class:`CachedFileReader`, on whichever host it was created.  Needs the
    ``[s3]`` extra (boto3).

    :param local: the local tier's arguments (those of ``dogpile_fsbackend.raw``).
    :param bucket: the bucket, which must exist.  Required.
    :param prefix: put before every object name (default ``""``); objects are
     named ``<prefix><sha256 hex of the key>``.
    :param s3: boto3 ``client("s3", ...)`` arguments (``endpoint_url``,
     ``region_name``, credentials, ``config``: a botocore ``Config`` or a dict
     of its arguments).  The tier's defaults under yours: SigV4, 2 s connect
     and 30 s read timeouts, one retry.
    :param lock_backend: a dogpile backend by name whose distributed mutex makes
     one creator across hosts (``"dogpile.cache.redis"``); only its mutex is
     used.  Default ``None``: one creator per host (logged).
    :param lock: the lock backend's arguments (``distributed_lock`` is on unless
     given; for Redis the tier's bounded timeouts apply, as in ``tiered``).
    :param local_expiration_time: seconds a local copy is served before it is
     checked against the bucket again (one HEAD request).  Default ``None``:
     until deleted or evicted here.
    :param part_size: bytes per multipart part, at least 5 MiB (default 16 MiB).
    :param concurrency: parts uploaded at once (default 4).
    :param remote_errors: ``"raise"`` (default): a failed bucket or lock call
     raises :class:`RemoteError` naming it; ``"degrade"``: serve and write
     locally, with local locks, until it answers again (logged once).
    :param remote_backoff: seconds without calls after a failure (default 1),
     doubling on each failed probe up to ``remote_backoff_max`` (default 30).

    .. versionadded:: 0.2.0
    """

    def __init__(self, arguments: Mapping[str, Any]) -> None:
        settings = _parse(arguments, local_given=has_tier(arguments, "local"))
        local_arguments = tier_arguments(arguments, "local")
        local = local_tier(lambda: RawFSBackend(local_arguments))
        lock = None
        lock_arguments: dict[str, Any] = {}
        if settings["lock_backend"] is not None:
            lock_class = load_backend(settings["lock_backend"], "lock_backend")
            lock_arguments = _lock_arguments(lock_class, tier_arguments(arguments, "lock"))
            lock = lock_class(lock_arguments)
        self._setup(settings, local, tier_arguments(arguments, "s3"), lock, lock_arguments)

    @classmethod
    def from_config_dict(cls, config_dict: Mapping[str, Any], prefix: str) -> RawTieredBackend:
        """From ``configure_from_config``: ``<prefix>local.*``, ``<prefix>s3.*`` and
        ``<prefix>lock.*`` keys go to each tier (the local tier and the lock backend
        coerce their own strings; ``s3.config.*`` keys become botocore's Config)."""
        local_prefix, lock_prefix = f"{prefix}local.", f"{prefix}lock."
        settings = _parse(
            top_level_of_config(config_dict, prefix),
            local_given=any(key.startswith(local_prefix) for key in config_dict),
        )
        local_config = as_config(sub_config(config_dict, local_prefix), local_prefix)
        local = local_tier(
            lambda: cast(RawFSBackend, RawFSBackend.from_config_dict(local_config, local_prefix))
        )
        lock = None
        lock_arguments: dict[str, Any] = {}
        if settings["lock_backend"] is not None:
            lock_class = load_backend(settings["lock_backend"], "lock_backend")
            lock_arguments = _lock_arguments(lock_class, sub_config(config_dict, lock_prefix))
            lock = lock_class.from_config_dict(as_config(lock_arguments, lock_prefix), lock_prefix)
        backend = cls.__new__(cls)
        s3_arguments = nest_dotted(sub_config(config_dict, f"{prefix}s3."))
        backend._setup(settings, local, s3_arguments, lock, lock_arguments)
        return backend

    def _setup(
        self,
        settings: Mapping[str, Any],
        local: RawFSBackend,
        s3_arguments: Mapping[str, Any],
        lock: CacheBackend | None,
        lock_arguments: Mapping[str, Any],
    ) -> None:
        self.local = local
        self.bucket = Bucket(
            settings["bucket"],
            settings["prefix"],
            s3_arguments,
            settings["part_size"],
            settings["concurrency"],
        )
        outage = (
            settings["remote_errors"],
            settings["remote_backoff"],
            settings["remote_backoff_max"],
        )
        self.guard = RemoteGuard(repr(self.bucket), self.bucket.error_types(), *outage)
        self.lock = lock
        self.lock_guard: RemoteGuard | None = None
        self._lock_expired: tuple[type[BaseException], ...] = ()
        if lock is not None:
            name = describe(settings["lock_backend"], lock_arguments)
            error_types = redisremote.error_types(lock)
            self.lock_guard = RemoteGuard(name, error_types, *outage)
            self._lock_expired = redisremote.lock_expired_errors(lock)
        self.local_expiration_time: float | None = settings["local_expiration_time"]
        self.local_hits = self.remote_hits = self.misses = self.revalidations = 0
        self.uploads = self.damaged_objects = self.uncached_hits = 0
        self._warn_pitfalls()

    def _warn_pitfalls(self) -> None:
        if self.lock is None:  # a choice one may make (no Redis around): said, not warned
            log.warning(
                "dogpile_fsbackend.raw_tiered (%s): no lock_backend, so every host may run "
                "the creator of a key at the same time (one creator per host); give "
                "lock_backend='dogpile.cache.redis' and its 'lock' for one across hosts",
                self.guard.name,
            )
            return
        for message in redisremote.pitfalls(self.lock, "both"):
            log.warning("dogpile_fsbackend.raw_tiered (%s): %s", self.guard.name, message)
            warnings.warn(message, RemoteConfigWarning, stacklevel=5)

    # -- reads ----------------------------------------------------------------------

    def get(self, key: str) -> CachedValue | Any:
        value = self.local.get(key)
        if value is NO_VALUE:
            return self._fetch(key, checked_key(key))
        if self._is_fresh(value):
            self.local_hits += 1
            return value
        return self._revalidate(key, value)

    def get_multi(self, keys: Iterable[str]) -> list[Any]:
        return [self.get(key) for key in keys]

    def get_by_digest(self, digest: str, token: str | None = None) -> CachedValue | Any:
        """Like :meth:`get`, for a caller that has only the key's SHA-256 hex (a URL).

        A local miss fetches the object as :meth:`get` does; an object whose key
        was too long for its metadata is served without being kept.  Given the
        ``token`` of a write (a URL names one), a local copy of another write is
        replaced by the bucket's object if that is the write named.
        """
        value = self.local.get_by_digest(digest)
        if value is not NO_VALUE:
            if token is None or _reader_of(value).etag == f'"{token}"':
                self.local_hits += 1
                return value
            description = self.describe_remote(digest)
            if description is None or description.meta.token != token:
                return value  # the caller sees that it is not the write it asked for
            _reader_of(value).close()
        if layout.split_entry_name(digest) != (digest, None):
            return NO_VALUE
        found = self.guard.call(self._download, None, None, digest)
        return NO_VALUE if found is OUTAGE else found

    def describe_remote(self, digest: str) -> Description | None:
        """The bucket's description of the entry ``digest`` (a HEAD), without its bytes.

        None if it is missing, not ours, or (``remote_errors="degrade"``) the
        bucket is out.
        """
        if layout.split_entry_name(digest) != (digest, None):
            return None
        found = self.guard.call(self.bucket.describe, digest)
        return None if found is OUTAGE else found

    def presigned_url(
        self,
        digest: str,
        method: str = "GET",
        expires_in: int = 3600,
        cache_control: str | None = None,
    ) -> str:
        """A URL of the object of ``digest`` that anyone may fetch for ``expires_in`` s.

        ``method`` is ``"GET"`` or ``"HEAD"`` (a SigV4 URL is for one method);
        ``cache_control`` becomes the response's Cache-Control.
        """
        return self.bucket.presigned_url(digest, method, expires_in, cache_control)

    def _fetch(self, key: str, key_bytes: bytes) -> CachedValue | Any:
        found = self.guard.call(self._download, key, key_bytes, layout.key_digest(key_bytes))
        return NO_VALUE if found is OUTAGE else found

    def _download(self, key: str | None, key_bytes: bytes | None, digest: str) -> Any:
        """The object of ``digest``, checked and published locally; NO_VALUE if missing.

        An object the local tier cannot keep (bigger than it, or fetched by
        digest with no key to file it under) is served from an unnamed temp
        file instead, gone when closed.
        """
        remote = self.bucket.open(digest, key_bytes)
        if remote is None:
            self.misses += 1
            return NO_VALUE
        with remote:
            description = remote.description
            key_bytes = key_bytes or description.key
            if key is None and key_bytes is not None:
                key = key_bytes.decode("utf-8", "surrogatepass")
            try:
                if key is None or not self._fits_locally(description, key_bytes or b""):
                    value = self._unnamed_copy(remote)
                else:
                    value = self._publish(key, remote)
            except DamagedObject as exc:
                self.damaged_objects += 1
                log.warning("%s: a miss, not published: %s", self.bucket, exc)
                return NO_VALUE
        if value is not NO_VALUE:
            self.remote_hits += 1
        return value

    def _publish(self, key: str, remote: RemoteObject) -> Any:
        def fill(fd: int) -> None:
            try:
                remote.copy_to(fd)
            except self.guard.error_types as exc:
                raise _Interrupted(exc) from exc

        description = remote.description
        try:
            return self.local.set_incoming(key, description.meta, description.created, fill)
        except _Interrupted as exc:
            raise exc.cause from None  # the guard counts the outage

    def _unnamed_copy(self, remote: RemoteObject) -> Any:
        description = remote.description
        # Unnamed (O_TMPFILE where the filesystem has it): gone when the reader closes.
        handle = tempfile.TemporaryFile(dir=self.local.settings.base_dir, buffering=0)  # noqa: SIM115
        try:
            remote.copy_to(handle.fileno())
            reader = rawfiles.reader_over(handle, description.meta, description.created)
        except BaseException:
            handle.close()
            raise
        self.uncached_hits += 1
        metadata = description.meta.metadata
        return reader if metadata is None else CachedValue(reader, metadata)

    def _fits_locally(self, description: Description, key_bytes: bytes) -> bool:
        return description.meta.size + HEADER_SIZE + len(key_bytes) + _RECORD_ROOM <= (
            self.local.room()
        )

    def _is_fresh(self, value: Any) -> bool:
        if self.local_expiration_time is None:
            return True
        reader = _reader_of(value)
        return os.fstat(reader.fileno()).st_mtime >= time.time() - self.local_expiration_time

    def _revalidate(self, key: str, value: Any) -> Any:
        """A local copy older than local_expiration_time: still the bucket's object?"""
        reader = _reader_of(value)
        key_bytes = checked_key(key)
        description = self.guard.call(self.bucket.describe, layout.key_digest(key_bytes))
        if description is OUTAGE:  # degrade: this host's copy is what there is
            self.local_hits += 1
            return value
        self.revalidations += 1
        if description is not None and f'"{description.meta.token}"' == reader.etag:
            with contextlib.suppress(OSError):  # not ours to stamp: checked again next time
                os.utime(reader.fileno())
            self.local_hits += 1
            return value
        reader.close()
        self.local.delete(key)  # changed or deleted on another host
        if description is None:
            self.misses += 1
            return NO_VALUE
        return self._fetch(key, key_bytes)

    # -- writes ---------------------------------------------------------------------

    def set(self, key: str, value: Any) -> None:
        metadata = dict(value.metadata) if isinstance(value, CachedValue) else None
        payload = value.payload if isinstance(value, CachedValue) else value
        _, filename, content_type = rawfiles.unwrap(payload)
        check_describable(filename, content_type, metadata)  # before anything is stored
        self.local.set(key, value)
        key_bytes = checked_key(key)
        digest = layout.key_digest(key_bytes)
        stored = self.local.peek(key)
        if stored is NO_VALUE:  # not cached here (too big, or a logged write error)
            self.guard.call(self.bucket.delete, digest)  # the old object must not outlive it
            return
        with _reader_of(stored) as reader:
            meta = RawMeta(
                reader.etag.strip('"'),
                reader.content_length,
                reader.tell(),
                metadata,
                reader.filename,
                reader.content_type,
            )
            try:
                uploaded = self.guard.call(self._upload, digest, reader, meta, key_bytes)
            except DamagedObject as exc:  # the caller wrote to its moved file after set()
                log.warning("%s: key %r was not uploaded: %s", self.bucket, key[:80], exc)
                return
            if uploaded is not OUTAGE:
                self.uploads += 1

    def _upload(
        self, digest: str, reader: CachedFileReader, meta: RawMeta, key_bytes: bytes
    ) -> None:
        """Stream this host's cached copy to the bucket, described and checksummed."""
        crc32 = file_crc32(reader.fileno(), meta.size)
        description = Description(meta, reader.last_modified, crc32, key_bytes)
        self.bucket.upload(digest, reader.fileno(), description)

    def set_multi(self, mapping: Mapping[str, Any]) -> None:
        for key, value in mapping.items():
            self.set(key, value)

    def delete(self, key: str) -> None:
        """Remove the object and this host's copy (the copy even if the bucket failed)."""
        try:
            self.guard.call(self.bucket.delete, layout.key_digest(checked_key(key)))
        finally:
            self.local.delete(key)

    def delete_multi(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.delete(key)

    # -- locks ----------------------------------------------------------------------

    def get_mutex(self, key: str) -> CacheMutex | None:
        local = self.local.get_mutex(key)
        if self.lock is None or self.lock_guard is None:
            return local
        digest = layout.key_digest(checked_key(key))
        remote = self.lock.get_mutex(f"dogpile_fsbackend:raw_tiered:{self.bucket.name}:{digest}")
        return tier_mutex(
            "both",
            local,
            remote,
            self.lock_guard,
            self._lock_expired,
            lambda since: self._written_since(key, since),
        )

    def _written_since(self, key: str, since: float) -> bool:
        """True if this host's copy of ``key`` was written at or after ``since``."""
        stored = self.local.peek(key)
        if stored is NO_VALUE:
            return False
        with _reader_of(stored) as reader:
            return os.fstat(reader.fileno()).st_mtime >= since

    def has_lock_timeout(self) -> bool:
        """True if the lock backend's lock can expire while held (then two creators may run)."""
        return self.lock is not None and redisremote.lock_can_expire(self.lock)

    # -- maintenance: this host's tier ------------------------------------------------

    def prune(self) -> Any:
        """Prune this host's local tier (the bucket expires by its lifecycle rules)."""
        return self.local.prune()

    def verify(self) -> Any:
        """Verify this host's local tier."""
        return self.local.verify()

    def clear(self) -> Any:
        """Clear this host's local tier (the bucket's objects stay: they are shared)."""
        return self.local.clear()

    def stats(self) -> dict[str, Any]:
        """The local tier's figures, this instance's tier counters, and both remotes' health."""
        figures: dict[str, Any] = dict(self.local.stats())
        figures.update(
            local_hits=self.local_hits,
            remote_hits=self.remote_hits,
            tier_misses=self.misses,
            revalidations=self.revalidations,
            uploads=self.uploads,
            damaged_objects=self.damaged_objects,
            uncached_hits=self.uncached_hits,
            **self.guard.stats(),
        )
        if self.lock_guard is not None:
            figures.update(
                {
                    name.replace("remote_", "lock_"): value
                    for name, value in self.lock_guard.stats().items()
                }
            )
        return figures


def _reader_of(value: Any) -> CachedFileReader:
    reader: CachedFileReader = value.payload if isinstance(value, CachedValue) else value
    return reader


def _parse(arguments: Mapping[str, Any], local_given: bool) -> dict[str, Any]:
    if not local_given:
        raise ConfigError(
            "local", "given: a dict of the local tier's arguments (base_dir, ...)", None
        )
    if "bucket" not in arguments:
        raise ConfigError("bucket", "given: the name of an existing bucket", None)
    return parse_top_level(arguments, PARSERS, DEFAULTS, TIERS)


def _lock_arguments(
    lock_class: type[CacheBackend], arguments: Mapping[str, Any]
) -> dict[str, Any]:
    """The lock backend's arguments: its distributed lock on, and a tier's Redis defaults."""
    found = {"distributed_lock": True, **arguments}
    return redisremote.with_defaults(lock_class, found)
