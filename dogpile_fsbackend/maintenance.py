"""Scans of the whole cache: prune, verify and clear, and the recount of one shard.

None of them holds a lock for long, so application writes never wait for a
scan for more than a moment, and a scan can be paused or killed without
blocking anyone (the kernel drops a dead process's locks):

* ``recount_shard`` lists one shard while holding its byte lock (names and
  one ``lstat`` each; no file is read), sets the shard's counters to what it
  found and cleans up debris.  Publishes take the same lock, so the count is
  exact.  About 10 ms for 4,000 entries, the size of a shard of a cache of a
  million.  Writers recount a shard now and then through it (eviction.py).
* ``verify`` reads and checks every entry *without* the lock: a published
  file never changes in place (a new write is a new inode).  What it judged
  damaged goes under the lock, during the shard's recount, only if the file
  is still the one judged.
* ``prune`` recounts every shard and meanwhile builds a histogram of the
  entries' last use (no list of all entries); when over the limit it finds
  the cut in it, and a second pass evicts what is older than the cut.
* ``clear`` unlinks a few hundred files per shard hold, then recounts.

Eviction order: entries past ``expiration_time`` first, then least recently
used (oldest ``mtime``, which every hit and write sets to now).  A victim is
removed only if its file is still the one judged (same inode, same mtime), so
an entry rewritten or read during the scan survives.  What a scan cannot
read (another user's directory or file) is skipped with one warning, never
deleted, and never an exception.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import logging
import math
import os
import stat
import time
from array import array
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, NamedTuple

from . import layout as paths
from . import records, tree
from .store import FUTURE_TOLERANCE, remove_quietly

if TYPE_CHECKING:
    from .store import Store

Progress = Callable[[int], None]  # called with the number of shards just finished
PRUNE_PASSES = 2  # prune reports two passes over the shards (the second when it evicts)
# A temp file whose writer's byte is free is still spared this long after its last write:
# a writer notices a replaced lock file within a second (see locking.py).
TEMP_GRACE = 2.0
_EVICTION_ROUNDS = 3  # prune's eviction passes, when reads keep outdating its judgements
_AGE_BUCKETS = 4096  # of the histogram of last use: each spans under 1% of the age
_AGE_UNIT_NS = 1_000
_AGE_SCALE = _AGE_BUCKETS / math.log(100 * 365 * 86400 * 10**9 / _AGE_UNIT_NS)  # 100 years
_RESERVE_SLACK = 1024  # entries kept beyond the cut, for what reads outdate meanwhile
_RESERVE_MAX = 50_000  # entries prune keeps at once at most (about 15 MB)
_CLEAR_CHUNK = 256  # files one shard hold of clear unlinks at most ...
_CLEAR_HOLD = 0.02  # ... and seconds it lasts at most (a slow disk unlinks in ~1 ms)
_CLEAR_PAUSE = 0.001  # seconds clear waits between holds: a writer waiting gets the lock
log = logging.getLogger(__name__)

# An entry's identity as an lstat saw it: (inode, mtime, ctime) in ns.  A rewrite, a read
# (mtime) or a replacement by a file that reuses the inode number (ctime) changes it.
Identity = tuple[int, int, int]


class Entry(NamedTuple):
    """One entry as a scan saw it (one ``lstat``): the bytes it counts and its times."""

    digest: str
    inode: int
    size: int  # record plus data file
    created_ns: int
    used_ns: int


@dataclasses.dataclass
class ScanReport:
    """What a scan found and repaired."""

    entries: int = 0
    bytes: int = 0
    temp_files_removed: int = 0
    orphans_removed: int = 0
    damaged_removed: int = 0
    unreadable: int = 0  # entries or directories this process may not read: left alone
    foreign_kept: int = 0  # directories in data/ that are not ours: left alone
    accounting_drift: int = 0  # counted bytes minus the counters' bytes before the scan

    def merge(self, other: ScanReport) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


@dataclasses.dataclass
class PruneResult:
    """What prune or clear removed: entries (``expired`` of them past expiration) and bytes.

    Files the scan cleaned up besides entries are counted in ``scan``.
    """

    removed: int = 0
    removed_bytes: int = 0
    expired: int = 0
    scan: ScanReport = dataclasses.field(default_factory=ScanReport)

    def count(self, freed: int, expired: bool) -> None:
        """One entry of ``freed`` bytes removed (nothing if 0: it was not the file judged)."""
        if freed:
            self.removed += 1
            self.removed_bytes += freed
            self.expired += expired


class ShardScan(NamedTuple):
    entries: list[Entry]  # the live entries found
    report: ScanReport
    files: int  # names listed: the work it took


# -- one shard, under its lock ----------------------------------------------------------


def recount_shard(
    store: Store, shard: int, damaged: Mapping[str, Identity] | None = None
) -> ShardScan:
    """List one shard under its lock, set its counters to what its files hold, clean up.

    ``damaged`` maps digests to the identity of files a deep check judged
    damaged: each is removed if it is still that file.  Temp files of dead
    writers, orphaned data files and foreign names go too; the live entries
    are returned.
    """
    report = ScanReport()
    entries: list[Entry] = []
    files = 0
    now_ns = time.time_ns()
    with store.shard_locked(shard):
        # Under the lock: a directory made after a listing could hold a publish it missed.
        directories, report.unreadable = tree.leaf_dirs(store, shard)
        for directory in directories:
            try:
                listing = tree.list_dir(store, directory)
            except PermissionError:
                report.unreadable += 1
                continue
            if listing is None:
                continue
            files += listing.files
            _sort_out_locked(store, directory, listing, damaged or {}, now_ns, entries, report)
        store.accounting.set(shard, report.bytes, report.entries)
    return ShardScan(entries, report, files)


def _sort_out_locked(
    store: Store,
    directory: str,
    listing: tree.Listing,
    damaged: Mapping[str, Identity],
    now_ns: int,
    entries: list[Entry],
    report: ScanReport,
) -> None:
    """Count one directory's entries and remove its debris (its shard lock is held)."""
    for name, path, info in listing.temps:
        if _temp_is_abandoned(store, name, info, now_ns):
            remove_quietly(path)
            report.temp_files_removed += 1
    for path in listing.foreign_dirs:
        store.warn_once(path, "a directory that is not the cache's; left alone")
        report.foreign_kept += 1
    for path in listing.junk:  # symlinks are unlinked, never followed
        remove_quietly(path)
        report.damaged_removed += 1
    for digest, data in listing.data.items():
        if digest not in listing.records or store.kind != records.KIND_RAW:
            for path, _ in data:
                remove_quietly(path)
            report.orphans_removed += len(data)
    for digest, info in listing.records.items():
        path = os.path.join(directory, digest)
        data = listing.data.get(digest, [])
        if damaged.get(digest) == identity(info):
            for doomed in (path, *(p for p, _ in data)):
                remove_quietly(doomed)
            report.damaged_removed += 1
            continue
        entry = _check_entry(
            store, path, digest, _in_the_present(path, info, now_ns), data, report
        )
        if entry is not None:
            entries.append(entry)
            report.entries += 1
            report.bytes += entry.size


