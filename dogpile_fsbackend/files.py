"""Creating the cache's files and directories with exactly the permissions asked for.

``open()`` and ``mkdir()`` reduce the mode they are given by the umask, so a
group-shared cache (``file_mode=0o660``, ``dir_mode=0o770``) would come out
``0o640``/``0o750`` under the usual umask 022 and other users of the group
could not write.  What we create is therefore chmod'ed to the mode asked for;
what already exists keeps its mode (it may not be ours to change).
"""

from __future__ import annotations

import os

_SHARED_FLAGS = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW


def open_shared(path: str, mode: int) -> int:
    """Open (or create, with exactly ``mode``) a file every process of the cache shares."""
    try:
        fd = os.open(path, _SHARED_FLAGS | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return os.open(path, _SHARED_FLAGS)
    os.fchmod(fd, mode)
    return fd


def make_dir(path: str, mode: int) -> None:
    """``os.mkdir`` with exactly ``mode``; FileExistsError if something is there."""
    os.mkdir(path, mode)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:  # by descriptor: never chmod through a symlink swapped in meanwhile
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
