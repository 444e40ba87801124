"""Listing the keys of a cache, and deleting the entries whose keys start with a prefix.

Every entry stores its original key (records.py), so a walk of the shard
directories can name them.  The walk holds one directory's names at a time
(never a list of all keys), opens each level relative to the one above it
without following links (a planted symlink leads nowhere), and reads records
as maintenance peeks at them: without updating their atime where the kernel
allows it, never stamping them, never removing anything.  An entry that is
damaged, foreign, expired, unreadable or not where a get would look for it is
simply not listed; reads and scans deal with it.

``delete_matching`` removes every entry whose key matches, expired and
damaged ones too (a get would remove those anyway, and a user who deletes a
user's keys wants none of them left on disk): the key, which must hash to the
file's name, is all it judges by.  It removes them one at a time through
``Store.discard`` with the inode and the header it judged: under the entry's
shard lock for a moment, and only if the file is still the one judged, so a
value rewritten meanwhile (a new file, even one given the same inode number
again) stays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import stat
import time
from collections.abc import Callable, Iterator

from . import layout as paths
from . import records
from .files import open_quietly, pread_fully
from .store import Store, creation_time, read_entry

Progress = Callable[[int], None]  # called with the number of shards just finished
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted where an entry belongs must not hang the walk.
_ENTRY_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# Gone, or something planted: a file or a symlink (loop) in a directory's place, a Unix
# socket in an entry's (ENXIO).
_MISSING = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENXIO})
_HEAD = 4096  # first read of a record: its header and, nearly always, its whole key


@dataclasses.dataclass(frozen=True)
class Listed:
    """An entry as the walk judged it (see ``entries``)."""

    key: str
    digest: str
    inode: int
    size: int  # record plus data file
    # The record's first bytes: its creation time and the CRC of the whole value tell a
    # later file from this one when the filesystem reuses the inode number (ext4 does).
    header: bytes


@dataclasses.dataclass
class Deleted:
    """What ``delete_matching`` removed."""

    removed: int = 0
    removed_bytes: int = 0
    interrupted: bool = False  # stopped early when asked (the CLI's Ctrl-C)


def entries(
    store: Store, prefix: bytes, progress: Progress | None = None, *, live: bool = True
) -> Iterator[Listed]:
    """Every live entry whose key starts with ``prefix``, shard by shard; with
    ``live=False`` also the expired and damaged ones that still name their key."""
    for shard in range(store.layout.shard_count):
        for directory, path, spelled in _entry_dirs(store, shard):
            yield from _entries_in(store, directory, path, spelled, prefix, live)
        if progress:
            progress(1)


def delete_matching(
    store: Store,
    prefix: bytes,
    progress: Progress | None = None,
    stop: Callable[[], bool] | None = None,
) -> Deleted:
    """Remove every entry whose key starts with ``prefix`` (see the module docstring);
    when ``stop()`` turns true, stop before the next one (``Deleted.interrupted``)."""
    deleted = Deleted()
    for entry in entries(store, prefix, progress, live=False):
        if stop and stop():
            deleted.interrupted = True
            break
        if freed := store.discard(entry.digest, entry.inode, header=entry.header):
            deleted.removed += 1
            deleted.removed_bytes += freed
    return deleted


def _entry_dirs(store: Store, shard: int) -> Iterator[tuple[int, str, str]]:
    """(descriptor, path, hex digits its names spell) of each entry directory of a shard."""
    layout = store.layout
    data = _open_dir(store, layout.data_dir, None)
    if data is None:
        return
    shard_hex = format(shard, f"0{layout.shard_levels * layout.width}x")
    try:
        yield from _below(store, data, layout.data_dir, "", shard_hex)
    finally:
        os.close(data)


def _below(
    store: Store, directory: int, path: str, spelled: str, shard_hex: str
) -> Iterator[tuple[int, str, str]]:
    """The entry directories at or below ``directory``, whose names so far spell ``spelled``:
    the shard's own levels are named by ``shard_hex``, deeper ones are listed."""
    layout = store.layout
    if len(spelled) == layout.depth * layout.width:
        yield directory, path, spelled
        return
    level = shard_hex[len(spelled) : len(spelled) + layout.width]
    for name in [level] if level else _hex_subdirectories(store, directory):
        child = _open_dir(store, f"{path}/{name}", directory, name)
        if child is None:
            continue
        try:
            yield from _below(store, child, f"{path}/{name}", spelled + name, shard_hex)
        finally:
            os.close(child)


