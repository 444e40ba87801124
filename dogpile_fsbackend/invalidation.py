"""Region invalidation that every process using one directory sees.

dogpile keeps ``region.invalidate()`` in the memory of one process (its
``DefaultInvalidationStrategy``).  :class:`SharedInvalidation` keeps it in one
32-byte file, ``invalidation``, in a directory the processes share: the
cache's ``base_dir``, or any directory (one invalidation for several regions).

What is stored is the time of the latest soft and of the latest hard
invalidation.  Each only moves forward and a merge keeps the later time of
each kind, so merges commute and repeat harmlessly: concurrent writers, or
hosts exchanging times, never undo each other.  dogpile's meaning follows: the
later of the two times is *the* invalidation time and its kind says whether
it was hard, which is exactly what ``DefaultInvalidationStrategy`` remembers
of the last ``invalidate()`` call.

The file (big-endian)::

    0   8   magic b"dpfsinv\\n"
    8   2   format version (1)
    10  2   flags (0)
    12  8   latest soft invalidation, ns since the epoch (0: never)
    20  8   latest hard invalidation, ns since the epoch (0: never)
    28  4   CRC32 of bytes 0-27

Writers hold ``invalidation.lock`` (``flock``) while they read the file,
merge, write ``invalidation.tmp``, fsync it and rename it over
``invalidation``: a reader sees the old record or the new one, and no update
of either kind is lost.

Readers take no lock.  A check is one ``lstat`` of the path, compared with
the inode, device, ctime and size of the file read last.  That file's
descriptor stays open, so its inode number cannot be given to a later
version: a replaced file always looks different, and only then is the file
opened and read.  Checking by path, rather than reading a kept descriptor,
also sees a file that anyone deleted or replaced.

What a reader makes of what it finds (``README``, "Shared invalidation"):

* no file: no invalidation; or, when this process already honours some, it
  keeps them and writes them back, so that a tmp cleaner or a stray ``rm``
  cannot revive old values in processes started later;
* anything that is not a valid record (damaged, truncated, huge, foreign, a
  newer format, a FIFO, a symlink, unreadable): a hard invalidation at the
  moment this process first saw it, logged once.  The process then writes
  what it honours over it, so that later processes agree -- unless the file
  is not ours to replace (foreign content, a newer format, a directory);
* a time in the future (another host's clock, a clock stepped back): the
  moment this process first saw it, written down the same way.

What a process honours never moves back (but for a time in the future, to now): it
is merged with every file read, and no time in the future is ever written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import math
import os
import stat
import struct
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol

from dogpile.cache.region import RegionInvalidationStrategy

from . import forking, layout
from .config import parse_base_dir, parse_mode
from .exceptions import ConfigError, FSBackendError
from .files import lock_retries, make_dir, pread_fully

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_MAGIC = b"dpfsinv\n"
_HEAD = struct.Struct(">8sHHqq")  # magic, version, flags, soft ns, hard ns
_CRC = struct.Struct(">I")
RECORD_SIZE = _HEAD.size + _CRC.size
_DEFAULT_FILE_MODE = 0o600
_NS_MAX = 2**63 - 1
# O_NONBLOCK: a FIFO swapped in for the file must not hang a reader.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MISSING_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR})
# What the file (or its directory) does to a reader, as opposed to the process's own
# trouble (EMFILE, ENOMEM), which propagates.  EWOULDBLOCK: another process holds a
# write lease (fcntl F_SETLEASE) on the file, and O_NONBLOCK opens do not wait for it.
_UNREADABLE_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.ELOOP,
        errno.EIO,
        errno.ENXIO,
        errno.ENAMETOOLONG,
        errno.EWOULDBLOCK,
    }
)
# dogpile's get_or_create asks is_hard_invalidated(ct), then is_soft_invalidated(ct):
# the second answer comes from the first one's check if it follows within this time.
_PAIR_NS = 10_000_000
LOCK_WAIT = 10.0  # seconds an invalidation waits for another writer (who needs a few ms)
_MISSING: tuple[Any, ...] = ("missing",)
_NOT_LOOKED: tuple[Any, ...] = ("not looked yet",)


@dataclasses.dataclass(frozen=True)
class InvalidationTimes:
    """When each kind of invalidation last happened, in ns since the epoch (0: never)."""

    soft_ns: int = 0
    hard_ns: int = 0

    def __post_init__(self) -> None:
        for name in ("soft_ns", "hard_ns"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _NS_MAX:
                raise ConfigError(name, "an int of nanoseconds since the epoch (0: never)", value)

    def merged(self, other: InvalidationTimes) -> InvalidationTimes:
        """The later time of each kind: order and repetition of merges do not matter."""
        return InvalidationTimes(
            max(self.soft_ns, other.soft_ns), max(self.hard_ns, other.hard_ns)
        )

    def clamped(self, now_ns: int) -> InvalidationTimes:
        """Times after ``now_ns`` (a clock ahead of ours) taken as ``now_ns``."""
        return InvalidationTimes(min(self.soft_ns, now_ns), min(self.hard_ns, now_ns))

    @property
    def latest_ns(self) -> int:
        """The invalidation time in dogpile's sense: the later of the two (0: never)."""
        return max(self.soft_ns, self.hard_ns)

    @property
    def hard(self) -> bool:
        """True if the latest invalidation was hard (a tie counts as hard)."""
        return self.hard_ns > 0 and self.hard_ns >= self.soft_ns

    @property
    def soft_at(self) -> float | None:
        """The latest soft invalidation as a POSIX timestamp, or None."""
        return self.soft_ns / 1e9 if self.soft_ns else None

    @property
    def hard_at(self) -> float | None:
        """The latest hard invalidation as a POSIX timestamp, or None."""
        return self.hard_ns / 1e9 if self.hard_ns else None


