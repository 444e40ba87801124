"""Scans of the whole cache: eviction (prune), reconciliation, verify and clear.

Nothing here runs on the hot path except when eviction is due.  A scan visits
one shard at a time while holding that shard's byte lock, so it sees every
entry whole (publishes take the same lock) and can overwrite the shard's
counters with what it counted.  Readers never take shard locks, so a scan
never blocks them; writers to the shard being scanned wait for a moment.

Eviction order: entries past ``expiration_time`` first, then least recently
used (oldest ``mtime``, which every hit and write sets to now).  A victim is
removed only if its file is still the one judged (same inode, same mtime), so
an entry rewritten or read during the scan survives.

No scan holds one lock for its whole run: ``prune``, ``verify`` and ``clear``
take each shard's lock in turn, and the eviction lock only keeps two writers
from scanning at once; a writer that finds it taken never waits for it (see
``enforce_limit``).  What a scan cannot read (another user's directory or
file) is skipped with one warning, never deleted, and never an exception.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import layout as paths
from . import records
from .store import FUTURE_TOLERANCE, remove_quietly

if TYPE_CHECKING:
    from .store import Store

Progress = Callable[[int], None]  # called with the number of shards just finished
_EVICTION_PASSES = 3  # judgements of one eviction, when reads keep outdating them
_REMEMBERED_MAX = 50_000  # eviction candidates kept between scans (about 10 MB at most)
# A temp file whose writer's byte is free is still spared this long after its last write:
# a writer notices a replaced lock file within a second (see locking.py).
TEMP_GRACE = 2.0
# Longest a writer over the limit waits for another process's eviction before evicting itself.
EVICTION_WAIT = 0.25
log = logging.getLogger(__name__)


@dataclasses.dataclass
class EntryInfo:
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


def enforce_limit(store: Store) -> PruneResult | None:
    """After a write: evict if the limit is crossed, reconcile if one is due.

    The total comes from the write's own accounting update (no extra read).
    The eviction lock keeps two processes from scanning at once, but a writer
    never waits for it without bound: one over the limit that finds it taken
    first evicts from its own remembered order, then waits up to
    ``EVICTION_WAIT`` (usually the other scan is done by then and the total is
    below the limit), and if the holder is still busy (slow, or paused under a
    debugger or Ctrl-Z) scans and evicts by itself, as ``discard`` is safe to
    race.  So the limit holds when ``set`` returns.  A merely due
    reconciliation is skipped if another process is already scanning.
    Trouble while evicting (an unreadable directory, a failing disk) is
    logged, never raised: the value was stored.
    """
    over = store.last_total > store.settings.cache_size
    try:
        if not over and not store.reconcile_due(fresh=False):
            return None
        if store.acquire_eviction_lock(wait=False) or (over and _wait_for_eviction_lock(store)):
            try:
                if store.reconcile_due():
                    return _prune_unlocked(store)
                return _evict(store)
            finally:
                store.release_eviction_lock()
        return _evict(store) if over else None
    except OSError as exc:
        log.warning(
            "eviction in %s failed (the value was stored): %s", store.settings.base_dir, exc
        )
        return None


def _wait_for_eviction_lock(store: Store) -> bool:
    """Try the eviction lock until ``EVICTION_WAIT`` has passed; meanwhile evict from
    this process's own remembered order.  False if it is still held."""
    result = PruneResult()
    if store.eviction_order and _evict_remembered(store, result):
        return False  # under the low-water mark already: nothing left to wait for
    deadline = time.monotonic() + EVICTION_WAIT
    pause = 0.001
    while time.monotonic() < deadline:
        time.sleep(pause)
        if store.acquire_eviction_lock(wait=False):
            return True
        pause = min(pause * 2, 0.02)
    return False


