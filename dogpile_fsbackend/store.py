"""The sharded entry store: read, atomic publish, delete, and the locks around them.

An entry is one file, ``data/<shard dirs>/<digest>``, holding a record (see
records.py).  A raw entry adds its bytes as ``<digest>.<token>`` beside it.
Writers fill a temp file *in the entry's own directory* (same filesystem,
never /tmp) and publish it with ``os.replace`` while holding the shard's byte
lock, together with the shard's counter update; a reader therefore sees the
old entry or the new one, never a mix, and never a partial file.

Recency for LRU lives in the entry's timestamps: a write, and a hit, set
``mtime`` to now ("last used") and ``atime`` to the creation time, so an
eviction scan learns both from one ``stat`` without reading any file.  Like
``relatime``, a hit skips the stamp when this process stamped that very write
of the entry (the record's creation time tells) less than ``STAMP_FRACTION`` of
its age ago (and less than ``STAMP_INTERVAL_MAX``): the recorded last use is
never older than that, and an entry's first hit after a write is always
stamped (so is a hit after the clock was set back).

A hit reads the entry without an ``fstat``: one read of up to ``FIRST_READ``
bytes, bounded by the header's lengths for anything longer.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from typing import NamedTuple

from . import beneath, files, marker, records
from . import layout as paths
from .accounting import AccountingFile
from .config import Settings
from .exceptions import BookkeepingError, ConfigError, ReadOnlyError
from .files import make_dir, open_quietly, open_shared, pread_fully
from .locking import SHARD_BASE_OFFSET, ExclusiveByte, FileMutex, LockFile
from .rawfiles import Move

log = logging.getLogger(__name__)

# O_NONBLOCK: a FIFO planted where an entry belongs must not hang the reader.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_HIT_FLAGS = _READ_FLAGS | getattr(os, "O_NOATIME", 0)  # Linux; only for the file's owner
# A path that is missing, or runs through something planted (a file, a symlink loop,
# a Unix socket: ENXIO).
_PATH_ERRNOS = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.ENXIO}
)
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# An entry up to this size is read in one call; a bigger one has its header read first.
_ONE_READ_MAX = 1 << 20
# What a hit reads first: the whole of most entries (a longer one, bounded by its header).
FIRST_READ = 1 << 16
# A hit stamps an entry unless this process stamped it less than this share of its age ago,
# and less than STAMP_INTERVAL_MAX seconds ago (see the module docstring).
STAMP_FRACTION = 1 / 16
STAMP_INTERVAL_MAX = 60.0
_STAMPS_KEPT = 4096  # entries whose last stamp a process remembers (forgotten all at once)
# Seconds a timestamp may lie ahead of the clock before it is taken for "now".
FUTURE_TOLERANCE = 5.0
SETUP_WAIT = 30.0  # seconds a first set-up waits for another process's (milliseconds)
# What keeps a reader from removing an unusable entry: a read-only filesystem, or a
# directory another user made (root ran the application once).
_CANNOT_REMOVE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


@contextlib.contextmanager
def maintenance_lock(base_dir: str, mode: int = 0o600) -> Iterator[None]:
    """Whole-file lock serialising the first set-up of a directory across processes.

    It lives in its own file: opening and closing the byte-range lock file
    would drop this process's ``lockf`` locks.  A set-up takes milliseconds;
    a lock held past ``SETUP_WAIT`` (its holder stopped or hung) raises
    BookkeepingError naming the file rather than keep start-up waiting.
    """
    # Imported here: portalocker imports redis (for its RedisLock) whenever redis is
    # installed, and most processes never set a cache up or run maintenance.
    import portalocker

    path = os.path.join(base_dir, paths.MAINTENANCE_LOCK_NAME)
    fd = open_shared(path, mode)
    with os.fdopen(fd, "r+b") as handle:
        retries = files.lock_retries(SETUP_WAIT)
        while True:
            try:
                portalocker.lock(
                    handle, portalocker.LockFlags.EXCLUSIVE | portalocker.LockFlags.NON_BLOCKING
                )
                break
            except portalocker.LockException:  # 2.x raises this, later versions a subclass
                if not next(retries, False):  # a pause before the next try, unless none left
                    raise BookkeepingError(
                        errno.EWOULDBLOCK,
                        f"{path} has been held by another process for over {SETUP_WAIT:g} s "
                        "(a stopped or hung process setting the directory up?); end it "
                        "(fuser shows it), then start again",
                        path,
                    ) from None
        try:
            yield
        finally:
            portalocker.unlock(handle)


def is_read_only(directory: str) -> bool:
    """True if ``directory`` is on a filesystem mounted read-only."""
    return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)


class DataFile(NamedTuple):
    """A raw entry's bytes, and the token that will name them: a temp file this process
    staged, or (``move``) the caller's own file, to be moved in by the publish."""

    temp: str
    token: str
    move: Move | None = None