def encode(times: InvalidationTimes) -> bytes:
    head = _HEAD.pack(_MAGIC, FORMAT_VERSION, 0, times.soft_ns, times.hard_ns)
    return head + _CRC.pack(zlib.crc32(head))


class _Decoded(NamedTuple):
    times: InvalidationTimes | None  # the record, if the bytes are a valid one
    problem: str | None  # why they are not
    refusal: str | None  # why a writer must not replace them (not ours to delete)


def decode(data: bytes, size: int) -> _Decoded:
    """Read the first bytes of a file of ``size`` bytes as an invalidation record."""
    if data[: len(_MAGIC)] != _MAGIC[: len(data)]:
        problem = "is not a dogpile_fsbackend invalidation file"
        return _Decoded(None, problem, problem)
    if len(data) >= _HEAD.size:
        version = _HEAD.unpack_from(data)[1]
        if version > FORMAT_VERSION:
            problem = (
                f"holds invalidation format version {version} "
                f"(this version of dogpile_fsbackend reads {FORMAT_VERSION})"
            )
            return _Decoded(None, problem, problem)
    if size != RECORD_SIZE or len(data) != RECORD_SIZE:
        return _Decoded(None, f"is truncated or damaged ({size} bytes, not {RECORD_SIZE})", None)
    _, version, flags, soft_ns, hard_ns = _HEAD.unpack_from(data)
    if _CRC.unpack_from(data, _HEAD.size)[0] != zlib.crc32(data[: _HEAD.size]):
        return _Decoded(None, "is damaged (checksum mismatch)", None)
    if version != FORMAT_VERSION or flags or soft_ns < 0 or hard_ns < 0:
        return _Decoded(None, "is damaged (impossible field values)", None)
    return _Decoded(InvalidationTimes(soft_ns, hard_ns), None, None)


class _Found(NamedTuple):
    """What is at the file's path, and how to tell later whether it changed."""

    identity: tuple[Any, ...]
    times: InvalidationTimes | None
    problem: str | None  # why it is not a valid record (None if valid, or nothing there)
    refusal: str | None  # why a writer must not replace it
    regular: os.stat_result | None  # of the regular file there (a rewrite keeps its mode)
    fd: int  # the regular file read, still open (it pins the inode number); -1 if none