def identity(info: os.stat_result) -> Identity:
    return info.st_ino, info.st_mtime_ns, info.st_ctime_ns


def _in_the_present(path: str, info: os.stat_result, now_ns: int) -> os.stat_result:
    """``info``, or a fresh stat after re-dating an entry stamped in the future.

    Times written under a clock far ahead would make an entry outlive newer
    ones; such times are taken for "now", and the file is re-dated so the
    next scan sees its real age from here on.
    """
    tolerance = int(FUTURE_TOLERANCE * 1e9)
    if info.st_mtime_ns <= now_ns + tolerance and info.st_atime_ns <= now_ns + tolerance:
        return info
    with contextlib.suppress(OSError):
        os.utime(path, ns=(now_ns, now_ns), follow_symlinks=False)
        return os.lstat(path)
    return info


def _check_entry(
    store: Store,
    path: str,
    digest: str,
    info: os.stat_result,
    data: list[tuple[str, os.stat_result]],
    report: ScanReport,
) -> Entry | None:
    """An entry's Entry after removing its stale data files; None if it was damaged (and
    removed) or could not be read (and was left alone)."""
    size = info.st_size
    if store.kind == records.KIND_RAW:
        try:
            live = data if len(data) == 1 else _live_data(store, path, digest, data)
        except PermissionError:
            store.warn_once(path, "entry is not readable by this process; left alone")
            report.unreadable += 1
            return None
        if live is None:
            for doomed in (path, *(p for p, _ in data)):
                remove_quietly(doomed)
            report.damaged_removed += 1
            return None
        for stale_path, _ in data:
            if all(stale_path != p for p, _ in live):
                remove_quietly(stale_path)
                report.orphans_removed += 1
        size += sum(i.st_size for _, i in live)
    return Entry(digest, info.st_ino, size, info.st_atime_ns, info.st_mtime_ns)