def _open_dir(store: Store, path: str, parent: int | None, name: str | None = None) -> int | None:
    """A descriptor of a directory (``name`` in ``parent``, else ``path``); None if there
    is none, or only a link or a file, or this process may not read it (warned once)."""
    try:
        return open_quietly(name or path, _DIR_FLAGS, dir_fd=parent)
    except PermissionError:
        store.warn_once(path, "directory is not readable by this process; not listed")
    except OSError as exc:
        if exc.errno not in _MISSING:
            raise
    return None


def _names(directory: int) -> list[os.DirEntry[str]]:
    """One directory's names (opening it for reading was the permission check)."""
    with os.scandir(directory) as found:
        return list(found)


def _hex_subdirectories(store: Store, directory: int) -> list[str]:
    width = store.layout.width
    return sorted(
        item.name
        for item in _names(directory)
        if len(item.name) == width
        and paths.is_hex(item.name)
        and item.is_dir(follow_symlinks=False)
    )


def _entries_in(
    store: Store, directory: int, path: str, spelled: str, prefix: bytes, live: bool
) -> Iterator[Listed]:
    now = time.time() if live else None
    for item in _names(directory):
        parsed = paths.split_entry_name(item.name)
        if parsed is None or parsed[1] is not None or not item.name.startswith(spelled):
            continue  # a data file, a temp file, a stranger, or an entry out of place
        if not item.is_file(follow_symlinks=False):
            continue  # a link, FIFO, socket, device or directory planted: never opened
        entry = _judge(store, directory, f"{path}/{item.name}", item.name, prefix, now)
        if entry is not None:
            yield entry


def _judge(
    store: Store, directory: int, path: str, digest: str, prefix: bytes, now: float | None
) -> Listed | None:
    """The entry ``digest`` if its key starts with ``prefix`` and, given ``now``, it is
    live then (whole, unexpired, with its data file); without ``now``, any entry that
    names such a key."""
    try:
        fd = open_quietly(digest, _ENTRY_FLAGS, dir_fd=directory)
    except PermissionError:
        store.warn_once(path, "entry is not readable by this process; not listed")
        return None
    except OSError as exc:
        if exc.errno not in _MISSING:
            raise
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        key, data = _matching_key(fd, info.st_size, digest, prefix, store.settings.cache_size)
        if key is None or (text := paths.decode_key(key)) is None:
            return None  # not this entry's key, not asked for, or never a str's (not ours)
        try:
            if len(data) < info.st_size:
                data = read_entry(fd, info.st_size, store.settings.cache_size)
            record: records.Record | None = records.decode(data, store.kind, key)
        except records.DamagedRecord:
            record = None
    finally:
        os.close(fd)
    data_size = _data_size(record, directory, digest) if store.kind == records.KIND_RAW else 0
    header = data[: records.HEADER_SIZE]
    if now is None:
        return Listed(text, digest, info.st_ino, info.st_size + (data_size or 0), header)
    if (
        record is None
        or data_size is None
        or store.is_expired(creation_time(record, info, now), now)
    ):
        return None
    return Listed(text, digest, info.st_ino, info.st_size + data_size, header)


def _matching_key(
    fd: int, size: int, digest: str, prefix: bytes, limit: int
) -> tuple[bytes | None, bytes]:
    """(the entry's key if it hashes to ``digest`` and starts with ``prefix``, the bytes
    read): usually one small read, as the key follows the header."""
    data = pread_fully(fd, _HEAD)
    key = _key_of(data, digest)
    if key is None and len(data) < size:  # a key longer than the first read
        with contextlib.suppress(records.DamagedRecord):
            data = read_entry(fd, size, limit)
            key = _key_of(data, digest)
    return (key if key is not None and key.startswith(prefix) else None), data


def _key_of(data: bytes, digest: str) -> bytes | None:
    key = records.stored_key(data)
    return key if key is not None and paths.key_digest(key) == digest else None


def _data_size(record: records.Record | None, directory: int, digest: str) -> int | None:
    """The size of a raw entry's data file; None if a get would find none that fits."""
    if record is None:
        return None
    with contextlib.suppress(records.DamagedRecord, FileNotFoundError):
        meta = records.RawMeta.from_bytes(record.payload)
        info = os.stat(
            paths.data_file_name(digest, meta.token), dir_fd=directory, follow_symlinks=False
        )
        if stat.S_ISREG(info.st_mode) and info.st_size == meta.size:
            return info.st_size
    return None
