"""Shared size accounting: a byte and an entry counter per shard, in one small file.

Each counter is changed only while its shard's byte-range lock is held, with
``os.pread``/``os.pwrite`` (never ``mmap``: a file that another process or a
person shortens would kill every process that maps it with SIGBUS).  A
publish reads the whole file in the same ``pread`` that fetches its shard's
counters, writes them, and reads the whole file once more: that second read
gives the total it has just produced, exact for the last of several
publishes at the same moment (``add`` returns the total; ``seen_reconcile``
keeps the time of the last recount): a ``set`` pays three calls of bookkeeping.
The total is exact (the sum of the counters as read) at O(1) Python work per
set: each process keeps the table it read last with its sums and adds in
only the counters that differ (``_updated``: one compare of the table in C,
then of the changed chunks).  A shard's counters are always taken from the
writer's own read, never from what is kept.  There is no shared total word: writers of
different shards hold different locks, so they could not update one without
losing each other's changes.

Drift (a writer killed between publishing a file and updating its counter, a
file deleted by hand) is repaired by every scan, which recomputes the
counters from the files (``reconcile``); a scan runs automatically every
``reconcile_interval`` seconds, so drift is never permanent.

Damage and replacement, from any cause, are survived:

* a table that reads short or with a wrong header is repaired by writing a
  complete new file under a temp name and renaming it over the old one
  (never truncating a file other processes use); the new file is marked for
  a recount (``last_reconcile`` 0);
* every process checks at most once a second that the path still names the
  file it has open; a deleted or replaced file is left for the one now there
  (created if there is none), and a process that counted writes into the old
  file since its previous check marks the new one for a recount, so all
  processes converge on one file and the recount restores exact counts.

File layout (little endian)::

    header (64 bytes): magic "DFSA" | version u32 | shard count u32 | pad
                       | last reconcile time f64 at offset 16
    shard i:           bytes i64 | entries i64       at offset 64 + 16 * i
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
import threading
import time
from collections.abc import Callable

from . import files, forking
from .exceptions import BookkeepingError
from .files import open_shared

log = logging.getLogger(__name__)

MAGIC = b"DFSA"
VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<4sII")
_RECONCILED = struct.Struct("<d")
_RECONCILED_OFFSET = 16
_SHARD = struct.Struct("<qq")
_CHUNK = 16 * _SHARD.size  # counters compared at once by _updated
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_SNAPSHOT_READS = 8  # further reads of the table to find two in a row alike
_RETIRE_AFTER = 1.0  # seconds a descriptor moved off stays open (see _switch_to)
_OPEN_ATTEMPTS = 8  # to find a well-formed file at the path (about 60 ms of waiting at most)

# The table this process read last and its sums (bytes, entries), kept to sum the next
# read by difference.  Replaced whole, never changed in place: threads of one process
# that count at once each work from a table and sums that agree.
_Sums = tuple[bytes | bytearray, int, int]


class AccountingFile:
    """Counters of one cache directory, shared by every process through one file."""

    def __init__(
        self,
        path: str,
        shard_count: int,
        mode: int,
        temp_suffix: Callable[[], str],
        *,
        writable: bool = True,
    ) -> None:
        """Open the counters, creating the file if there is none.

        ``temp_suffix`` names the temp file of a new file (``.tmp-<writer>-<n>``,
        so that a scan can tell one its writer left behind).

        A file that is not a regular file raises BookkeepingError; a damaged
        one is replaced.  ``writable=False`` (a read-only cache) reads what is
        there and repairs nothing: a damaged or missing file reads as zeros.
        """
        self.path = path
        self.shard_count = shard_count
        self.mode = mode
        self.writable = writable
        self._temp_suffix = temp_suffix
        self._size = HEADER_SIZE + _SHARD.size * shard_count
        self._header = _HEADER.pack(MAGIC, VERSION, shard_count)
        self._dirty = False  # counted into our file since the last identity check
        self._sums: _Sums = (bytes(self._size), 0, 0)  # all zero: sums 0
        self.seen_reconcile = 0.0  # last_reconcile as the latest table read found it
        # Descriptors of files this process moved off, with when (monotonic): see _switch_to.
        self._retired: list[tuple[int, float]] = []
        self._switching = threading.Lock()
        forking.reset_in_children(self)
        self._fd = self._open()
        self._watch = files.Watch(path, self._fd)

    def __del__(self) -> None:
        # No lock lives on this file, so closing it drops nothing: a process that
        # makes backends again and again (tests, reloads) must not run out of them.
        with contextlib.suppress(AttributeError, OSError):
            for fd, _ in self._retired:
                os.close(fd)
            os.close(self._fd)

    # -- counters (the caller holds the shard's lock for changes) -------------

    def add(self, shard: int, size_delta: int, entries_delta: int) -> tuple[int, int]:
        """Adjust shard ``shard``; return the totals of all shards afterwards (bytes, entries).

        The shard's counters come from this call's own read of the table
        (exact: the caller holds the shard's lock), never from the sums kept,
        which another thread of this process may have just set from an older read.
        The totals come from a second read, after the counter write: of publishes
        at the same moment in other shards, each one's first read may miss all the
        others (each total "well under" while together they took the cache over),
        but the last of them to read again sees every count, its own included.
        """
        table = self._read_table()
        sums = self._sums
        if sums[0] != table:  # another writer counted since this process read last
            sums = _updated(sums, table)
        at = HEADER_SIZE + _SHARD.size * shard
        size, count = _SHARD.unpack_from(table, at)
        packed = _SHARD.pack(size + size_delta, count + entries_delta)
        os.pwrite(self._fd, packed, at)
        self._dirty = True
        written = bytearray(table)  # a copy of its own: a kept table never changes
        written[at : at + _SHARD.size] = packed
        sums = (written, sums[1] + size_delta, sums[2] + entries_delta)
        again = self._read_again()
        if again != written:  # others counted between the two reads
            sums = _updated(sums, again)
        self._sums = sums
        _, total, entries = sums
        return total if total > 0 else 0, entries if entries > 0 else 0  # not max(): every set

    def set(self, shard: int, size: int, entries: int) -> None:
        """Overwrite shard ``shard`` with counted values."""
        self._check_if_due()
        os.pwrite(self._fd, _SHARD.pack(size, entries), HEADER_SIZE + _SHARD.size * shard)
        self._dirty = True

    def totals(self) -> tuple[int, int]:
        """(bytes, entries) over all shards at one moment, never negative.

        Writers of different shards change the table independently, and one
        ``pread`` copying it may be interrupted between two of them, counting an
        evicted entry beside the write that followed its eviction: the table is
        read until two reads in a row agree (two reads in a quiet cache).
        """
        table = self._read_table()
        for _ in range(_SNAPSHOT_READS):
            again = self._read_table()
            if again == table:
                break
            table = again
        self._sums = _, total, entries = _updated(self._sums, table)
        return max(0, total), max(0, entries)

    @property
    def identity(self) -> tuple[int, int]:
        """(device, inode) of the file this process counts into now."""
        return self._watch.identity

    @property
    def last_reconcile(self) -> float:
        self._check_if_due()
        data = os.pread(self._fd, _RECONCILED.size, _RECONCILED_OFFSET)
        return _RECONCILED.unpack(data)[0] if len(data) == _RECONCILED.size else 0.0

    @last_reconcile.setter
    def last_reconcile(self, when: float) -> None:
        self._check_if_due()
        os.pwrite(self._fd, _RECONCILED.pack(when), _RECONCILED_OFFSET)

    # -- damage, deletion and replacement -------------------------------------

    def _read_table(self) -> bytes:
        """The file as stored, header and counters (counters all zero if the file was
        damaged): kept whole, so that no read is copied again to cut the header off."""
        self._check_if_due()
        data = os.pread(self._fd, self._size, 0)
        if len(data) != self._size:
            data = files.pread_fully(self._fd, self._size)  # a short read is not damage
        if len(data) == self._size and data.startswith(self._header):
            self.seen_reconcile = _RECONCILED.unpack_from(data, _RECONCILED_OFFSET)[0]
            return data
        self._refuse_another_layout(data)
        self.seen_reconcile = 0.0
        if self.writable:
            log.warning("accounting file %s is damaged; replaced it, recount due", self.path)
            self._replace_damaged()
        return bytes(self._size)

    def _read_again(self) -> bytes:
        """The table read again at once (``add``): as ``_read_table``, without its
        periodic identity check and recount time, which the first read just made."""
        data = os.pread(self._fd, self._size, 0)
        if len(data) == self._size and data.startswith(self._header):
            return data
        return self._read_table()

    def _refuse_another_layout(self, data: bytes) -> None:
        """A whole header of another shard count is another layout's file, not damage:
        replacing it would start a tug of war with the process that made it."""
        if len(data) < _HEADER.size:
            return
        magic, version, count = _HEADER.unpack_from(data)
        if magic == MAGIC and version == VERSION and count != self.shard_count:
            raise BookkeepingError(
                errno.EINVAL,
                f"accounting file {self.path} counts {count} shards, this process "
                f"{self.shard_count}: the directory was set up again with another layout "
                "while this process used it; restart it with the directory's shard_depth "
                "and shard_width",
                self.path,
            )

    def _check_if_due(self) -> None:
        if self._watch.due():
            self.check_identity()

    def check_identity(self) -> None:
        """Move to the file now at our path if ours was deleted or replaced."""
        if not self.writable:
            return  # a read-only cache changes nothing, not even the file's timestamps
        dirty, self._dirty = self._dirty, False
        if self._watch.still_current(self._fd):
            return
        try:
            self._switch_to(self._open())
        except OSError as exc:
            log.warning(
                "accounting file %s was replaced by something unusable: %s", self.path, exc
            )
            return
        log.warning("accounting file %s was deleted or replaced; moved to the new one", self.path)
        if dirty:  # what we counted into the old file is lost
            os.pwrite(self._fd, _RECONCILED.pack(0.0), _RECONCILED_OFFSET)

    def _open(self) -> int:
        """A descriptor on a well-formed file at our path (published whole if missing)."""
        for attempt in range(_OPEN_ATTEMPTS):  # another process may be replacing it meanwhile
            if attempt > 1:  # or damaging it again and again: give the file time to settle
                time.sleep(0.001 * 2 ** (attempt - 2))
            try:
                fd = open_shared(self.path, self.mode, writable=self.writable, create=False)
            except FileNotFoundError:
                if not self.writable:  # a read-only cache copied without it: gets need none
                    log.warning("accounting file %s is missing; counters read zero", self.path)
                    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)  # reads empty
                self._publish(replace=False)
                continue
            data = files.pread_fully(fd, len(self._header))
            if (data == self._header and os.fstat(fd).st_size >= self._size) or not self.writable:
                return fd
            os.close(fd)  # only ours: a descriptor of a file we never locked
            self._refuse_another_layout(data)
            self._publish(replace=True)
        raise OSError(f"accounting file {self.path} keeps changing under this process")

    def _replace_damaged(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if files.identity(os.stat(self.path)) == self._watch.identity:
                self._publish(replace=True)  # nobody has repaired it yet
        self._switch_to(self._open())

    def _switch_to(self, fd: int) -> None:
        """Count into ``fd`` from now on.  The old descriptor stays open a while: another
        thread may hold its number inside ``os.pread``/``os.pwrite`` (the GIL released,
        the call not yet made), and a number closed at once is the next one this process
        opens (an entry's temp file), which that call would then read or write."""
        now = time.monotonic()
        with self._switching:  # two threads that switch at once retire different files
            old, self._fd = self._fd, fd
            self._watch.moved_to(fd)
            done = [retired for retired, when in self._retired if now - when >= _RETIRE_AFTER]
            self._retired = [item for item in self._retired if item[0] not in done]
            self._retired.append((old, now))
        for retired in done:
            os.close(retired)  # no locks live on this file: closing it drops nothing

    def _reset_after_fork(self) -> None:
        self._switching = threading.Lock()  # another thread of the parent may have held it

    def _publish(self, replace: bool) -> None:
        """Write a complete new file (zero counters, recount due) and put it at our path.

        ``replace=False`` only fills a missing file (a link fails if another
        process published first); ``replace=True`` renames over a damaged one.
        """
        temp_path = f"{self.path}{self._temp_suffix()}"
        fd = os.open(temp_path, _CREATE_FLAGS, self.mode)
        try:
            os.fchmod(fd, self.mode)
            os.pwrite(fd, self._header.ljust(self._size, b"\0"), 0)
            if replace:
                os.replace(temp_path, self.path)
            else:
                with contextlib.suppress(FileExistsError):
                    os.link(temp_path, self.path)
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_path)


def _updated(sums: _Sums, table: bytes) -> _Sums:
    """``sums`` brought up to ``table``: one ``memcmp`` when nobody else counted
    meanwhile, then only the counters of the chunks that differ are added in (the
    exact sum, without summing every shard per set)."""
    kept, total, entries = sums
    if kept == table:
        return sums
    for low in range(HEADER_SIZE, len(table), _CHUNK):
        high = min(low + _CHUNK, len(table))
        if kept[low:high] == table[low:high]:
            continue
        for at in range(low, high, _SHARD.size):
            old, new = _SHARD.unpack_from(kept, at), _SHARD.unpack_from(table, at)
            total += new[0] - old[0]
            entries += new[1] - old[1]
    return table, total, entries