def _live_data(
    store: Store, path: str, digest: str, data: list[tuple[str, os.stat_result]]
) -> list[tuple[str, os.stat_result]] | None:
    """Read a raw record to learn which data file is live; None if the entry is damaged.

    PermissionError (another user's file) propagates: unreadable is not damaged.
    """
    try:
        meta = records.RawMeta.from_bytes(store.peek_record(digest).payload)
    except PermissionError:
        raise
    except (records.DamagedRecord, OSError):
        return None
    live = [(p, i) for p, i in data if p == f"{path}.{meta.token}" and i.st_size == meta.size]
    return live or None


def _temp_is_abandoned(store: Store, name: str, info: os.stat_result, now_ns: int) -> bool:
    """True if no live writer owns a temp file: judged by its writer's lock, not by pid or age.

    A live writer's temp file is never taken, whatever the clocks say.  One
    named by an older release (``.tmp-<pid>-...``, no writer token) goes once
    it is ``temp_max_age`` old, and any other name at once (nobody writes
    it).
    """
    token = paths.temp_writer(name)
    if token is None:
        return (
            not paths.is_legacy_temp_name(name) or _age(info, now_ns) > store.settings.temp_max_age
        )
    return not store.lock_file.writer_alive(token) and _age(info, now_ns) > TEMP_GRACE


def _age(info: os.stat_result, now_ns: int) -> float:
    """Seconds since ``info``'s mtime.  A time in the future (the clock was stepped back
    since) counts as that far in the past: taken for "now", a dead writer's file would
    stay until the clock caught up, however long that takes."""
    return abs(now_ns - info.st_mtime_ns) / 1e9


def remove_bookkeeping_leftovers(store: Store) -> int:
    """Remove the temp files of new ``accounting`` and marker files whose writer is gone
    (``accounting.tmp-...``, ``fsbackend.json.tmp-...`` in ``base_dir``); how many went.

    Judged like the temp files of entries: a live writer's temp is never taken.
    One of an older release (a random name, no writer token) goes once it is
    ``temp_max_age`` old.
    """
    removed = 0
    now_ns = time.time_ns()
    try:
        with os.scandir(store.settings.base_dir) as it:
            found = [(item, paths.bookkeeping_temp(item.name)) for item in it]
    except OSError as exc:
        store.warn_once(store.settings.base_dir, f"cannot be listed: {exc.strerror}")
        return 0
    for item, temp_part in found:
        if temp_part is None:
            continue
        try:
            info = item.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if paths.temp_writer(temp_part) is None:
            abandoned = _age(info, now_ns) > store.settings.temp_max_age
        else:
            abandoned = _temp_is_abandoned(store, temp_part, info, now_ns)
        if abandoned:
            remove_quietly(item.path)
            removed += 1
    return removed


# -- every shard ----------------------------------------------------------------------


def scan(
    store: Store,
    progress: Progress | None = None,
    visit: Callable[[list[Entry]], None] | None = None,
    deep: bool = False,
) -> ScanReport:
    """Recount every shard in turn; ``visit`` gets each shard's entries, lock released.

    ``deep`` also reads every record, without the lock, and checks it
    against its name, checksum and data file (what ``verify`` does).
    """
    report = ScanReport()
    counted_before = store.totals()[0]
    store.lock_file.check_identity()  # judge writers by the lock file they all use now
    report.temp_files_removed += remove_bookkeeping_leftovers(store)
    for shard in range(store.layout.shard_count):
        damaged = _judge_shard(store, shard, report) if deep else None
        found = recount_shard(store, shard, damaged)
        report.merge(found.report)
        if visit:
            visit(found.entries)
        if progress:
            progress(1)
    store.accounting.last_reconcile = time.time()
    report.accounting_drift = report.bytes - counted_before
    return report


def _judge_shard(store: Store, shard: int, report: ScanReport) -> dict[str, Identity]:
    """Read every record of a shard, without its lock: the identities of damaged ones.

    A file replaced meanwhile has another identity, so a verdict on the old
    one never removes the new one.
    """
    damaged: dict[str, Identity] = {}
    for directory in tree.leaf_dirs(store, shard)[0]:
        for digest, info in tree.record_stats(store, directory):
            path = os.path.join(directory, digest)
            try:
                record = store.peek_record(digest)
                if store.kind == records.KIND_RAW:
                    meta = records.RawMeta.from_bytes(record.payload)
                    data = os.lstat(f"{path}.{meta.token}")
                    if data.st_size != meta.size or not _is_regular(data):
                        raise records.DamagedRecord("data file does not match its record")
            except FileNotFoundError:
                if os.path.lexists(path):  # the record is there, its data file is not
                    damaged[digest] = identity(info)
            except PermissionError:
                store.warn_once(path, "entry is not readable by this process; left alone")
                report.unreadable += 1
            except (records.DamagedRecord, OSError):
                damaged[digest] = identity(info)
    return damaged


