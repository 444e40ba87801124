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
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import layout as paths
from . import records
from .store import maintenance_lock, remove_quietly

if TYPE_CHECKING:
    from .store import Store

Progress = Callable[[int], None]  # called with the number of shards just finished
_EVICTION_PASSES = 3  # judgements of one eviction, when reads keep outdating them
_REMEMBERED_MAX = 50_000  # eviction candidates kept between scans (about 10 MB at most)


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

    When the limit is crossed the writer waits for any running eviction and
    then re-checks, so the limit holds when ``set`` returns.  A merely due
    reconciliation is skipped if another process is already scanning.
    """
    over = store.totals()[0] > store.settings.cache_size
    if not over and not store.reconcile_due():
        return None
    if not store.acquire_eviction_lock(wait=over):
        return None
    try:
        if store.reconcile_due():
            return _prune_locked(store)
        if store.totals()[0] <= store.settings.cache_size:
            return None  # another process evicted while we waited
        result = PruneResult()
        if _evict_remembered(store, result):
            return result
        return _prune_locked(store, result=result)
    finally:
        store.release_eviction_lock()


def _evict_remembered(store: Store, result: PruneResult) -> bool:
    """Evict in the LRU order the last scan left over; False if it ran out first.

    That order stays valid without a new scan: every entry the list lacks was
    written after the scan, so it is newer than all of them, and an entry used
    since the scan fails ``discard``'s check and is passed over.  One scan so
    serves many batches instead of one.
    """
    target = int(store.settings.cache_size * store.settings.eviction_low_water)
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
    """Remove expired entries, evict down to the low-water mark if over the limit, reconcile."""
    with store.evicting():
        return _prune_locked(store, progress)


def _prune_locked(
    store: Store, progress: Progress | None = None, result: PruneResult | None = None
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
    if total > store.settings.cache_size:
        live = _evict(store, live, total, result)
    live.sort(key=lambda e: e.used_ns)
    store.eviction_order.extend(live[:_REMEMBERED_MAX])
    return result


def _evict(
    store: Store, live: list[EntryInfo], total: int, result: PruneResult
) -> list[EntryInfo]:
    """Remove least recently used entries until ``total`` is down to the low-water mark.

    A victim used or rewritten since it was judged stays, and the next one goes
    instead.  When reads outpace the scan every judgement can be stale, so the
    survivors are judged again from a fresh ``stat``, for a few passes at most.
    Returns the entries not yet judged (the next candidates, oldest first).
    """
    target = int(store.settings.cache_size * store.settings.eviction_low_water)
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
    except FileNotFoundError:
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
    for directory in _leaf_dirs(store, shard):
        records_found: dict[str, os.stat_result] = {}
        data_found: dict[str, list[tuple[str, os.stat_result]]] = {}
        with os.scandir(directory) as listing:
            for item in listing:
                try:
                    info = item.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if paths.is_temp_name(item.name):
                    if _temp_is_abandoned(item.name, info, store.settings.temp_max_age):
                        remove_quietly(item.path)
                        report.temp_files_removed += 1
                    continue
                parsed = paths.split_entry_name(item.name)
                if parsed is None or not _is_regular(info):
                    _remove_foreign(item.path, info)
                    report.damaged_removed += 1
                    continue
                digest, token = parsed
                if token is None:
                    records_found[digest] = info
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
                report.damaged_removed += 1
                continue
            entries.append(entry)
            report.entries += 1
            report.bytes += entry.size
    return entries, report


def _check_entry(
    store: Store,
    directory: str,
    digest: str,
    info: os.stat_result,
    data: list[tuple[str, os.stat_result]],
    deep: bool,
    report: ScanReport,
) -> EntryInfo | None:
    """An entry's EntryInfo after removing its stale data files; None if it was damaged."""
    path = os.path.join(directory, digest)
    size = info.st_size
    if store.kind == records.KIND_RAW or deep:
        live = _live_data(store, path, digest, data) if (deep or len(data) != 1) else data
        if live is None:
            for doomed in (path, *(p for p, _ in data)):
                remove_quietly(doomed)
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
    """Read a record to learn which data file is live; None if the entry is damaged."""
    try:
        record = store.peek_record(digest)
        if store.kind != records.KIND_RAW:
            return []
        meta = records.RawMeta.from_bytes(record.payload)
    except (records.DamagedRecord, OSError):
        return None
    live = [(p, i) for p, i in data if p == f"{path}.{meta.token}" and i.st_size == meta.size]
    return live or None


def _leaf_dirs(store: Store, shard: int) -> list[str]:
    """The entry directories of a shard; a path through a planted symlink is never listed."""
    current = [store.layout.shard_dir(shard)]
    for _ in range(store.layout.depth - store.layout.shard_levels):
        deeper: list[str] = []
        for directory in current:
            with (
                contextlib.suppress(FileNotFoundError, NotADirectoryError),
                os.scandir(directory) as it,
            ):
                deeper.extend(item.path for item in it if item.is_dir(follow_symlinks=False))
        current = deeper
    return [directory for directory in current if store.is_our_dir(directory)]


def _is_regular(info: os.stat_result) -> bool:
    return stat.S_ISREG(info.st_mode)


def _remove_foreign(path: str, info: os.stat_result) -> None:
    """Remove a file that is not ours (symlinks are unlinked, never followed)."""
    if not stat.S_ISDIR(info.st_mode):
        remove_quietly(path)


def _temp_is_abandoned(name: str, info: os.stat_result, max_age: float) -> bool:
    if time.time() - info.st_mtime > max_age:
        return True
    pid = paths.temp_owner_pid(name)
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def verify(store: Store, progress: Progress | None = None) -> ScanReport:
    """Read and check every entry, remove damaged ones, fix the accounting."""
    with maintenance_lock(store.settings.base_dir, store.settings.file_mode), store.evicting():
        return scan(store, deep=True, progress=progress)[1]


def clear(store: Store, progress: Progress | None = None) -> PruneResult:
    """Remove every entry, shard by shard, while other processes keep using the cache."""
    result = PruneResult()
    with maintenance_lock(store.settings.base_dir, store.settings.file_mode), store.evicting():
        for shard in range(store.layout.shard_count):
            with store.shard_locked(shard):
                for directory in _leaf_dirs(store, shard):
                    _clear_directory(directory, result)
                store.accounting.set(shard, 0, 0)
            if progress:
                progress(1)
    return result


def _clear_directory(directory: str, result: PruneResult) -> None:
    """Unlink every entry and data file of one directory (its shard lock is held)."""
    with os.scandir(directory) as listing:
        for item in listing:
            if paths.is_temp_name(item.name) or item.is_dir(follow_symlinks=False):
                continue
            with contextlib.suppress(FileNotFoundError):
                size = item.stat(follow_symlinks=False).st_size
                os.unlink(item.path)
                result.removed_bytes += size
                parsed = paths.split_entry_name(item.name)
                result.removed += bool(parsed and parsed[1] is None)