class LastTotals(threading.local):
    """Per thread: the totals (bytes, entries) its last publish, discard or snapshot read.

    Per thread, not per instance: a write is judged against the limits by what its
    own publish read, never by the older totals of another thread that stored its
    own just after (it may have read the table before this write and others counted).
    """

    total = 0
    entries = 0


class Store:
    """One cache directory as seen by one backend instance.

    A read-only store (``read_only=True``, or a filesystem mounted read-only)
    creates, changes and locks nothing: it has no lock file, its hits are not
    stamped, what it finds damaged stays, and every change raises ReadOnlyError.
    """

    def __init__(self, settings: Settings, kind: int) -> None:
        self.settings = settings
        self.kind = kind
        self.layout = paths.Layout(settings.base_dir, settings.shard_depth, settings.shard_width)
        self._known_dirs: dict[str, tuple[int, int]] = {}  # checked directory -> (dev, inode)
        # digest -> (the stamped record's creation time, which tells one write of the entry
        # from another at no cost, and when this process stamped it)
        self._stamps: dict[str, tuple[float, float]] = {}
        self.hits = self.misses = self.writes = self.evictions = self.write_errors = 0
        # Totals (bytes, entries) as this thread's last publish or discard read them.
        self.last = LastTotals()
        self._warned: set[str] = set()  # paths already reported unreadable or foreign
        # Why this store may change nothing (None: it may), for ReadOnlyError messages.
        self.read_only_reason = self._prepare_base_dir()
        self.writable = self.read_only_reason is None
        self._lock_file = (
            LockFile.for_path(self.layout.path(paths.LOCK_NAME), settings.file_mode)
            if self.writable
            else None
        )
        self.accounting = self._open_or_create()
        # Creates temp files below base_dir with no symlink followed, in one system
        # call (None without openat2: open_temp checks the directory by path).
        self._creator = (
            beneath.Creator(settings.base_dir, _CREATE_FLAGS, settings.file_mode)
            if self.writable and beneath.available()
            else None
        )
        self._lock_moves_seen = self._lock_file.moves if self._lock_file is not None else 0
        self._next_check = time.monotonic() + files.CHECK_INTERVAL
        self._next_touch = time.monotonic()

    # -- set-up ---------------------------------------------------------------

    @property
    def wanted_marker(self) -> marker.Marker:
        settings = self.settings
        return marker.Marker(
            self.kind, settings.shard_depth, settings.shard_width, settings.lock_slots
        )

    def _prepare_base_dir(self) -> str | None:
        """Make ``base_dir`` and ``data/`` if missing; return why the cache is read-only
        (None if it is not).  A read-only cache must already exist: it creates nothing."""
        base_dir = self.settings.base_dir
        if self.settings.read_only:
            _check_reachable(base_dir, read_only=True)
            if not os.path.isdir(base_dir):
                raise ConfigError(
                    "base_dir", "an existing cache directory when read_only=True", base_dir
                )
            for directory in (base_dir, self.layout.data_dir):
                if os.path.isdir(directory) and not os.access(directory, os.R_OK | os.X_OK):
                    raise _not_accessible(directory, True)
            return "read_only=True"
        try:
            for directory in (base_dir, self.layout.data_dir):
                _check_reachable(directory)
                if not os.path.isdir(directory):
                    os.makedirs(os.path.dirname(directory), exist_ok=True)
                    with contextlib.suppress(FileExistsError):  # another process made it
                        make_dir(directory, self.settings.dir_mode)
        except (FileExistsError, NotADirectoryError) as exc:
            raise ConfigError(
                "base_dir", "a directory (or a path where one can be made)", base_dir
            ) from exc
        except PermissionError as exc:
            raise ConfigError(
                "base_dir",
                f"a directory this process (uid {os.geteuid()}) may create; "
                f"{exc.filename or base_dir} does not let it: {exc.strerror}",
                base_dir,
            ) from exc
        except OSError as exc:
            if exc.errno != errno.EROFS:
                raise
            raise ConfigError(
                "base_dir",
                "an existing cache directory when the filesystem is read-only",
                base_dir,
            ) from exc
        if is_read_only(base_dir):
            return "its filesystem is mounted read-only"  # gets are served, as read_only=True
        for directory in (base_dir, self.layout.data_dir):
            if not os.access(directory, os.R_OK | os.W_OK | os.X_OK):
                raise _not_accessible(directory)
        return None

    def _open_or_create(self) -> AccountingFile:
        """Open an existing cache without locking; set one up under the maintenance lock.

        The fast path matters: application start-up must not wait for another
        process's set-up unless this directory has none yet.
        """
        path = self.layout.path(paths.ACCOUNTING_NAME)
        mode, count = self.settings.file_mode, self.layout.shard_count
        found = marker.read(self.settings.base_dir)
        if found is not None:
            marker.check(self.settings.base_dir, found, self.wanted_marker)
            return AccountingFile(path, count, mode, self.temp_suffix, writable=self.writable)
        if not self.writable:
            raise ConfigError(
                "base_dir",
                f"an existing cache directory when {self.read_only_reason} (its marker "
                f"{marker.path_of(self.settings.base_dir)} is missing and nothing was "
                "created; if this is a cache whose marker was lost, open it read-write "
                "once, which re-creates the marker from the entries)",
                self.settings.base_dir,
            )
        with maintenance_lock(self.settings.base_dir, mode):
            # The accounting first: one left by a process of another layout is refused
            # (BookkeepingError) before a marker of ours could contradict it.
            accounting = AccountingFile(path, count, mode, self.temp_suffix)
            created = marker.ensure(
                self.settings.base_dir, self.wanted_marker, mode, self.temp_suffix
            )
            # A new file has last_reconcile 0, so the first write recounts; a new,
            # empty cache has nothing to count.
            if created and _is_empty(self.layout.data_dir):
                accounting.last_reconcile = time.time()
            return accounting

    def temp_suffix(self) -> str:
        """A temp name (``.tmp-<writer token>-<number>``) for a file this process writes:
        a scan removes it once the writer's byte is free (see maintenance.py)."""
        lock_file = self.lock_file
        return paths.temp_name(lock_file.writer_token(), lock_file.next_temp_number())

    def check_bookkeeping(self) -> None:
        """At most once a second: the marker is still there (re-written if a cleaner took
        it), and once an hour every bookkeeping file's timestamps are refreshed."""
        now = time.monotonic()
        if now < self._next_check or not self.writable:
            return
        self._next_check = now + files.CHECK_INTERVAL
        base_dir = self.settings.base_dir
        if not os.path.lexists(marker.path_of(base_dir)):
            log.warning("%s was deleted; re-writing it", marker.path_of(base_dir))
            with contextlib.suppress(OSError):
                marker.write(
                    base_dir, self.wanted_marker, self.settings.file_mode, self.temp_suffix()
                )
        self.lock_file.check_identity()
        self.accounting.check_identity()
        if self.lock_file.moves != self._lock_moves_seen:
            # Until every process had moved to the new lock file, two writers of a shard
            # could update its counters at once: mark a recount (spread over the writes).
            self._lock_moves_seen = self.lock_file.moves
            self.accounting.last_reconcile = 0
        if now >= self._next_touch:
            self._next_touch = now + files.TOUCH_INTERVAL
            for name in (paths.MARKER_NAME, paths.MAINTENANCE_LOCK_NAME):
                files.touch(self.layout.path(name))

    def warn_once(self, path: str, problem: str) -> None:
        """Log ``problem`` about ``path`` once per instance (scans meet it again and again)."""
        if path not in self._warned:
            self._warned.add(path)
            log.warning("%s: %s", path, problem)

    def read_only_error(self, action: str) -> ReadOnlyError:
        """The error for ``action`` (``"store key 'k'"``) asked of a read-only store."""
        return ReadOnlyError(
            errno.EROFS,
            f"cannot {action}: the cache is read-only ({self.read_only_reason})",
            self.settings.base_dir,
        )

    def check_writable(self, action: str) -> None:
        if not self.writable:
            raise self.read_only_error(action)

    # -- locks ----------------------------------------------------------------

    @property
    def lock_file(self) -> LockFile:
        """The lock file; a read-only store has none: it locks nothing, as it changes nothing."""
        if self._lock_file is None:
            raise self.read_only_error("take a lock (only changes take one)")
        return self._lock_file

    def key_mutex(self, key_bytes: bytes) -> FileMutex:
        return FileMutex(self.lock_file, key_bytes, self.settings.lock_slots)

    def shard_locked(self, shard: int) -> ExclusiveByte:
        return self.lock_file.exclusive(SHARD_BASE_OFFSET + shard)

    # -- reading --------------------------------------------------------------

    def read_record(
        self, digest: str, key_bytes: bytes | None, read_to_end: bool = False
    ) -> records.Record | None:
        """The live record of a key, or None (a miss).

        Its ``created`` is the record's, or when a read first saw it if that lies
        in the future (see ``creation_time``).

        A damaged, foreign or expired file is removed on the way.  A hit makes
        the entry the most recently used one (see ``STAMP_FRACTION``).  A
        read-only store does neither, and does not even update the entry's
        atime where the kernel lets it.  ``key_bytes=None`` looks an entry up
        by ``digest`` alone (a URL names no key): the key stored in the record
        must then hash to ``digest``.  A first read that returns less than the
        file holds (FUSE and network filesystems may) is not damage: the lookup
        is made again with ``read_to_end``, reading until the end of the file.
        """
        path = self.layout.entry_path(digest)
        try:
            # Never the kernel's atime update: atime holds the creation time, and a hit
            # that skips its stamp would not put it back (open_quietly, inlined).
            try:
                fd = os.open(path, _HIT_FLAGS)
            except PermissionError as exc:
                if exc.errno != errno.EPERM or _HIT_FLAGS == _READ_FLAGS:
                    raise
                fd = os.open(path, _READ_FLAGS)  # not the owner: no O_NOATIME
        except FileNotFoundError:
            return None
        except PermissionError:  # another user's file: not ours to read, nor to delete
            self.warn_once(path, "entry is not readable by this process; treated as a miss")
            return None
        except OSError as exc:  # ELOOP: a symlink planted in an entry's or a directory's place
            if exc.errno not in _PATH_ERRNOS:
                raise
            if os.path.islink(path):
                self.discard_unusable(digest, os.lstat(path).st_ino)
            return None
        data = b""
        try:
            try:
                data = _read_exactly(fd, FIRST_READ) if read_to_end else os.read(fd, FIRST_READ)
                if len(data) == FIRST_READ:
                    data = _read_rest(fd, data, self.settings.cache_size)
                if key_bytes is None:
                    key_bytes = _key_of(data, digest)
                record = records.decode(data, self.kind, key_bytes)
            except records.OversizedRecord:
                self.warn_once(
                    path,
                    f"entry is larger than cache_size ({self.settings.cache_size} bytes); "
                    "treated as a miss and left alone",
                )
                return None
            except records.DamagedRecord:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):  # a FIFO planted in an entry's place: a miss
                    return None
                if not read_to_end and len(data) < min(info.st_size, FIRST_READ):
                    return self.read_record(digest, key_bytes, read_to_end=True)  # a short read
                self.discard_unusable(digest, info.st_ino)
                return None
            except OSError as exc:  # a directory (EISDIR) or a FIFO with a writer (EAGAIN)
                if exc.errno not in (errno.EISDIR, errno.EAGAIN):
                    raise
                return None
            now = time.time()
            created = written = record.created
            if created > now + FUTURE_TOLERANCE:
                created = creation_time(record, os.fstat(fd), now)
                record = record._replace(created=created)
            limit = self.settings.expiration_time
            if limit is not None and now - created > limit:
                self.discard_unusable(digest, os.fstat(fd).st_ino)
                return None
            if self.writable:  # stamp it, unless this process did so recently
                stamps = self._stamps
                last = stamps.get(digest)
                # Only a stamp of this very write counts (a writer that waited for the shard
                # lock may publish a file older than it), and none "from the future" (the
                # clock was set back since).
                if (
                    last is None
                    or last[0] != written
                    or not 0.0
                    <= now - last[1]
                    < min(STAMP_FRACTION * (now - created), STAMP_INTERVAL_MAX)
                ):
                    touch(fd, created, now)  # remembered even if refused: best effort there
                    if len(stamps) >= _STAMPS_KEPT:
                        stamps.clear()
                    stamps[digest] = (written, now)
        finally:
            os.close(fd)
        return record

    def is_expired(self, created: float, now: float | None = None) -> bool:
        limit = self.settings.expiration_time
        return limit is not None and (now or time.time()) - created > limit

    # -- writing --------------------------------------------------------------

    def open_temp(self, digest: str, dir_checked: bool = False) -> tuple[int, str]:
        """A new, empty temp file in the entry's own directory: (fd, path).

        No symlink is followed on the way: with openat2 (``beneath``) the
        create itself refuses one; without it the directory is checked once
        per process and then trusted while its identity holds (``is_our_dir``:
        one ``stat``, none with ``dir_checked``: the caller has just made a
        file there).  A directory removed meanwhile, or a symlink planted in
        its place, is made again as a real one.
        """
        directory = self.layout.entry_dir(digest)
        path = f"{directory}/{self.temp_suffix()}"
        mode = self.settings.file_mode
        creator = self._creator
        if creator is not None:
            try:
                fd = creator.open(path)
            except OSError as exc:
                if exc.errno == errno.ENOSYS:  # refused since the probe (a seccomp filter)
                    self._creator = None
                    return self.open_temp(digest)
                if exc.errno not in _PATH_ERRNOS:
                    raise
                # Missing, or something planted on the way: repaired, then opened by path.
                creator.renew_if_moved()
                self._make_real_dirs(directory)
                fd = os.open(path, _CREATE_FLAGS, mode)
        else:
            if not dir_checked and not self.is_our_dir(directory):
                self._make_real_dirs(directory)
            try:
                fd = os.open(path, _CREATE_FLAGS, mode)
            except FileNotFoundError:  # the directory was removed behind our back
                self._make_real_dirs(directory)
                fd = os.open(path, _CREATE_FLAGS, mode)
        if mode & 0o077:  # the umask may have stripped what was asked
            os.fchmod(fd, mode)
        return fd, path

    @functools.cached_property
    def data_dev(self) -> int:
        """The device of ``data/``: a file elsewhere cannot be renamed into the cache."""
        return os.stat(self.layout.data_dir).st_dev

    def is_our_dir(self, directory: str) -> bool:
        """True if ``directory`` and each level above it (below base_dir) is a real directory.

        O_NOFOLLOW guards only a path's last component; this guards the others,
        so a symlink planted in place of a shard directory is never written or
        deleted through.  A directory already checked costs one ``stat``: a
        symlink planted anywhere on its path resolves to another inode.
        """
        try:
            info = os.stat(directory)
        except OSError as exc:  # missing, or a planted symlink loop (ELOOP)
            if exc.errno not in _PATH_ERRNOS:
                raise
            return False
        identity = (info.st_dev, info.st_ino)
        if self._known_dirs.get(directory) == identity:
            return True
        level = directory
        while len(level) > len(self.settings.base_dir):
            try:
                if not stat.S_ISDIR(os.lstat(level).st_mode):
                    return False
            except (FileNotFoundError, NotADirectoryError):
                return False
            level = os.path.dirname(level)
        self._known_dirs[directory] = identity
        return True

    def _make_real_dirs(self, directory: str) -> None:
        """Create ``directory`` and its parents below ``base_dir``, level by level.

        Anything found in their place (a symlink planted to redirect our
        writes, a stray file) is unlinked, never followed.
        """
        level = self.settings.base_dir
        for part in os.path.relpath(directory, level).split(os.sep):
            level = os.path.join(level, part)
            for _ in range(3):  # another process may be repairing the same path
                with contextlib.suppress(FileExistsError):
                    make_dir(level, self.settings.dir_mode)
                    break
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISDIR(os.lstat(level).st_mode):
                        break
                    os.unlink(level)
            else:
                raise FileExistsError(errno.EEXIST, "cannot make a shard directory", level)
        info = os.lstat(directory)
        self._known_dirs[directory] = (info.st_dev, info.st_ino)

    def write_temp(self, digest: str, data: bytes, dir_checked: bool = False) -> str:
        """A temp file holding ``data``, synced if asked, ready to publish: its path.

        A new file's atime and mtime are both "now": created and just used.
        """
        fd, path = self.open_temp(digest, dir_checked)
        try:
            _write_all(fd, data)
            self.sync_if_asked(fd)
        except BaseException:
            remove_quietly(path)
            raise
        finally:
            os.close(fd)
        return path

    def write_and_publish(self, digest: str, data: bytes) -> None:
        """Make ``data`` the entry ``digest`` (a pickled set)."""
        self.publish(digest, self.write_temp(digest, data), len(data))

    def publish_raw(self, digest: str, data: DataFile, data_size: int, record: bytes) -> bool:
        """Make ``record`` the entry ``digest``, with ``data`` as its bytes.

        The temp file of ``data`` is removed if anything fails before it is
        published.  False (nothing published) if the caller's file of a move
        could not be moved in: it is where it was, to be copied instead.
        """
        record_temp = None
        try:
            # Beside the staged data, in a directory just checked; a move checks it here.
            record_temp = self.write_temp(digest, record, dir_checked=data.move is None)
            return self.publish(digest, record_temp, data_size + len(record), data)
        except BaseException:
            if data.move is None:
                remove_quietly(data.temp)
            remove_quietly(record_temp)
            raise

    def sync_if_asked(self, fd: int) -> None:
        if self.settings.fsync:
            os.fsync(fd)

    def publish(
        self, digest: str, record_temp: str, size: int, data: DataFile | None = None
    ) -> bool:
        """Atomically make ``record_temp`` (and ``data`` as ``<digest>.<token>``) the entry.

        ``size`` is the bytes of both files.  The data file goes in first
        under a fresh name, then the record that names it replaces the old
        record, then the old data file goes: a reader holding the old record
        either still opens the old bytes or sees a miss, never the new bytes
        with old metadata.  A caller's file (``data.move``) goes in under the
        lock straight to its name (a data file without its record would be a
        scan's orphan); if it cannot, nothing is published and the result is False.
        One whose record then fails gets its name back (:meth:`Move.back`).
        """
        shard = self.layout.shard_index(digest)
        entry_path = self.layout.entry_path(digest)
        data_path = self.layout.data_path(digest, data.token) if data else None
        move = data.move if data else None
        staged = data.temp if data and not move else None
        with self.shard_locked(shard):
            old_size, existed, old_data = self._entry_files_locked(digest, entry_path)
            if move and data_path:
                try:
                    move.to(data_path)
                except OSError:
                    remove_quietly(record_temp)
                    return False
            try:
                if staged and data_path:
                    os.replace(staged, data_path)
                os.replace(record_temp, entry_path)
            except BaseException:
                if move and data_path:  # not stored: the caller's file again
                    with contextlib.suppress(OSError):
                        move.back(data_path)
                for leftover in (staged, data_path, record_temp):
                    remove_quietly(leftover)
                raise
            for old_path in old_data:
                if old_path != data_path:
                    remove_quietly(old_path)
            self._count(shard, size - old_size, 0 if existed else 1)
        self.writes += 1
        self.check_bookkeeping()
        return True

    # -- removing -------------------------------------------------------------

    def delete(self, digest: str) -> None:
        self.discard(digest)

    def discard(
        self,
        digest: str,
        inode: int | None = None,
        used_ns: int | None = None,
        header: bytes | None = None,
        record: records.Record | None = None,
    ) -> int:
        """Remove an entry; given ``inode``/``used_ns``/``header`` (its first bytes), or
        the ``record`` read from it, only if it is still the file judged.

        Returns the bytes freed (0 if the entry was gone, replaced or used meanwhile,
        or if the store is read-only: reads repair nothing there).
        """
        if not self.writable:
            return 0
        shard = self.layout.shard_index(digest)
        entry_path = self.layout.entry_path(digest)
        with self.shard_locked(shard):
            if not self.is_our_dir(self.layout.entry_dir(digest)):
                return 0  # nothing of ours is there; never delete through a planted symlink
            if inode is not None:
                try:
                    info = os.lstat(entry_path)
                except FileNotFoundError:
                    return 0
                if info.st_ino != inode or (used_ns is not None and info.st_mtime_ns != used_ns):
                    return 0
                if header is not None and not self._starts_with(entry_path, header):
                    return 0  # a later file that was given the same inode number
            if record is not None and not self._still_holds(digest, record):
                return 0
            size, existed, data = self._entry_files_locked(digest)
            for path in (entry_path, *data):
                remove_quietly(path)
            self._count(shard, -size, -existed)
        return size

    @staticmethod
    def _starts_with(path: str, header: bytes) -> bool:
        try:
            fd = open_quietly(path, _READ_FLAGS)
        except FileNotFoundError:
            return False
        try:
            return pread_fully(fd, len(header)) == header
        finally:
            os.close(fd)

    def _still_holds(self, digest: str, record: records.Record) -> bool:
        """True if the entry still holds ``record`` (a raw record's token is new per write)."""
        try:
            return self.peek_record(digest).payload == record.payload
        except (OSError, records.DamagedRecord):
            return False

    def discard_unusable(
        self, digest: str, inode: int | None = None, record: records.Record | None = None
    ) -> None:
        """``discard`` for a reader that found an entry expired or damaged: the read is a
        miss either way, so an entry this process may not remove (a read-only filesystem,
        another user's directory) stays for one that may."""
        if not self.writable:
            return
        try:
            self.discard(digest, inode, record=record)
        except OSError as exc:
            if exc.errno not in _CANNOT_REMOVE:
                raise
            self.warn_once(
                self.layout.entry_path(digest),
                f"unusable entry cannot be removed by this process ({exc.strerror}); "
                "treated as a miss",
            )

    def _entry_files_locked(
        self, digest: str, entry_path: str | None = None
    ) -> tuple[int, int, list[str]]:
        """(total bytes, 1 if the record exists else 0, data file paths) of an entry."""
        size = existed = 0
        try:  # not contextlib.suppress: a new key's set takes this path
            info = os.lstat(entry_path or self.layout.entry_path(digest))
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISREG(info.st_mode):  # a planted symlink was never counted
                size, existed = info.st_size, 1
        data = []
        if self.kind == records.KIND_RAW and existed:  # without a record, leftovers are scans' job
            for data_path, data_size in self._live_data_file(digest) or self.data_files(digest):
                size += data_size
                data.append(data_path)
        return size, existed, data

    def _live_data_file(self, digest: str) -> list[tuple[str, int]]:
        """(path, size) of the data file a raw record names; [] if that cannot be read.

        Cheaper than listing the directory, which a caller falls back to.
        """
        try:
            token = records.RawMeta.from_bytes(self.peek_record(digest).payload).token
            data_path = self.layout.data_path(digest, token)
            info = os.lstat(data_path)
        except (OSError, records.DamagedRecord):
            return []
        return [(data_path, info.st_size)] if stat.S_ISREG(info.st_mode) else []

    def peek_record(self, digest: str) -> records.Record:
        """The record stored at ``digest``, checked but not used (for publish and scans).

        Its stored key must hash to ``digest``.  It is opened without following
        symlinks and, where we own it, without touching atime, which holds the
        creation time that expiry is judged by.  Raises OSError or DamagedRecord.
        """
        fd = open_quietly(self.layout.entry_path(digest), _READ_FLAGS)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise records.DamagedRecord("not a regular file")
            data = read_entry(fd, info.st_size, self.settings.cache_size)
        finally:
            os.close(fd)
        return records.decode(data, self.kind, _key_of(data, digest))

    def data_files(self, digest: str) -> list[tuple[str, int]]:
        """(path, size) of every ``<digest>.<token>`` data file beside an entry."""
        directory = self.layout.entry_dir(digest)
        prefix = digest + "."
        found = []
        with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
            for entry in entries:
                # A directory by that name is planted, not ours: unlink would fail on it.
                if entry.name.startswith(prefix) and not entry.is_dir(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        found.append((entry.path, entry.stat(follow_symlinks=False).st_size))
        return found

    # -- limits ---------------------------------------------------------------

    def totals(self) -> tuple[int, int]:
        return self.accounting.totals()

    def snapshot_totals(self) -> None:
        """Read the whole table afresh into this thread's totals (``last``), which the
        limits are judged by."""
        last = self.last
        last.total, last.entries = self.accounting.totals()

    def _count(self, shard: int, size_delta: int, entries_delta: int) -> None:
        """Change ``shard``'s counters (its lock is held); this thread's totals are what
        that update read (see ``LastTotals``)."""
        last = self.last
        last.total, last.entries = self.accounting.add(shard, size_delta, entries_delta)

    def reconcile_due(self, fresh: bool = True) -> bool:
        """A recount is due: never done, marked (0), interval passed, or dated in the future.

        ``fresh=False`` judges by what the last accounting update read (no call).
        """
        accounting = self.accounting
        last = accounting.last_reconcile if fresh else accounting.seen_reconcile
        interval = self.settings.reconcile_interval
        now = time.time()
        return (
            not last
            or last > now + FUTURE_TOLERANCE  # a clock that was far ahead: recount now
            or (interval is not None and now - last > interval)
        )


def creation_time(record: records.Record, info: os.stat_result, now: float) -> float:
    """When an entry was created, for expiry: its record's time, unless a clock far ahead
    wrote it; then when a read first saw it (its atime, see ``touch``), at most now."""
    if record.created > now + FUTURE_TOLERANCE:
        return min(info.st_atime, now)
    return record.created


def touch(fd: int, created: float, now: float) -> None:
    """Mark an entry used ``now``; keep its creation time in atime for scans."""
    try:
        os.utime(fd, (created if created < now else now, now))  # not min(): every hit
    except OSError as exc:  # not the owner, or a read-only mount: recency is best effort
        if exc.errno not in (errno.EPERM, errno.EACCES, errno.EROFS):
            raise


def _is_empty(directory: str) -> bool:
    with os.scandir(directory) as entries:
        return next(entries, None) is None


def remove_quietly(path: str | None) -> None:
    """Unlink ``path`` if it exists; another process may have removed it first."""
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _write_all(fd: int, data: bytes) -> None:
    written = os.write(fd, data)
    if written < len(data):  # a short write (a signal, a nearly full disk): the rest
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(fd, view) :]