def _is_regular(info: os.stat_result) -> bool:
    return stat.S_ISREG(info.st_mode)


def verify(store: Store, progress: Progress | None = None) -> ScanReport:
    """Read and check every entry, remove damaged ones, fix the accounting.

    Entries this process may not read are reported (``unreadable``), never removed.
    """
    return scan(store, progress, deep=True)


# -- prune ---------------------------------------------------------------------------


class _AgeHistogram:
    """Bytes and entries by time since last use, in buckets of under 1% of the age each:
    where prune must cut, in constant memory whatever the number of entries."""

    def __init__(self, now_ns: int) -> None:
        self.now_ns = now_ns
        self.bytes = array("q", bytes(8 * _AGE_BUCKETS))
        self.entries = array("q", bytes(8 * _AGE_BUCKETS))

    def bucket(self, used_ns: int) -> int:
        """Older entries have higher buckets; one used after ``now_ns`` is in bucket 0."""
        age = (self.now_ns - used_ns) / _AGE_UNIT_NS
        return 0 if age <= 1 else min(_AGE_BUCKETS - 1, int(math.log(age) * _AGE_SCALE))

    def add(self, used_ns: int, size: int) -> None:
        index = self.bucket(used_ns)
        self.bytes[index] += size
        self.entries[index] += 1

    def cut(self, excess_bytes: int, excess_entries: int) -> int:
        """The bucket where removing the oldest entries first has freed enough: every
        older bucket goes whole, this one in part (-1: everything goes)."""
        freed = removed = 0
        for index in range(_AGE_BUCKETS - 1, -1, -1):
            freed += self.bytes[index]
            removed += self.entries[index]
            if freed >= excess_bytes and removed >= excess_entries:
                return index
        return -1


