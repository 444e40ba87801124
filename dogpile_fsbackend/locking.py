"""Byte-range ``lockf`` locks on one lock file, made safe for threads and forks.

Every lock is one byte of the cache's lock file: byte 0 is left unused (it
serialised eviction scans until eviction became per-write work that needs no
shared lock, see eviction.py), the next bytes guard the accounting shards, and
the key mutexes hash onto
``lock_slots`` bytes after those (2**32 by default: a lock file is sparse, an
unlocked byte costs nothing, so distinct keys practically never share a byte).
No lock file is ever created or deleted per key.

POSIX record locks belong to the *process*: two threads never exclude each
other through them, and closing *any* descriptor of the file drops *all* of the
process's locks on it.  So each process opens a lock file once (shared by every
backend on that directory, and closed when the last of them and of their mutexes
is gone) and adds an in-process layer:

* a thread lock per lock *name* (a key, a shard), so threads exclude each other
  and a second ``acquire(False)`` from the holder fails, as dogpile expects;
* a holder count per *byte*, so two keys that hash to one byte share the
  process's record lock instead of deadlocking on it.

After ``fork()`` the child holds none of its parent's record locks, so every
lock file resets its in-process state (forking.py).

The lock file can be deleted or replaced under running processes (a tmp
cleaner, a hand).  Each process checks at most once a second, when it takes
a lock or names a temp file, whether the path still names the file it has
open, and moves to the file now there (creating one if none), its writer
byte with it.  A lock already held stays on the
descriptor it was taken on and is released there; old descriptors stay open as
long as the new one, as closing one would drop every lock the process holds on
that file (its writer byte there too).

Writers are told alive from dead by a lock, not by a pid or a clock: each
process that writes holds one byte in a region of its own (``writer_token``),
and names its temp files after it.  A scan in any process, in any PID
namespace, reclaims a temp file only if that byte is free
(:meth:`LockFile.writer_alive`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import logging
import os
import random
import secrets
import struct
import sys
import threading
import time
import weakref
from collections.abc import Hashable, Iterator

from dogpile.cache.api import CacheMutex

from . import files, forking
from .files import open_shared
from .layout import WRITER_TOKEN_LEN

log = logging.getLogger(__name__)

SHARD_BASE_OFFSET = 1  # byte 0 is unused (see above)
KEY_BASE_OFFSET = SHARD_BASE_OFFSET + 16**3  # room for the widest shard layout
WRITER_BASE_OFFSET = 1 << 56  # beyond every key slot (lock_slots <= 2**48)

_CONTENTION_ERRNOS = frozenset({errno.EACCES, errno.EAGAIN})
_DEADLOCK_BACKOFF_MAX = 0.05
# struct flock for F_GETLK.  Linux: l_type, l_whence, l_start, l_len, l_pid (+ padding);
# the BSDs and macOS: l_start, l_len, l_pid, l_type, l_whence.
_FLOCK_BSD = sys.platform == "darwin" or "bsd" in sys.platform
_FLOCK = struct.Struct("qqihh" if _FLOCK_BSD else "hhqqi4x")


class _NameLock:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class _ByteLock:
    __slots__ = ("fd", "gate", "holders", "users")

    def __init__(self) -> None:
        self.gate = threading.Lock()  # one thread at a time asks the kernel
        self.holders = 0  # names of this process that hold the byte
        self.users = 0  # threads holding or asking for it; forgotten at 0 (slots are sparse)
        self.fd = -1  # the descriptor the kernel lock was taken on (released there)


class LockFile:
    """This process's handle on one lock file; get it with :meth:`for_path`."""

    # Weak: an instance lives while a backend or a mutex uses it.  Then nothing can hold
    # or release a lock through it any more, and it closes its descriptors (__del__).
    _instances: weakref.WeakValueDictionary[str, LockFile] = weakref.WeakValueDictionary()
    _instances_guard = threading.Lock()

    @classmethod
    def for_path(cls, path: str, mode: int = 0o600) -> LockFile:
        """The process-wide instance for ``path`` (opened once, closed with its last user).

        A read-only cache opens none (see store.py): it has nothing to lock.
        """
        real_path = os.path.realpath(path)
        with cls._instances_guard:
            existing = cls._instances.get(real_path)
            if existing is None:
                fd = open_shared(path, mode)
                existing = cls._instances[real_path] = cls(path, fd, mode)
            return existing

    def __init__(self, path: str, fd: int, mode: int) -> None:
        self.path = path
        self.fd = fd
        self.mode = mode
        self._old_fds: list[int] = []  # of replaced lock files: closing one drops its locks
        self.moves = 0  # to a replaced lock file: each broke exclusion for a moment
        self._watch = files.Watch(path, fd)
        self._counter = itertools.count()
        self._reset()
        forking.reset_in_children(self)

    def __del__(self) -> None:
        for fd in (self.fd, *self._old_fds):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _reset(self) -> None:
        """Fresh in-process state: at start, and in a forked child (forking.py), which
        holds none of the parent's record locks nor has the threads that held its own."""
        self._guard = threading.Lock()
        self._names: dict[Hashable, _NameLock] = {}
        self._bytes: dict[int, _ByteLock] = {}
        self._writer_slot: int | None = None
        self._writer_hex = ""  # _writer_slot as a token, once there is one
        self._exclusive: dict[int, threading.Lock] = {}  # see exclusive()

    _reset_after_fork = _reset  # see forking.py

    @classmethod
    def _new_instances_guard(cls) -> None:
        cls._instances_guard = threading.Lock()

    # -- public API -----------------------------------------------------------

    def acquire(self, name: Hashable, offset: int, wait: bool = True) -> bool:
        """Take lock ``name`` (kept on byte ``offset``) for this thread."""
        if self._watch.due():
            self.check_identity()
        with self._guard:
            entry = self._names.get(name)
            if entry is None:
                entry = self._names[name] = _NameLock()
            entry.users += 1
        acquired = False
        try:
            if entry.lock.acquire(wait):
                try:
                    acquired = self._acquire_byte(offset, wait)
                finally:
                    if not acquired:
                        entry.lock.release()
        finally:
            if not acquired:
                self._drop_name(name, entry)
        return acquired

    def release(self, name: Hashable, offset: int) -> None:
        """Release lock ``name``; any thread may release it, as with threading.Lock."""
        with self._guard:
            entry = self._names.get(name)
            if entry is None or not entry.lock.locked():
                raise RuntimeError(f"release of an unlocked lock {name!r}")
            byte = self._bytes[offset]
            byte.holders -= 1
            if byte.holders == 0:
                fcntl.lockf(byte.fd, fcntl.LOCK_UN, 1, offset)
            self._forget_byte_user(offset, byte)
            entry.lock.release()
        self._drop_name(name, entry)

    def is_locked(self, name: Hashable, offset: int) -> bool:
        """True if a thread of this process holds ``name`` or another process holds the byte."""
        with self._guard:
            entry = self._names.get(name)
            if entry is not None and entry.lock.locked():
                return True
        return self._held_elsewhere(offset)

    @contextlib.contextmanager
    def held(self, name: Hashable, offset: int) -> Iterator[None]:
        self.acquire(name, offset)
        try:
            yield
        finally:
            self.release(name, offset)

    def exclusive(self, offset: int) -> ExclusiveByte:
        """Byte ``offset``, which no other lock name shares (a shard's), as a context manager.

        The fast path of :meth:`held` for the hot path: with one name per byte,
        a thread lock per byte and the kernel lock are all it takes.
        """
        return ExclusiveByte(self, offset)

    def check_identity(self) -> None:
        """Move to the file now at ``path`` if ours was deleted or replaced; refresh times.

        Locks held meanwhile stay on the old descriptor until released.
        """
        if self._watch.still_current(self.fd):
            return
        try:
            fd = open_shared(self.path, self.mode)
        except OSError as exc:
            log.warning("lock file %s was replaced by something unusable: %s", self.path, exc)
            return
        with self._guard:
            self._old_fds.append(self.fd)
            self.fd = fd
            self._watch.moved_to(fd)
            self.moves += 1
            # The writer byte comes along without a gap: temp files being written are
            # named after it.  (Taken there already: a 2**-48 chance; pick another.)
            slot = self._writer_slot
            if slot is not None and not self._lockf(fd, WRITER_BASE_OFFSET + slot, False):
                self._writer_slot = None
        log.warning("lock file %s was deleted or replaced; moved to the new one", self.path)

    def writer_token(self) -> str:
        """This process's writer token (hex), holding its writer byte from now on.

        A process idle since the lock file was replaced moves first (when its check
        is due): the token must be alive on the file that other processes judge by.
        """
        if self._watch.due():
            self.check_identity()
        if self._writer_slot is None:
            self._take_writer_slot()
        return self._writer_hex

    def next_temp_number(self) -> int:
        return next(self._counter)

    def writer_alive(self, token: str) -> bool:
        """True if the process that holds writer ``token``'s byte is alive (in any namespace)."""
        slot = int(token, 16)
        return slot == self._writer_slot or self._held_elsewhere(WRITER_BASE_OFFSET + slot)

    # -- internals ------------------------------------------------------------

    def _take_writer_slot(self) -> int:
        """Lock a free writer byte, chosen at random, for good.

        Under the guard, so that the byte is taken on the descriptor in use even
        while another thread moves to a replaced lock file (never blocking: LOCK_NB).
        """
        with self._guard:
            while self._writer_slot is None:
                slot = secrets.randbits(4 * WRITER_TOKEN_LEN)
                if self._lockf(self.fd, WRITER_BASE_OFFSET + slot, False):
                    # The token first: writer_token() reads it, unguarded, once the
                    # slot is set.
                    self._writer_hex = format(slot, f"0{WRITER_TOKEN_LEN}x")
                    self._writer_slot = slot
            return self._writer_slot

    def _held_elsewhere(self, offset: int) -> bool:
        if _FLOCK_BSD:
            query = _FLOCK.pack(offset, 1, 0, fcntl.F_WRLCK, os.SEEK_SET)
            lock_type = _FLOCK.unpack(fcntl.fcntl(self.fd, fcntl.F_GETLK, query))[3]
        else:
            query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
            lock_type = _FLOCK.unpack(fcntl.fcntl(self.fd, fcntl.F_GETLK, query))[0]
        return bool(lock_type != fcntl.F_UNLCK)

    def _drop_name(self, name: Hashable, entry: _NameLock) -> None:
        with self._guard:
            entry.users -= 1
            if entry.users == 0 and self._names.get(name) is entry:
                del self._names[name]

    def _acquire_byte(self, offset: int, wait: bool) -> bool:
        with self._guard:
            byte = self._bytes.get(offset)
            if byte is None:
                byte = self._bytes[offset] = _ByteLock()
            byte.users += 1
            if byte.holders:
                byte.holders += 1
                return True
        acquired = False
        try:
            if not byte.gate.acquire(wait):
                return False
            try:
                with self._guard:
                    if byte.holders:
                        byte.holders += 1
                        acquired = True
                        return True
                fd = self.fd
                if not self._lockf(fd, offset, wait):
                    return False
                with self._guard:
                    byte.holders = 1
                    byte.fd = fd
                acquired = True
                return True
            finally:
                byte.gate.release()
        finally:
            if not acquired:
                with self._guard:
                    self._forget_byte_user(offset, byte)

    def _forget_byte_user(self, offset: int, byte: _ByteLock) -> None:
        """One thread less holds or asks for ``byte`` (the guard is held)."""
        byte.users -= 1
        if byte.users == 0 and self._bytes.get(offset) is byte:
            del self._bytes[offset]

    @staticmethod
    def _lockf(fd: int, offset: int, wait: bool) -> bool:
        """Ask the kernel for the byte; retry when it reports a (thread-induced) EDEADLK."""
        flags = fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB
        backoff = 0.001
        while True:
            try:
                fcntl.lockf(fd, flags, 1, offset)
                return True
            except OSError as exc:
                if exc.errno in _CONTENTION_ERRNOS and not wait:
                    return False
                if exc.errno != errno.EDEADLK:
                    raise
            # The kernel sees processes, not threads: a wait-for cycle through
            # different threads of one process is not a real deadlock, so back
            # off and retry.  (A real one would need two keys on one byte:
            # with 2**32 sparse slots by default, practically never.)
            time.sleep(backoff * (1 + random.random()))
            backoff = min(backoff * 2, _DEADLOCK_BACKOFF_MAX)