def _read_rest(fd: int, head: bytes, limit: int) -> bytes:
    """The whole entry that begins with ``head`` (a full first read), bounded by its header.

    One byte more than declared is asked for, so an entry longer than its header
    says is damage (decode checks the length); a big one must have exactly the
    declared size before it is read, so an entry extended to gigabytes (even
    sparsely) costs one ``fstat``, not the memory.  One declared larger than
    ``limit`` (the cache's size limit) is OversizedRecord before anything more is
    read (see ``read_entry``).
    """
    declared = records.declared_size(head)
    if declared is None:
        raise records.DamagedRecord("not an entry of this format")
    if declared > limit:
        raise records.OversizedRecord("larger than the cache's size limit")
    if declared > _ONE_READ_MAX and os.fstat(fd).st_size != declared:
        raise records.DamagedRecord("length does not match the header")
    if declared < len(head):
        return head  # longer than declared: decode rejects it
    return head + _read_exactly(fd, declared + 1 - len(head))


def _key_of(data: bytes, digest: str) -> bytes:
    """The key stored in an entry's ``data``; DamagedRecord unless it hashes to ``digest``."""
    key = records.stored_key(data)
    if key is None or paths.key_digest(key) != digest:
        raise records.DamagedRecord("entry does not belong to its digest")
    return key


