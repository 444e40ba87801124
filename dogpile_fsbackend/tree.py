"""The shard tree under ``data/``: its leaf directories, and what one directory holds.

Reading only: nothing here takes a lock or changes a file.  The scans that
judge and clean up (maintenance.py) and the writers' eviction (eviction.py)
walk the tree through these functions, so a path through a planted symlink
is never listed, and a directory this process may not read is skipped with
one warning, the same way everywhere.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Iterator
from typing import TYPE_CHECKING

from . import layout as paths

if TYPE_CHECKING:
    from .store import Store

UNREADABLE = "directory is not readable by this process; skipped"


def leaf_dirs(store: Store, shard: int) -> tuple[list[str], int]:
    """The entry directories of a shard, and how many directories could not be read.

    A path through a planted symlink is never listed; one this process may
    not read is skipped (with one warning).
    """
    current = [store.layout.shard_dir(shard)]
    unreadable = 0
    for _ in range(store.layout.depth - store.layout.shard_levels):
        deeper: list[str] = []
        for directory in current:
            try:
                with os.scandir(directory) as it:
                    deeper.extend(item.path for item in it if item.is_dir(follow_symlinks=False))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except PermissionError:
                store.warn_once(directory, UNREADABLE)
                unreadable += 1
        current = deeper
    return [directory for directory in current if _is_usable_dir(store, directory)], unreadable


def _is_usable_dir(store: Store, directory: str) -> bool:
    try:
        return store.is_our_dir(directory)
    except PermissionError:
        return False


@dataclasses.dataclass
class Listing:
    """What one leaf directory holds, sorted by name, with one ``lstat`` per file."""

    records: dict[str, os.stat_result] = dataclasses.field(default_factory=dict)  # by digest
    data: dict[str, list[tuple[str, os.stat_result]]] = dataclasses.field(default_factory=dict)
    temps: list[tuple[str, str, os.stat_result]] = dataclasses.field(default_factory=list)
    junk: list[str] = dataclasses.field(default_factory=list)  # foreign names, symlinks, FIFOs
    foreign_dirs: list[str] = dataclasses.field(default_factory=list)

    @property
    def files(self) -> int:
        """Names listed: the work a listing took."""
        data = sum(len(found) for found in self.data.values())
        return len(self.records) + data + len(self.temps) + len(self.junk)


def list_dir(store: Store, directory: str) -> Listing | None:
    """Sort what ``directory`` holds; None if it is gone.

    PermissionError (warned once) if this process may not read it.
    """
    try:
        with os.scandir(directory) as it:
            items = list(it)
    except PermissionError:
        store.warn_once(directory, UNREADABLE)
        raise
    except (FileNotFoundError, NotADirectoryError):
        return None
    found = Listing()
    for item in items:
        try:
            info = item.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if paths.is_temp_name(item.name):
            found.temps.append((item.name, item.path, info))
            continue
        if stat.S_ISDIR(info.st_mode):
            found.foreign_dirs.append(item.path)
            continue
        parsed = paths.split_entry_name(item.name)
        if parsed is None or not stat.S_ISREG(info.st_mode):
            found.junk.append(item.path)
        elif parsed[1] is None:
            found.records[parsed[0]] = info
        else:
            found.data.setdefault(parsed[0], []).append((item.path, info))
    return found


def record_stats(store: Store, directory: str) -> Iterator[tuple[str, os.stat_result]]:
    """(digest, lstat) of each record file in ``directory``, lazily, one ``lstat`` each.

    Data files, temp files and anything else are passed over without a
    ``stat``.  The directory stays open between items, so a caller can take
    a few at a time (see eviction.py); closing the iterator closes it.
    """
    try:
        with os.scandir(directory) as it:
            for item in it:
                name = item.name
                if len(name) != paths.HASH_HEX_LEN or paths.split_entry_name(name) is None:
                    continue
                try:
                    info = item.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(info.st_mode):
                    yield name, info
    except PermissionError:
        store.warn_once(directory, UNREADABLE)
    except (FileNotFoundError, NotADirectoryError):
        return