def make_room(store: Store) -> PruneResult:
    """Evict one batch below what is stored now: a write failed for want of space."""
    total = store.totals()[0]
    ratio = store.settings.eviction_low_water
    target = int(min(total, store.settings.cache_size) * ratio)
    result = PruneResult()
    if not _evict_remembered(store, result, target):
        result = _prune_unlocked(store, result=result, target=target)
    return result


def _evict(store: Store) -> PruneResult | None:
    if store.totals()[0] <= store.settings.cache_size:
        return None  # another process evicted meanwhile
    result = PruneResult()
    if _evict_remembered(store, result):
        return result
    return _prune_unlocked(store, result=result)


def _evict_remembered(store: Store, result: PruneResult, target: int | None = None) -> bool:
    """Evict in the LRU order the last scan left over; False if it ran out first.

    That order stays valid without a new scan: every entry the list lacks was
    written after the scan, so it is newer than all of them, and an entry used
    since the scan fails ``discard``'s check and is passed over.  One scan so
    serves many batches instead of one.
    """
    if target is None:
        target = _low_water(store)
    total = store.totals()[0]
    remembered = store.eviction_order
    if store.settings.expiration_time is not None:  # entries expired since the scan go first
        now = time.time()
        expired = [e for e in remembered if store.is_expired(e.created_ns / 1e9, now)]
        if expired:
            live = [e for e in remembered if not store.is_expired(e.created_ns / 1e9, now)]
            remembered = store.eviction_order = collections.deque(expired + live)
    while remembered and total > target:
        entry = remembered.popleft()
        if freed := store.discard(entry.digest, entry.inode, entry.used_ns):
            result.removed += 1
            result.removed_bytes += freed
            total -= freed
            store.evictions += 1
    return total <= target


def prune(store: Store, progress: Progress | None = None) -> PruneResult:
    """Remove expired entries, evict down to the low-water mark if over the limit, reconcile.

    Holds one shard's lock at a time, never the eviction lock: writers never
    wait for a prune (nor for one paused or killed).
    """
    return _prune_unlocked(store, progress)


def _low_water(store: Store) -> int:
    return int(store.settings.cache_size * store.settings.eviction_low_water)


def _prune_unlocked(
    store: Store,
    progress: Progress | None = None,
    result: PruneResult | None = None,
    target: int | None = None,
) -> PruneResult:
    entries, report = scan(store, deep=False, progress=progress)
    result = result or PruneResult()
    result.scan = report
    now = time.time()
    total = report.bytes
    live = []
    for entry in entries:
        if not store.is_expired(entry.created_ns / 1e9, now):
            live.append(entry)
        elif freed := store.discard(entry.digest, entry.inode, entry.used_ns):
            result.expired += 1
            result.removed += 1
            result.removed_bytes += freed
            total -= freed
    store.eviction_order.clear()
    if target is not None or total > store.settings.cache_size:
        live = _evict_lru(
            store, live, total, result, _low_water(store) if target is None else target
        )
    live.sort(key=lambda e: e.used_ns)
    store.eviction_order.extend(live[:_REMEMBERED_MAX])
    return result


def _evict_lru(
    store: Store, live: list[EntryInfo], total: int, result: PruneResult, target: int
) -> list[EntryInfo]:
    """Remove least recently used entries until ``total`` is down to the low-water mark.

    A victim used or rewritten since it was judged stays, and the next one goes
    instead.  When reads outpace the scan every judgement can be stale, so the
    survivors are judged again from a fresh ``stat``, for a few passes at most.
    Returns the entries not yet judged (the next candidates, oldest first).
    """
    for _ in range(_EVICTION_PASSES):
        live.sort(key=lambda e: e.used_ns)
        kept = []
        for index, entry in enumerate(live):
            if total <= target:
                return live[index:]
            if freed := store.discard(entry.digest, entry.inode, entry.used_ns):
                result.removed += 1
                result.removed_bytes += freed
                total -= freed
                store.evictions += 1
            else:
                kept.append(entry)
        live = [fresh for entry in kept if (fresh := _restat(store, entry))]
    return []