class ExclusiveByte:
    """One hold of a byte that has a single lock name (see ``LockFile.exclusive``)."""

    __slots__ = ("_fd", "_lock_file", "_offset", "_thread_lock")

    def __init__(self, lock_file: LockFile, offset: int) -> None:
        self._lock_file = lock_file
        self._offset = offset

    def __enter__(self) -> None:
        lock_file, offset = self._lock_file, self._offset
        if lock_file._watch.due():
            lock_file.check_identity()
        thread_lock = lock_file._exclusive.get(offset)
        if thread_lock is None:
            thread_lock = lock_file._exclusive.setdefault(offset, threading.Lock())
        thread_lock.acquire()
        fd = lock_file.fd  # released on the descriptor it was taken on
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX, 1, offset)
            except OSError:  # EDEADLK (threads, see _lockf) is retried; anything else raises
                lock_file._lockf(fd, offset, True)
        except BaseException:
            thread_lock.release()
            raise
        self._thread_lock, self._fd = thread_lock, fd

    def __exit__(self, *exc_info: object) -> None:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, self._offset)
        finally:
            self._thread_lock.release()


forking.call_in_children(LockFile._new_instances_guard)


def key_slot(key_bytes: bytes, slots: int) -> int:
    """The lock byte of a key: a stable hash, the same in every process."""
    digest = hashlib.blake2b(key_bytes, digest_size=8).digest()
    return KEY_BASE_OFFSET + int.from_bytes(digest, "big") % slots


class FileMutex(CacheMutex):
    """dogpile's ``CacheMutex`` for one key, excluding threads and processes alike."""

    __slots__ = ("_lock_file", "_name", "_offset")

    def __init__(self, lock_file: LockFile, key_bytes: bytes, slots: int) -> None:
        self._lock_file = lock_file
        self._name = ("key", key_bytes)
        self._offset = key_slot(key_bytes, slots)

    def acquire(self, wait: bool = True) -> bool:
        return self._lock_file.acquire(self._name, self._offset, wait)

    def release(self) -> None:
        self._lock_file.release(self._name, self._offset)

    def locked(self) -> bool:
        return self._lock_file.is_locked(self._name, self._offset)

    def __repr__(self) -> str:
        return f"<FileMutex byte {self._offset} of {self._lock_file.path}>"