def _look(path: str) -> tuple[tuple[Any, ...], os.stat_result | None, str | None]:
    """One ``lstat``: (identity, stat result or None, why the path cannot be looked up)."""
    try:
        info = os.lstat(path)
    except OSError as exc:
        if exc.errno in _MISSING_ERRNOS:
            return _MISSING, None, None
        if exc.errno not in _UNREADABLE_ERRNOS:
            raise
        return ("error", exc.errno), None, f"cannot be looked up ({exc.strerror})"
    return (info.st_ino, info.st_dev, info.st_ctime_ns, info.st_size), info, None


def _read(path: str) -> _Found:
    """Classify what is at ``path``; a regular file is read (32 bytes at most) and kept open."""
    identity, info, problem = _look(path)
    if info is None:
        return _Found(identity, None, problem, None, None, -1)
    if not stat.S_ISREG(info.st_mode):
        # Never opened: a FIFO could block, a device could act on an open.
        kind = _file_kind(info.st_mode)
        refusal = f"is a {kind}" if stat.S_ISDIR(info.st_mode) else None
        return _Found(identity, None, f"is a {kind}, not a regular file", refusal, None, -1)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno in _MISSING_ERRNOS:
            return _Found(_MISSING, None, None, None, None, -1)
        if exc.errno not in _UNREADABLE_ERRNOS:
            raise
        return _Found(identity, None, f"cannot be opened ({exc.strerror})", None, info, -1)
    try:
        info = os.fstat(fd)
        identity = (info.st_ino, info.st_dev, info.st_ctime_ns, info.st_size)
        if not stat.S_ISREG(info.st_mode):  # swapped between lstat and open
            problem = f"is a {_file_kind(info.st_mode)}, not a regular file"
            return _Found(identity, None, problem, None, None, fd)
        try:
            data = pread_fully(fd, RECORD_SIZE)  # never more, however big the file
        except OSError as exc:
            if exc.errno not in _UNREADABLE_ERRNOS:
                raise
            return _Found(identity, None, f"cannot be read ({exc.strerror})", None, info, fd)
    except BaseException:
        os.close(fd)
        raise
    decoded = decode(data, info.st_size)
    return _Found(identity, decoded.times, decoded.problem, decoded.refusal, info, fd)


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return kind
    return "device"


def read_times(directory: str) -> tuple[InvalidationTimes | None, str | None]:
    """What ``directory``'s invalidation file holds, for display.

    ``(times, None)`` for a valid record, ``(None, problem)`` when it is not
    one, ``(None, None)`` when there is no file.
    """
    found = _read(os.path.join(directory, layout.INVALIDATION_NAME))
    _close(found.fd)
    return found.times, found.problem