def _restat(store: Store, entry: EntryInfo) -> EntryInfo | None:
    try:
        info = os.lstat(store.layout.entry_path(entry.digest))
    except (FileNotFoundError, PermissionError):
        return None
    return dataclasses.replace(entry, inode=info.st_ino, used_ns=info.st_mtime_ns)


def scan(
    store: Store, deep: bool, progress: Progress | None = None
) -> tuple[list[EntryInfo], ScanReport]:
    """Visit every shard under its lock: list entries, clean up, reset the counters.

    ``deep`` also reads every record and checks it against its file name,
    checksum and data file (what ``verify`` does); otherwise only names and
    ``stat`` results are used.
    """
    entries: list[EntryInfo] = []
    report = ScanReport()
    counted_before = store.totals()[0]
    store.lock_file.check_identity()  # judge writers by the lock file they all use now
    for shard in range(store.layout.shard_count):
        with store.shard_locked(shard):
            shard_entries, shard_report = _scan_shard_locked(store, shard, deep)
            store.accounting.set(shard, shard_report.bytes, shard_report.entries)
        entries.extend(shard_entries)
        report.merge(shard_report)
        if progress:
            progress(1)
    store.accounting.last_reconcile = time.time()
    report.accounting_drift = report.bytes - counted_before
    return entries, report


def _scan_shard_locked(store: Store, shard: int, deep: bool) -> tuple[list[EntryInfo], ScanReport]:
    report = ScanReport()
    entries = []
    now_ns = time.time_ns()
    for directory in _leaf_dirs(store, shard, report):
        records_found: dict[str, os.stat_result] = {}
        data_found: dict[str, list[tuple[str, os.stat_result]]] = {}
        try:
            listing = list(os.scandir(directory))
        except PermissionError:
            store.warn_once(directory, "directory is not readable by this process; skipped")
            report.unreadable += 1
            continue
        except FileNotFoundError:
            continue
        for item in listing:
            try:
                info = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if paths.is_temp_name(item.name):
                if _temp_is_abandoned(store, item.name, info, now_ns):
                    remove_quietly(item.path)
                    report.temp_files_removed += 1
                continue
            parsed = paths.split_entry_name(item.name)
            if stat.S_ISDIR(info.st_mode):
                store.warn_once(item.path, "a directory that is not the cache's; left alone")
                report.foreign_kept += 1
                continue
            if parsed is None or not _is_regular(info):
                remove_quietly(item.path)  # symlinks are unlinked, never followed
                report.damaged_removed += 1
                continue
            digest, token = parsed
            if token is None:
                records_found[digest] = _in_the_present(item.path, info, now_ns)
            else:
                data_found.setdefault(digest, []).append((item.path, info))
        for digest, data in data_found.items():
            if digest not in records_found or store.kind != records.KIND_RAW:
                for path, _ in data:
                    remove_quietly(path)
                report.orphans_removed += len(data)
        for digest, info in records_found.items():
            entry = _check_entry(
                store, directory, digest, info, data_found.get(digest, []), deep, report
            )
            if entry is None:
                continue
            entries.append(entry)
            report.entries += 1
            report.bytes += entry.size
    return entries, report


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
    directory: str,
    digest: str,
    info: os.stat_result,
    data: list[tuple[str, os.stat_result]],
    deep: bool,
    report: ScanReport,
) -> EntryInfo | None:
    """An entry's EntryInfo after removing its stale data files; None if it was damaged
    (and removed) or could not be read (and was left alone)."""
    path = os.path.join(directory, digest)
    size = info.st_size
    if store.kind == records.KIND_RAW or deep:
        try:
            live = _live_data(store, path, digest, data) if (deep or len(data) != 1) else data
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
    return EntryInfo(digest, info.st_ino, size, info.st_atime_ns, info.st_mtime_ns)