class _Reserve:
    """The ``size`` least recently used entries offered: a bounded heap, youngest on top."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._heap: list[tuple[int, int, str]] = []  # (-used_ns, inode, digest)

    def offer(self, used_ns: int, inode: int, digest: str) -> None:
        if len(self._heap) < self.size:
            heapq.heappush(self._heap, (-used_ns, inode, digest))
        elif self._heap and -used_ns > self._heap[0][0]:
            heapq.heapreplace(self._heap, (-used_ns, inode, digest))

    def oldest_first(self) -> Iterator[tuple[int, int, str]]:
        """(used_ns, inode, digest), least recently used first."""
        for negative, inode, digest in sorted(self._heap, reverse=True):
            yield -negative, inode, digest


def limits(store: Store) -> tuple[tuple[int, float], tuple[int, float]]:
    """((cache_size, max_entries), (their low-water marks)); no entry limit is infinite."""
    settings = store.settings
    ratio = settings.eviction_low_water
    max_entries: float = settings.max_entries or math.inf
    low_entries: float = max(1, int(max_entries * ratio)) if settings.max_entries else math.inf
    return (settings.cache_size, max_entries), (int(settings.cache_size * ratio), low_entries)


def prune(store: Store, progress: Progress | None = None) -> PruneResult:
    """Remove expired entries and recount; over a limit, evict down to its low-water mark.

    The first pass recounts shard by shard, removing what has expired and
    building a histogram of the rest's last use; a second one, if a limit is
    exceeded, evicts what is older than the cut the histogram gives.  Holds
    one shard's lock at a time, and that only to recount it.
    """
    result = PruneResult()
    histogram = _AgeHistogram(time.time_ns())
    now = time.time()

    def visit(entries: list[Entry]) -> None:
        for entry in entries:
            if store.is_expired(entry.created_ns / 1e9, now):
                result.count(store.discard(entry.digest, entry.inode, entry.used_ns), True)
            else:
                histogram.add(entry.used_ns, entry.size)

    result.scan = scan(store, progress, visit)
    (size, max_entries), target = limits(store)
    total, entries = store.totals()
    shards = store.layout.shard_count
    if total <= size and entries <= max_entries:
        if progress:
            progress(shards)  # no second pass is needed
        return result
    for round_number in range(_EVICTION_ROUNDS):
        if _evict_older(store, histogram, target, result, progress if not round_number else None):
            break
        histogram = _histogram_of_now(store)  # reads outdated the judgements: judge again
    store.evictions += result.removed - result.expired
    return result


def _histogram_of_now(store: Store) -> _AgeHistogram:
    histogram = _AgeHistogram(time.time_ns())
    for _, info in _every_record(store):
        histogram.add(info.st_mtime_ns, info.st_size)
    return histogram


def _every_record(
    store: Store, progress: Progress | None = None
) -> Iterator[tuple[str, os.stat_result]]:
    """(digest, lstat) of every record, shard by shard, without locks."""
    for shard in range(store.layout.shard_count):
        for directory in tree.leaf_dirs(store, shard)[0]:
            yield from tree.record_stats(store, directory)
        if progress:
            progress(1)


def _evict_older(
    store: Store,
    histogram: _AgeHistogram,
    target: tuple[int, float],
    result: PruneResult,
    progress: Progress | None,
) -> bool:
    """One eviction pass: all older than the histogram's cut, then the oldest of the rest
    (from a bounded reserve) until the cache is down to ``target``.  True if it is."""
    total, entries = store.totals()
    cut = histogram.cut(total - target[0], int(max(0, entries - target[1])))
    at_cut = histogram.entries[cut] if cut >= 0 else 0
    reserve = _Reserve(min(_RESERVE_MAX, at_cut + _RESERVE_SLACK))
    now = time.time()
    for digest, info in _every_record(store, progress):
        used_ns = info.st_mtime_ns
        if store.is_expired(info.st_atime_ns / 1e9, now):
            result.count(store.discard(digest, info.st_ino, used_ns), True)
        elif histogram.bucket(used_ns) > cut:
            result.count(store.discard(digest, info.st_ino, used_ns), False)
        else:
            reserve.offer(used_ns, info.st_ino, digest)
    total, entries = store.totals()
    for used_ns, inode, digest in reserve.oldest_first():
        if total <= target[0] and entries <= target[1]:
            return True
        freed = store.discard(digest, inode, used_ns)
        result.count(freed, False)
        total, entries = (total - freed, entries - 1) if freed else (total, entries)
    return total <= target[0] and entries <= target[1]


# -- clear ---------------------------------------------------------------------------


def clear(store: Store, progress: Progress | None = None) -> PruneResult:
    """Remove every entry, shard by shard, while other processes keep using the cache.

    Each shard's files are unlinked a few hundred at a time, releasing its
    lock in between, then the shard is recounted (writes that land meanwhile
    may stay, and are counted).
    """
    result = PruneResult()
    store.lock_file.check_identity()  # judge writers by the lock file they all use now
    for shard in range(store.layout.shard_count):
        for directory in tree.leaf_dirs(store, shard)[0]:
            names = _clearable(store, directory)
            while names:
                _clear_chunk(store, shard, names, result)
                # POSIX locks are not fair: without a pause, a writer woken by the release
                # may find the lock taken again for the next chunk, and the next.
                time.sleep(_CLEAR_PAUSE)
        recount_shard(store, shard)
        if progress:
            progress(1)
    return result


def _clearable(store: Store, directory: str) -> list[str]:
    """Paths of the entry and data files in ``directory`` (no temp files: writes in flight)."""
    try:
        listing = tree.list_dir(store, directory)
    except PermissionError:
        return []
    if listing is None:
        return []
    data = [path for found in listing.data.values() for path, _ in found]
    return [os.path.join(directory, digest) for digest in listing.records] + data


def _clear_chunk(store: Store, shard: int, paths: list[str], result: PruneResult) -> None:
    """Unlink paths from the end of ``paths`` under one brief hold of the shard's lock."""
    deadline = time.monotonic() + _CLEAR_HOLD
    freed = removed = 0
    with store.shard_locked(shard):
        for _ in range(_CLEAR_CHUNK):
            if not paths or time.monotonic() > deadline:
                break
            path = paths.pop()
            with contextlib.suppress(FileNotFoundError, PermissionError):
                size = os.lstat(path).st_size
                os.unlink(path)
                freed += size
                is_record = "." not in os.path.basename(path)
                removed += is_record
        if freed or removed:  # the recount at the end of the shard makes it exact
            store.accounting.add(shard, -freed, -removed)
    result.removed += removed
    result.removed_bytes += freed
