"""Shared size accounting: a byte and an entry counter per shard, in one mmap'd file.

Each counter is changed only while its shard's byte-range lock is held, so a
``set`` pays O(1) bookkeeping and never lists the cache.  Totals are the sum of
the shard counters, read without locks (a racing write only makes the sum a
moment old).  A writer killed between publishing a file and updating its
counter leaves drift; every maintenance scan recomputes the counters from the
files (``reconcile``), and a scan runs automatically every
``reconcile_interval`` seconds, so drift is never permanent.

File layout (little endian)::

    header (64 bytes): magic "DFSA" | version u32 | shard count u32 | pad
                       | last reconcile time f64 at offset 16
    shard i:           bytes i64 | entries i64       at offset 64 + 16 * i
"""

from __future__ import annotations

import mmap
import os
import struct

from .files import open_shared

MAGIC = b"DFSA"
VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<4sII")
_RECONCILED = struct.Struct("<d")
_RECONCILED_OFFSET = 16
_SHARD = struct.Struct("<qq")
_EXISTING_FLAGS = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW


class NeedsReset(Exception):
    """The accounting file is missing or malformed and must be (re)made under the lock."""


class AccountingFile:
    """Counters of one cache directory, shared by every process through mmap."""

    def __init__(self, path: str, shard_count: int, mode: int, *, may_reset: bool) -> None:
        """Map the counters; a missing or malformed file raises :class:`NeedsReset`
        unless ``may_reset`` (only while the maintenance lock is held)."""
        self.path = path
        self.shard_count = shard_count
        size = HEADER_SIZE + _SHARD.size * shard_count
        header = _HEADER.pack(MAGIC, VERSION, shard_count)
        try:
            fd = open_shared(path, mode) if may_reset else os.open(path, _EXISTING_FLAGS)
        except FileNotFoundError as exc:
            raise NeedsReset(path) from exc
        try:
            if os.fstat(fd).st_size != size or os.pread(fd, len(header), 0) != header:
                if not may_reset:
                    raise NeedsReset(path)
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
                os.pwrite(fd, header, 0)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._totals = struct.Struct(f"<{2 * shard_count}q")

    def add(self, shard: int, size_delta: int, entries_delta: int) -> None:
        """Adjust shard ``shard``; the caller holds that shard's lock."""
        offset = HEADER_SIZE + _SHARD.size * shard
        size, entries = _SHARD.unpack_from(self._map, offset)
        _SHARD.pack_into(self._map, offset, size + size_delta, entries + entries_delta)

    def set(self, shard: int, size: int, entries: int) -> None:
        """Overwrite shard ``shard`` with counted values; the caller holds its lock."""
        _SHARD.pack_into(self._map, HEADER_SIZE + _SHARD.size * shard, size, entries)

    def totals(self) -> tuple[int, int]:
        """(bytes, entries) over all shards, never negative."""
        values = self._totals.unpack_from(self._map, HEADER_SIZE)
        return max(0, sum(values[0::2])), max(0, sum(values[1::2]))

    @property
    def last_reconcile(self) -> float:
        when: float = _RECONCILED.unpack_from(self._map, _RECONCILED_OFFSET)[0]
        return when

    @last_reconcile.setter
    def last_reconcile(self, when: float) -> None:
        _RECONCILED.pack_into(self._map, _RECONCILED_OFFSET, when)