def _live_data(
    store: Store, path: str, digest: str, data: list[tuple[str, os.stat_result]]
) -> list[tuple[str, os.stat_result]] | None:
    """Read a record to learn which data file is live; None if the entry is damaged.

    PermissionError (another user's file) propagates: unreadable is not damaged.
    """
    try:
        record = store.peek_record(digest)
        if store.kind != records.KIND_RAW:
            return []
        meta = records.RawMeta.from_bytes(record.payload)
    except PermissionError:
        raise
    except (records.DamagedRecord, OSError):
        return None
    live = [(p, i) for p, i in data if p == f"{path}.{meta.token}" and i.st_size == meta.size]
    return live or None


def _leaf_dirs(store: Store, shard: int, report: ScanReport | None = None) -> list[str]:
    """The entry directories of a shard; a path through a planted symlink is never listed,
    and one this process may not read is skipped (with one warning)."""
    current = [store.layout.shard_dir(shard)]
    for _ in range(store.layout.depth - store.layout.shard_levels):
        deeper: list[str] = []
        for directory in current:
            try:
                with os.scandir(directory) as it:
                    deeper.extend(item.path for item in it if item.is_dir(follow_symlinks=False))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except PermissionError:
                store.warn_once(directory, "directory is not readable by this process; skipped")
                if report is not None:
                    report.unreadable += 1
        current = deeper
    return [directory for directory in current if _is_usable_dir(store, directory)]


def _is_usable_dir(store: Store, directory: str) -> bool:
    try:
        return store.is_our_dir(directory)
    except PermissionError:
        return False


def _is_regular(info: os.stat_result) -> bool:
    return stat.S_ISREG(info.st_mode)


def _temp_is_abandoned(store: Store, name: str, info: os.stat_result, now_ns: int) -> bool:
    """True if no live writer owns a temp file: judged by its writer's lock, not by pid or age.

    A live writer's temp file is never taken, whatever the clocks say.  One
    named by an older release (``.tmp-<pid>-...``, no writer token) goes once
    it is ``temp_max_age`` old, and any other name at once (nobody writes
    it); a time in the future counts as now.
    """
    age = max(0.0, (now_ns - info.st_mtime_ns) / 1e9)
    token = paths.temp_writer(name)
    if token is None:
        return not paths.is_legacy_temp_name(name) or age > store.settings.temp_max_age
    return not store.lock_file.writer_alive(token) and age > TEMP_GRACE


def verify(store: Store, progress: Progress | None = None) -> ScanReport:
    """Read and check every entry, remove damaged ones, fix the accounting.

    Entries this process may not read are reported (``unreadable``), never removed.
    """
    return scan(store, deep=True, progress=progress)[1]


def clear(store: Store, progress: Progress | None = None) -> PruneResult:
    """Remove every entry, shard by shard, while other processes keep using the cache."""
    result = PruneResult()
    for shard in range(store.layout.shard_count):
        with store.shard_locked(shard):
            for directory in _leaf_dirs(store, shard):
                _clear_directory(store, directory, result)
            store.accounting.set(shard, 0, 0)
        if progress:
            progress(1)
    return result


def _clear_directory(store: Store, directory: str, result: PruneResult) -> None:
    """Unlink every entry and data file of one directory (its shard lock is held)."""
    try:
        listing = list(os.scandir(directory))
    except PermissionError:
        store.warn_once(directory, "directory is not readable by this process; skipped")
        return
    except FileNotFoundError:
        return
    for item in listing:
        if paths.is_temp_name(item.name) or item.is_dir(follow_symlinks=False):
            continue
        with contextlib.suppress(FileNotFoundError, PermissionError):
            size = item.stat(follow_symlinks=False).st_size
            os.unlink(item.path)
            result.removed_bytes += size
            parsed = paths.split_entry_name(item.name)
            result.removed += bool(parsed and parsed[1] is None)