def _close(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


class _Seen(NamedTuple):
    """What one process honours, and the look of the file it came from."""

    identity: tuple[Any, ...]
    times: InvalidationTimes
    fd: int  # the file read, kept open to pin its inode number; -1 if none
    invalidated_at: float  # the latest invalidation in seconds; -inf if never
    hard: bool  # the latest one was hard
    soft: bool  # the latest one was soft

    @classmethod
    def of(cls, identity: tuple[Any, ...], times: InvalidationTimes, fd: int) -> _Seen:
        latest = times.latest_ns
        return cls(
            identity,
            times,
            fd,
            latest / 1e9 if latest else -math.inf,
            times.hard,
            bool(latest) and not times.hard,
        )


class SharedInvalidation(RegionInvalidationStrategy):
    """A ``region_invalidator`` whose ``region.invalidate()`` every process sees.

    Basic usage::

        from dogpile.cache import make_region
        from dogpile_fsbackend import SharedInvalidation

        region = make_region().configure(
            "dogpile_fsbackend.pickled",
            expiration_time=3600,
            arguments={"base_dir": "/var/cache/myapp"},
            region_invalidator=SharedInvalidation("/var/cache/myapp"),
        )

        region.invalidate()            # hard: every process regenerates
        region.invalidate(hard=False)  # soft: old values served while one regenerates

    Every process, and every region, given the same directory honours the same
    invalidations, with the meaning dogpile gives soft and hard.  A check costs
    one ``lstat``, made on a cache hit (once per ``get_or_create``).  Operators
    can invalidate with ``dogpile-fsbackend invalidate DIR [--hard]``.

    :param directory: where the ``invalidation`` file lives: the cache's
     ``base_dir``, or any directory, which the first invalidation creates
     (with ``dir_mode``).  Nothing is created before that.
    :param file_mode: permissions of the files it creates.  Default ``None``:
     those of the cache's marker file when ``directory`` is a cache, else
     ``0o600``.  A replaced file keeps its mode (and, when root replaces it,
     its owner).
    :param dir_mode: permissions of ``directory`` if it has to be created;
     default ``0o700``.

    To carry invalidations to other hosts, a subclass sends :meth:`times`
    after each :meth:`invalidate` and passes what it receives to
    :meth:`merge`.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        file_mode: int | None = None,
        dir_mode: int = 0o700,
    ) -> None:
        self.directory = parse_base_dir("directory", directory)
        if os.path.lexists(self.directory) and not os.path.isdir(self.directory):
            raise ConfigError(
                "directory", "a directory (or a path where one can be made)", directory
            )
        self.file_mode = None if file_mode is None else parse_mode("file_mode", file_mode)
        self.dir_mode = parse_mode("dir_mode", dir_mode)
        self.path = os.path.join(self.directory, layout.INVALIDATION_NAME)
        self._seen = _Seen.of(_NOT_LOOKED, InvalidationTimes(), -1)
        self._refreshing = threading.Lock()
        self._pair = threading.local()
        _INSTANCES.add(self)
        forking.reset_in_children(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.directory!r})"

    def __del__(self) -> None:
        seen = getattr(self, "_seen", None)
        if seen is not None:
            _close(seen.fd)

    def _reset_after_fork(self) -> None:
        """A thread of the parent may have been refreshing at fork(): not in the child."""
        self._refreshing = threading.Lock()

    # -- dogpile's RegionInvalidationStrategy -----------------------------------

    def invalidate(self, hard: bool = True) -> None:
        """Invalidate now, for every process using the directory.

        This process honours it even if the file cannot be written (a
        read-only directory); the error is raised after that.
        """
        now = time.time_ns()
        times = InvalidationTimes(hard_ns=now) if hard else InvalidationTimes(soft_ns=now)
        self._honour(times)
        merged = self.merge(times)
        for announce in _announcers(self.directory):  # other hosts (tierinvalidation.py)
            announce(merged)

    def is_invalidated(self, timestamp: float) -> bool:
        return timestamp < self._check().invalidated_at

    def is_hard_invalidated(self, timestamp: float) -> bool:
        seen = self._check()
        self._pair.after_hard = (timestamp, seen, time.monotonic_ns() + _PAIR_NS)
        return seen.hard and timestamp < seen.invalidated_at

    def is_soft_invalidated(self, timestamp: float) -> bool:
        seen = self._paired(timestamp)
        return seen.soft and timestamp < seen.invalidated_at

    def was_hard_invalidated(self) -> bool:
        return self._check().hard

    def was_soft_invalidated(self) -> bool:
        return self._check().soft

    # -- sharing --------------------------------------------------------------

    def times(self) -> InvalidationTimes:
        """The invalidation times this process honours, after checking the file."""
        return self._check().times

    def merge(self, times: InvalidationTimes) -> InvalidationTimes:
        """Add ``times`` to the shared file; return what it holds now.

        Each kind keeps its later time, so merging the same times again, or
        merges in another order, change nothing: this is how invalidations
        received from other hosts come in.  Times in the future are taken as
        now.  Creates the directory if needed.
        """
        if not os.path.isdir(self.directory):
            os.makedirs(os.path.dirname(self.directory), exist_ok=True)
            with contextlib.suppress(FileExistsError):  # another process made it
                make_dir(self.directory, self.dir_mode)
        merged = self._publish(times)
        assert merged is not None  # only a rewrite gives up
        return merged

    # -- reading --------------------------------------------------------------

    def _check(self) -> _Seen:
        seen = self._seen
        if _look(self.path)[0] == seen.identity:
            return seen
        return self._refresh()

    def _paired(self, timestamp: float) -> _Seen:
        pair = getattr(self._pair, "after_hard", None)
        if pair is not None:
            self._pair.after_hard = None
            if pair[0] == timestamp and time.monotonic_ns() < pair[2]:
                seen: _Seen = pair[1]
                return seen
        return self._check()

    def _refresh(self) -> _Seen:
        with self._refreshing:
            previous = self._seen
            found = _read(self.path)
            if found.identity == previous.identity:  # another thread has just read it
                _close(found.fd)
                return previous
            now = time.time_ns()
            times = previous.times
            future = found.times is not None and found.times.latest_ns > now
            if found.times is not None:
                if future:
                    log.warning(
                        "%s holds an invalidation time in the future (another clock?); "
                        "honoured as of now",
                        self.path,
                    )
                times = times.merged(found.times)
            elif found.problem is not None:
                log.warning("%s %s; honoured as a hard invalidation now", self.path, found.problem)
                times = times.merged(InvalidationTimes(hard_ns=now))
            # Also what this process honours: the clock may have been stepped back since.
            times = times.clamped(now)
            self._seen = seen = _Seen.of(found.identity, times, found.fd)
            _close(previous.fd)
        gone = found.identity == _MISSING and times.latest_ns
        if (gone or future or found.problem is not None) and found.refusal is None:
            self._rewrite(found.identity)
        return seen

    def _honour(self, times: InvalidationTimes) -> None:
        with self._refreshing:
            seen = self._seen
            self._seen = _Seen.of(seen.identity, seen.times.merged(times), seen.fd)

    def _rewrite(self, judged: tuple[Any, ...]) -> None:
        """Write what this process honours over a deleted or damaged file.

        Processes started later then honour the same times instead of their
        own reading of the damage.  Best effort, and it never waits: another
        writer that holds the lock, or a file that changed since it was
        judged, is left alone.
        """
        try:
            if self._publish(InvalidationTimes(), only_over=judged) is not None:
                log.warning("%s rewritten with the invalidations this process honours", self.path)
        except (OSError, FSBackendError) as exc:
            log.warning("%s could not be rewritten: %s", self.path, exc)

    # -- writing --------------------------------------------------------------

    def _publish(
        self, times: InvalidationTimes, only_over: tuple[Any, ...] | None = None
    ) -> InvalidationTimes | None:
        """Under the lock: merge ``times`` and what we honour into the file.

        With ``only_over`` (the identity of what was judged), give up (None)
        rather than wait for the lock, or if the file is no longer that one.
        """
        with self._locked(wait=only_over is None) as locked:
            if not locked:
                return None
            found = _read(self.path)
            _close(found.fd)
            if only_over is not None and found.identity != only_over:
                return None
            if found.refusal:
                raise FSBackendError(
                    f"{self.path} {found.refusal}; move it away or use another directory"
                )
            now = time.time_ns()
            current = found.times or InvalidationTimes()
            merged = current.merged(times).merged(self._seen.times).clamped(now)
            if found.times != merged:
                self._write(merged, found.regular)
            return merged

    @contextlib.contextmanager
    def _locked(self, wait: bool) -> Iterator[bool]:
        """Hold the writers' lock; yields False if ``wait`` is false and it is taken.

        ``_WRITING`` is held from each try of the ``flock`` to its release, and
        ``fork()`` waits for it: a child forked meanwhile would inherit the locked
        descriptor and keep it locked.  The ``flock`` itself never blocks, so a
        fork waits for this process's own write, never for another process.
        A lock held past ``LOCK_WAIT`` (its holder stopped or hung) raises
        FSBackendError naming the lock file.
        """
        retries = lock_retries(LOCK_WAIT)
        while _WRITING.acquire(blocking=wait):
            try:
                fd = self._open_lock_file()
                try:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        pass
                    else:
                        yield True
                        return
                finally:
                    os.close(fd)  # drops the flock
            finally:
                _WRITING.release()
            if not wait:
                break
            if not next(retries, False):  # a pause before the next try, unless none is left
                raise FSBackendError(
                    f"{self._lock_path} has been held by another process for over "
                    f"{LOCK_WAIT:g} s (a stopped or hung process?): the invalidation was not "
                    "recorded; retry, or end the process that holds it (fuser shows it)"
                )
        yield False

    @property
    def _lock_path(self) -> str:
        return os.path.join(self.directory, layout.INVALIDATION_LOCK_NAME)

    def _open_lock_file(self) -> int:
        path = self._lock_path
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        mode = self._new_file_mode()
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, mode)
            created = True
        except FileExistsError:
            fd = os.open(path, flags)
            created = False
        try:
            if created:
                self._set_owner(fd, mode, None)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FSBackendError(f"{path} is not a regular file; move it away")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _write(self, times: InvalidationTimes, replacing: os.stat_result | None) -> None:
        """Replace the file by a record of ``times``: temp file, fsync, rename, fsync dir."""
        temp = os.path.join(self.directory, layout.INVALIDATION_TEMP_NAME)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)  # left by a writer that died (we hold the lock), or planted
        # A replaced file's mode is kept, but never one that would lock us out of it.
        mode = stat.S_IMODE(replacing.st_mode) | 0o600 if replacing else self._new_file_mode()
        fd = os.open(temp, _CREATE_FLAGS, mode)
        try:
            try:
                self._set_owner(fd, mode, replacing)
                view = memoryview(encode(times))
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        directory_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory_fd)  # the rename itself survives a power loss
        finally:
            os.close(directory_fd)

    def _new_file_mode(self) -> int:
        if self.file_mode is not None:
            return self.file_mode
        try:  # a cache's files all share the mode its backend was given
            marker = os.stat(os.path.join(self.directory, layout.MARKER_NAME))
        except OSError:
            return _DEFAULT_FILE_MODE
        return stat.S_IMODE(marker.st_mode)

    def _set_owner(self, fd: int, mode: int, like: os.stat_result | None) -> None:
        """Exactly ``mode`` (the umask may have removed bits); root also hands the file
        to the owner of the file it replaces, or of the directory, so an operator's
        ``sudo dogpile-fsbackend invalidate`` leaves files the applications can use."""
        os.fchmod(fd, mode)
        if os.geteuid() == 0:
            owner = like or os.stat(self.directory)
            os.fchown(fd, owner.st_uid, owner.st_gid)


# -- other hosts ------------------------------------------------------------------------

# Per directory (its real path), the tiers that carry this process's invalidations to
# other hosts: weak, so that a backend no longer used stops announcing.
_ANNOUNCERS: dict[str, weakref.WeakSet[Announcer]] = {}
_ANNOUNCERS_GUARD = threading.Lock()
_INSTANCES: weakref.WeakSet[SharedInvalidation] = weakref.WeakSet()  # see strategies_on


class Announcer(Protocol):
    """A tier that tells other hosts of an invalidation (see tierinvalidation.py)."""

    def announce_invalidation(self, times: InvalidationTimes) -> None: ...


def announce_with(directory: str, announcer: Announcer) -> None:
    """After each ``invalidate()`` of a SharedInvalidation on ``directory`` in this
    process, call ``announcer.announce_invalidation(times)`` with the times the file then holds,
    for as long as ``announcer`` lives."""
    with _ANNOUNCERS_GUARD:
        _ANNOUNCERS.setdefault(os.path.realpath(directory), weakref.WeakSet()).add(announcer)


def _announcers(directory: str) -> list[Callable[[InvalidationTimes], None]]:
    with _ANNOUNCERS_GUARD:
        found = _ANNOUNCERS.get(os.path.realpath(directory), ())
        return [announcer.announce_invalidation for announcer in found]


def strategies_on(directory: str) -> list[SharedInvalidation]:
    """This process's SharedInvalidations on ``directory``: a tier merges what other
    hosts announce only where the application uses one."""
    real = os.path.realpath(directory)
    return [s for s in list(_INSTANCES) if os.path.realpath(s.directory) == real]


# -- fork -----------------------------------------------------------------------------

_WRITING = threading.Lock()  # held by a writer around its flock, and by fork()


def _before_fork() -> None:
    _WRITING.acquire()


def _after_fork_in_parent() -> None:
    _WRITING.release()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent)


@forking.call_in_children
def _new_locks_in_child() -> None:
    """The child gets unheld locks: the one fork() waited for, and the registry's, which
    a thread of the parent (not in the child) may have held."""
    global _WRITING, _ANNOUNCERS_GUARD
    _WRITING = threading.Lock()
    _ANNOUNCERS_GUARD = threading.Lock()