def read_entry(fd: int, size: int, limit: int) -> bytes:
    """An entry's bytes, never more than its header declares (DamagedRecord otherwise).

    A small file is read in one call and its lengths checked by ``decode``; a
    bigger one has its header read first, so an entry extended to gigabytes
    (even sparsely) costs one small read, not the memory.  A file larger than
    ``limit`` (the cache's size limit) is OversizedRecord, unread: no entry this
    cache wrote is bigger, and a sparse file whose header agrees would otherwise
    be read whole (one of a terabyte: a MemoryError).
    """
    if size > limit:
        raise records.OversizedRecord("larger than the cache's size limit")
    if size > _ONE_READ_MAX:
        declared = records.declared_size(os.pread(fd, records.HEADER_SIZE, 0))
        if declared != size:
            raise records.DamagedRecord("length does not match the header")
    return _read_exactly(fd, size)  # decode checks it against the header's lengths


def _read_exactly(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes from the current position (fewer only at the end of the file)."""
    data = os.read(fd, limit)
    if len(data) == limit or not data:
        return data
    chunks = [data]
    remaining = limit - len(data)
    while remaining and (data := os.read(fd, min(remaining, 1 << 20))):
        chunks.append(data)
        remaining -= len(data)
    return b"".join(chunks)


def _check_reachable(directory: str, read_only: bool = False) -> None:
    """Raise a clear ConfigError if ``directory`` exists but this process may not enter it."""
    try:
        os.stat(directory)
    except FileNotFoundError:
        return
    except PermissionError:
        raise _not_accessible(os.path.dirname(directory), read_only) from None
    if os.path.isdir(directory) and not os.access(directory, os.X_OK):
        raise _not_accessible(directory, read_only)


def _not_accessible(directory: str, read_only: bool = False) -> ConfigError:
    try:
        info = os.stat(directory)
        owner = f"it belongs to uid {info.st_uid} with mode {stat.S_IMODE(info.st_mode):o}"
    except OSError:
        owner = "it cannot even be looked at"
    if read_only:
        need, how = "read", "read access (dir_mode=0o755, file_mode=0o644 where it is built)"
    else:
        need, how = (
            "read and write",
            "access (a shared group with dir_mode=0o770, file_mode=0o660)",
        )
    return ConfigError(
        "base_dir",
        f"a directory this process (uid {os.geteuid()}) can {need}; {directory} is "
        f"not accessible: {owner}. Run as its owner, or give this user {how}",
        directory,
    )
