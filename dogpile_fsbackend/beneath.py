"""Create a file below a directory, following no symlink on the way (Linux openat2).

A write never goes through a symlink planted in place of a shard directory
(README, guarantee 6).  Checked by path, that costs a ``stat`` of the
directory before every create (``Store.is_our_dir``).  Linux 5.6's
openat2(2) with ``RESOLVE_NO_SYMLINKS`` refuses a symlink on any level of the
path itself (ELOOP), so the check and the create are one system call.
Python has no binding for it (3.13 neither), so it is called through
ctypes.  Where it is missing (another OS or architecture, a kernel before
5.6, a seccomp filter that refuses it, valgrind), :func:`available` is False
and callers check the path themselves.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

from . import files

# openat2's number on these architectures (the unified syscall table, Linux 5.6);
# others (mips, alpha) number it differently and take the path check instead.
_SYS_OPENAT2 = 437
_ARCHITECTURES = frozenset(
    {"x86_64", "aarch64", "arm64", "i386", "i686", "armv7l", "ppc64le", "s390x", "riscv64"}
)
_RESOLVE_NO_SYMLINKS = 0x04
_AT_FDCWD = -100
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_O_LARGEFILE = getattr(os, "O_LARGEFILE", 0)  # 0 where off_t is 64-bit anyway


class _OpenHow(ctypes.Structure):
    """``struct open_how`` of openat2(2)."""

    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


_Syscall = Callable[[int, int, bytes, int, int], int]


@functools.cache
def _openat2() -> _Syscall | None:
    """libc's ``syscall`` set up for openat2, if openat2 works here (probed once)."""
    if not sys.platform.startswith("linux") or platform.machine() not in _ARCHITECTURES:
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    call.restype = ctypes.c_long
    call.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p]
    call.argtypes += [ctypes.c_size_t]
    how = _OpenHow(_DIRECTORY_FLAGS, 0, _RESOLVE_NO_SYMLINKS)
    fd = call(_SYS_OPENAT2, _AT_FDCWD, b"/", ctypes.addressof(how), ctypes.sizeof(how))
    if fd < 0:  # ENOSYS (old kernel, valgrind) or EPERM (a seccomp filter)
        return None
    os.close(fd)
    return call


def available() -> bool:
    """True if :class:`Creator` works in this process."""
    return _openat2() is not None


class Creator:
    """Opens files with ``flags`` and ``mode`` below ``directory``, kept open.

    Paths are given whole (they start with ``directory``) and resolved from
    the kept descriptor, so only the levels below ``directory`` are checked:
    its own path may run through a symlink (``/var/cache`` -> ``/srv/cache``).
    The caller renames the files it made by path, so the descriptor must name
    what the path names: once a second (``files.CHECK_INTERVAL``), and on a
    path error, it is opened again if the path now names another directory
    (removed and made again, renamed away, a symlink switched).  No lock: a
    replaced descriptor stays open until the creator goes, as another thread
    may be resolving from it, and two threads renewing at once just open one
    more.
    """

    def __init__(self, directory: str, flags: int, mode: int) -> None:
        call = _openat2()
        if call is None:
            raise OSError(errno.ENOSYS, "openat2 is not available here")
        self._call = call
        self.directory = directory
        self._prefix = len(os.path.join(directory, ""))
        # glibc's open adds O_LARGEFILE for a 32-bit process; a raw openat2 on a 32-bit
        # kernel does not, and writes past 2 GiB would fail (EFBIG).
        self._how = _OpenHow(flags | _O_LARGEFILE, mode, _RESOLVE_NO_SYMLINKS)
        self._how_address = ctypes.addressof(self._how)
        self._how_size = ctypes.sizeof(self._how)
        self._opened: list[_Directory] = []  # every descriptor opened, closed with us
        self._current = self._open_directory()  # replaced whole: never a torn pair
        self._next_check = time.monotonic() + files.CHECK_INTERVAL

    def _open_directory(self) -> _Directory:
        fd = os.open(self.directory, _DIRECTORY_FLAGS)
        opened = _Directory(fd, files.identity(os.fstat(fd)))
        self._opened.append(opened)
        return opened

    @property
    def fd(self) -> int:
        """The descriptor of ``directory`` that files are resolved from now."""
        return self._current.fd

    def __del__(self) -> None:
        with contextlib.suppress(AttributeError):
            for fd, identity in dict.fromkeys(self._opened):
                if _is_ours(fd, identity):  # never another file that took the number
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def open(self, path: str) -> int:
        """``os.open(path, flags, mode)``, but ELOOP if a level between the directory and
        the file is a symlink (a symlink as the file itself fails as with os.open)."""
        if time.monotonic() >= self._next_check:
            self.renew_if_moved()
        relative = path[self._prefix :].encode()
        renewed = False
        while True:
            fd = self._call(
                _SYS_OPENAT2, self._current.fd, relative, self._how_address, self._how_size
            )
            if fd >= 0:
                return fd
            code = ctypes.get_errno()
            if code == errno.EBADF and not renewed:  # closed behind our back: open it again
                renewed = True
                self.renew_if_moved()
            elif code != errno.EINTR:
                raise OSError(code, os.strerror(code), path)

    def renew_if_moved(self) -> None:
        """Open the directory again if its path now names another one, or if the kept
        descriptor is no longer ours (something closed it; its number may now be another
        file's, which is left alone)."""
        self._next_check = time.monotonic() + files.CHECK_INTERVAL
        current = self._current
        try:
            now = files.identity(os.stat(self.directory))
        except OSError:
            return  # missing, or unusable: the caller's path repair tells
        if now == current.identity and _is_ours(*current):
            return
        with contextlib.suppress(OSError):
            self._current = self._open_directory()


class _Directory(NamedTuple):
    fd: int
    identity: tuple[int, int]


def _is_ours(fd: int, identity: tuple[int, int]) -> bool:
    """True if ``fd`` still names the directory of ``identity`` (not closed meanwhile,
    its number not taken by another file)."""
    try:
        return files.identity(os.fstat(fd)) == identity
    except OSError:
        return False
