"""Creating and opening the cache's files: exact permissions, no links, no blocking.

``open()`` and ``mkdir()`` reduce the mode they are given by the umask, so a
group-shared cache (``file_mode=0o660``, ``dir_mode=0o770``) would come out
``0o640``/``0o750`` under the usual umask 022 and other users of the group
could not write.  What we create is therefore chmod'ed to the mode asked for;
what already exists keeps its mode (it may not be ours to change).

Bookkeeping files (the marker, ``lock``, ``accounting``, ``maintenance.lock``)
are opened without following a symlink and without blocking on a FIFO, and
must be regular files: anything else planted there is an error that names the
file and says what to do, never a hang or a write through a link.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Callable, Iterator

from .exceptions import BookkeepingError

# Every process checks at most this often (seconds, monotonic) that each bookkeeping file
# it has open is still the one at its path, and refreshes their timestamps at most every
# TOUCH_INTERVAL, so that age-based tmp cleaners (systemd-tmpfiles, tmpwatch) leave them.
CHECK_INTERVAL = 1.0
TOUCH_INTERVAL = 3600.0

_NO_SURPRISES = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
_O_NOATIME = getattr(os, "O_NOATIME", 0)  # Linux only
_PROBLEMS = {
    errno.ELOOP: "is a symbolic link (the cache never follows links)",
    errno.ENXIO: "is a FIFO or socket, not a regular file",
    errno.EISDIR: "is a directory, not a regular file",
}


def open_shared(path: str, mode: int, *, writable: bool = True, create: bool = True) -> int:
    """Open (or create, with exactly ``mode``) a bookkeeping file every process shares.

    ``writable=False`` opens an existing file read-only (a read-only
    filesystem).  Anything but a regular file raises :class:`BookkeepingError`.
    """
    if not writable:
        return _checked(path, lambda: open_quietly(path, os.O_RDONLY | _NO_SURPRISES))
    flags = os.O_RDWR | _NO_SURPRISES
    if not create:
        return _checked(path, lambda: os.open(path, flags))

    def create_or_open() -> int:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            return os.open(path, flags)
        os.fchmod(fd, mode)
        return fd

    return _checked(path, create_or_open)


def open_quietly(path: str, flags: int, *, dir_fd: int | None = None) -> int:
    """``os.open`` for reading without updating the file's atime, where the kernel allows
    it (``O_NOATIME``: the file's owner, or root); anyone else gets a plain open.

    Entries keep their creation time in atime (see store.py), and a read-only
    cache must not change even that.
    """
    if _O_NOATIME:
        try:
            return os.open(path, flags | _O_NOATIME, dir_fd=dir_fd)
        except PermissionError as exc:
            if exc.errno != errno.EPERM:  # EACCES: not readable at all
                raise
    return os.open(path, flags, dir_fd=dir_fd)


def _checked(path: str, opener: Callable[[], int]) -> int:
    try:
        fd = opener()
    except OSError as exc:
        if exc.errno in _PROBLEMS:
            raise not_a_regular_file(path, _PROBLEMS[exc.errno], exc.errno) from exc
        raise
    try:
        kind = os.fstat(fd).st_mode
        if not stat.S_ISREG(kind):
            raise not_a_regular_file(path, f"is not a regular file (mode {kind:o})", errno.EINVAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def not_a_regular_file(path: str, problem: str, code: int) -> BookkeepingError:
    return BookkeepingError(
        code,
        f"bookkeeping file {path} {problem}: something else was put in its place; "
        "remove it (the cache re-creates it) or point base_dir at another directory",
        path,
    )


def lock_retries(seconds: float) -> Iterator[bool]:
    """Pauses between tries of a lock another process holds for milliseconds (1 ms,
    doubling to 50 ms), each ``next()`` one, for ``seconds`` from the first; then none
    (``next(retries, False)`` is False): the holder is stopped or hung, and the caller
    raises naming the file."""
    deadline, delay = time.monotonic() + seconds, 0.001
    while time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(2 * delay, 0.05)
        yield True


def pread_fully(fd: int, size: int, offset: int = 0) -> bytes:
    """``size`` bytes at ``offset``, fewer only at the end of the file: a read that returns
    less than asked (FUSE and network filesystems may) is not the file's end."""
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    chunks, got = [data], len(data)
    while got < size and (chunk := os.pread(fd, size - got, offset + got)):
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_bounded(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes from the start of ``fd``, plus one to tell a longer file."""
    return pread_fully(fd, limit + 1)


class Watch:
    """When to check that ``path`` still names the file a process has open, and to
    refresh that file's timestamps (see CHECK_INTERVAL)."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.identity = identity(os.fstat(fd))
        self.next_check = time.monotonic() + CHECK_INTERVAL
        self.next_touch = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() >= self.next_check

    def still_current(self, fd: int) -> bool:
        """True if ``path`` still names the file open on ``fd`` (its times refreshed when
        due); False if it was deleted or replaced."""
        now = time.monotonic()
        self.next_check = now + CHECK_INTERVAL
        try:
            current = identity(os.stat(self.path))
        except FileNotFoundError:
            return False
        if current != self.identity:
            return False
        if now >= self.next_touch:
            self.next_touch = now + TOUCH_INTERVAL
            touch(fd)
        return True

    def moved_to(self, fd: int) -> None:
        self.identity = identity(os.fstat(fd))


def identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def touch(target: int | str) -> None:
    """Set a file's times to now (by descriptor, or by path without following a link), so
    age-based tmp cleaners (systemd-tmpfiles, tmpwatch) see it in use; best effort."""
    with contextlib.suppress(OSError, NotImplementedError):
        if isinstance(target, int):
            os.utime(target)
        else:
            os.utime(target, follow_symlinks=False)


def make_dir(path: str, mode: int) -> None:
    """``os.mkdir`` with exactly ``mode``; FileExistsError if something is there."""
    os.mkdir(path, mode)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:  # by descriptor: never chmod through a symlink swapped in meanwhile
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
