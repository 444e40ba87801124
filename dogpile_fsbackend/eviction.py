"""Eviction on the write path: a few entries per write, never a scan of a big cache.

Once a write takes the cache over ``cache_size`` (or ``max_entries``), the
writing process *drains*: every write it makes evicts until the cache is
under the limit again, then up to ``STEP_VICTIMS`` more least recently used
entries, until the cache is down to ``eviction_low_water`` of its limits.  So
the work of one eviction "batch" is spread over the following writes, and no
write does more than a bounded step (plus what it takes to get under the
limit, which is proportional to what it wrote).  Processes share no eviction
lock: ``Store.discard`` is safe to race (per-shard lock, inode and mtime
checked), so two processes evicting at once cost a failed check, never a
wrong eviction.

Where victims come from:

* **Up to ``EXACT_MAX`` entries: exact LRU.**  One pass over the cache
  (``lstat`` only, no lock, at most ~30 ms) gives the true LRU order, kept in
  memory and consumed by the following writes until it runs out.  It stays
  true: every entry it lacks was written after the pass and is newer, and an
  entry used since fails ``discard``'s check and is passed over.
* **Above: sampled, in constant work per write.**  Each evicting write
  ``lstat``s the next ``STEP_SCAN`` entries of an endless walk over the shard
  tree (an open directory iterator, kept between writes).  Keys are hashed,
  so each directory is a uniform sample of the cache: the ``QUANTILE``-quantile
  of the last ``SAMPLES`` last-use times seen estimates the age of the cache's
  oldest 2%, and only entries older than that (or expired) enter a bounded
  pool of candidates, oldest first (Redis's approximated LRU keeps such a
  pool).  Victims come from the pool's old end, so each is among the globally
  least recently used; what true LRU would evict and this does not is
  bounded by what the walk has not reached since it aged, about
  ``entries / (2 * STEP_SCAN)`` entries per process.

Every entry past ``expiration_time`` goes first, in both.  Memory is bounded:
a pool of ``POOL_MAX`` compact tuples (``EXACT_MAX`` for an exact pass), an
array of ``SAMPLES`` integers and one open directory.

A writer also recounts the accounting when it is due (``reconcile_interval``,
or a marked file), a shard or two per write (``RECOUNT_BUDGET`` files): never
the whole cache in one request.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import os
import random
import threading
import time
import weakref
from array import array
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

from . import maintenance, tree

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger(__name__)

EXACT_MAX = 10_000  # entries: up to this many, a full pass gives the exact LRU order
STEP_VICTIMS = 4  # entries a draining write evicts beyond what takes it under the limit
STEP_SCAN = 192  # entries a write stats while evicting from a bigger cache
QUANTILE = 0.02  # a sampled candidate must be among this oldest share of the entries seen
SAMPLES = 4096  # last-use times the quantile is estimated from
POOL_MAX = 1024  # sampled candidates kept
HARD_SCAN = 16 * STEP_SCAN  # entries one write may stat to get the cache under its limit
ROOM_VICTIMS = 64  # entries a write that found the disk full evicts before its retry
RECOUNT_BUDGET = 4096  # files a write recounts when a recount is due (one shard at least)
_DIR_COST = 8  # a directory visited counts as this many files of work
_PASSES = 3  # full passes one write may make when reads keep outdating their order
_EXPIRY_RECHECK = 1.0  # seconds between re-judging remembered candidates for expiry


class Candidate(NamedTuple):
    """An entry judged for eviction; the pool is sorted by ``rank``."""

    rank: int  # -1 if it had expired (goes first), else its last use
    used_ns: int  # the mtime judged: discard removes it only if it is still that
    inode: int
    digest: str
    created_ns: int


class _Recount(NamedTuple):
    next_shard: int
    left: int
    accounting: tuple[int, int]  # the file counted into: a new one restarts the cycle


class Evictor:
    """One backend instance's share of the eviction work, and what it remembers for it.

    Thread-safe by try-lock: a thread that finds another of its process
    evicting leaves the work to it and never waits.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._limits = maintenance.limits(store)
        self._draining = False
        self._pool: list[Candidate] = []  # oldest first
        self._exact = False  # the pool holds a full pass's order
        self._expiry_checked = 0.0
        self._walk: Iterator[tuple[str, os.stat_result] | None] | None = None
        self._samples = array("q")  # a ring of recent last-use times
        self._sample_at = 0
        self._fresh_samples = 0
        self._threshold: int | None = None
        self._recount: _Recount | None = None
        _LIVE.add(self)

    def _reset_after_fork(self) -> None:
        self._lock = threading.Lock()  # another thread of the parent may have held it
        self._walk = None  # closing the walk closes the child's copy of its directory

    # -- the write path -------------------------------------------------------------

    def after_write(self) -> None:
        """After every successful write: recount a shard or two if due, evict if due.

        Trouble (an unreadable directory, a failing disk) is logged, never
        raised: the value was stored.
        """
        store = self.store
        if not self._lock.acquire(blocking=False):
            return  # another thread of this process is at it
        try:
            if self._recount is not None or store.reconcile_due(fresh=False):
                self._recount_step()
            (size, max_entries), low = self._limits
            if store.last_total > size or store.last_entries > max_entries:
                self._draining = True
            if self._draining:
                self._evict(low, STEP_VICTIMS)
                self._draining = not self._under(low)
        except OSError as exc:
            log.warning(
                "eviction in %s failed (the value was stored): %s", store.settings.base_dir, exc
            )
        finally:
            self._lock.release()

    def make_room(self) -> int:
        """After a write failed for want of space: evict a batch, down to the low-water
        share of what is stored (``ROOM_VICTIMS`` entries at most).  How many went."""
        store = self.store
        with self._lock:
            store.last_total, store.last_entries = store.totals()
            (size, max_entries), _ = self._limits
            ratio = store.settings.eviction_low_water
            target = (
                int(min(store.last_total, size) * ratio),
                int(min(store.last_entries, max_entries) * ratio),
            )
            return self._evict(target, ROOM_VICTIMS, must=True)

    def _under(self, target: tuple[int, float]) -> bool:
        return self.store.last_total <= target[0] and self.store.last_entries <= target[1]

    def _evict(self, target: tuple[int, float], cap: int, must: bool = False) -> int:
        """Evict the least recently used entries until ``target`` is reached: at most ``cap``
        while the cache is within its limits, as many as it takes while it is over them.
        Returns how many went."""
        store = self.store
        (size, max_entries), _ = self._limits
        sampled = store.last_entries > EXACT_MAX
        if sampled:
            self._exact = False
            self._sample(STEP_SCAN, force=False)  # each write walks on: the pool stays fresh
        else:
            if not self._exact:  # sampled candidates are not the exact order: start over
                self._pool.clear()
            must = True  # a small cache: a full pass whenever the remembered order runs out
        budget = [HARD_SCAN, _PASSES]  # entries left to stat, full passes left
        victims = 0
        while True:
            over = store.last_total > size or store.last_entries > max_entries
            if self._under(target):  # expired entries at hand go all the same (they are misses)
                if victims >= cap or not (self._pool and self._pool[0].rank < 0):
                    break
            elif victims >= cap and not over:
                break
            candidate = self._take(sampled, must or over, budget)
            if candidate is None:
                break
            freed = store.discard(candidate.digest, candidate.inode, candidate.used_ns)
            if freed:
                victims += 1
                store.evictions += candidate.rank >= 0  # expired entries are not evictions
        return victims

    def _take(self, sampled: bool, must: bool, budget: list[int]) -> Candidate | None:
        """The oldest candidate; a bounded refill when there is none and one is needed."""
        while not self._pool:
            if not must:
                return None
            if sampled:
                if budget[0] <= 0:
                    return None
                budget[0] -= self._sample(STEP_SCAN, force=True)
            else:
                if budget[1] <= 0:
                    return None
                budget[1] -= 1
                if not self._full_pass():
                    sampled = True  # more entries than the counters said: sample instead
        self._recheck_expiry()
        return self._pool.pop(0)

    def _recheck_expiry(self) -> None:
        """Move candidates that expired since they were judged to the front."""
        store = self.store
        now = time.time()
        if store.settings.expiration_time is None or now - self._expiry_checked < _EXPIRY_RECHECK:
            return
        self._expiry_checked = now
        if any(c.rank >= 0 and store.is_expired(c.created_ns / 1e9, now) for c in self._pool):
            self._pool = sorted(
                c._replace(rank=-1) if store.is_expired(c.created_ns / 1e9, now) else c
                for c in self._pool
            )

    # -- where candidates come from ----------------------------------------------------

    def _judge(self, digest: str, info: os.stat_result, now: float) -> Candidate:
        expired = self.store.is_expired(info.st_atime_ns / 1e9, now)
        used = info.st_mtime_ns
        return Candidate(-1 if expired else used, used, info.st_ino, digest, info.st_atime_ns)

    def _full_pass(self) -> bool:
        """Judge every entry (a small cache): the exact LRU order.  False if the cache
        turned out too big for one."""
        store = self.store
        now = time.time()
        pool: list[Candidate] = []
        for shard in range(store.layout.shard_count):
            for directory in tree.leaf_dirs(store, shard)[0]:
                for digest, info in tree.record_stats(store, directory):
                    pool.append(self._judge(digest, info, now))
                    if len(pool) > 2 * EXACT_MAX:
                        return False
        pool.sort()
        self._pool = pool
        self._exact = True
        self._expiry_checked = now
        return True

    def _sample(self, count: int, force: bool) -> int:
        """Walk on over ``count`` entries' worth of work, admitting the old ones to the pool.

        ``force`` (the cache is over its limit) admits the oldest seen even if
        none is older than the threshold.  Returns the work done.
        """
        if self._walk is None:
            shard = random.randrange(self.store.layout.shard_count)  # processes spread out
            self._walk = _walk(self.store, shard)
        found: list[tuple[str, os.stat_result]] = []
        work = 0
        while work < count:
            try:
                item = next(self._walk)
            except BaseException:  # a walk that raised is finished: start a new one next time
                self._walk = None
                raise
            if item is None:
                work += _DIR_COST
                continue
            found.append(item)
            work += 1
        self._remember(info.st_mtime_ns for _, info in found)
        now = time.time()
        threshold = self._threshold
        admitted = [
            self._judge(digest, info, now)
            for digest, info in found
            if (threshold is not None and info.st_mtime_ns <= threshold)
            or self.store.is_expired(info.st_atime_ns / 1e9, now)
        ]
        if force and not admitted and found:
            digest, info = min(found, key=lambda item: item[1].st_mtime_ns)
            admitted.append(self._judge(digest, info, now))
        pool = self._pool
        for candidate in admitted:
            bisect.insort(pool, candidate)
        del pool[POOL_MAX:]  # the youngest go
        return work

    def _remember(self, used: Iterator[int]) -> None:
        """Add last-use times to the ring; re-estimate the threshold every quarter ring."""
        samples = self._samples
        for used_ns in used:
            if len(samples) < SAMPLES:
                samples.append(used_ns)
            else:
                samples[self._sample_at] = used_ns
                self._sample_at = (self._sample_at + 1) % SAMPLES
            self._fresh_samples += 1
        if samples and (self._threshold is None or self._fresh_samples >= SAMPLES // 4):
            self._fresh_samples = 0
            rank = max(1, int(len(samples) * QUANTILE))
            self._threshold = heapq.nsmallest(rank, samples)[-1]

    # -- recounting, when due ---------------------------------------------------------

    def _recount_step(self) -> None:
        """Recount the next shards (``RECOUNT_BUDGET`` files' worth); when a whole cycle is
        done, date the recount.  A cycle restarts on a replaced accounting file."""
        store = self.store
        accounting = store.accounting
        cycle = self._recount
        if cycle is not None and not store.reconcile_due(fresh=False):
            self._recount = None  # another process finished one meanwhile
            return
        shards = store.layout.shard_count
        if cycle is None or cycle.accounting != accounting.identity:
            store.lock_file.check_identity()  # judge writers by the lock file all use now
            cycle = _Recount(random.randrange(shards), shards, accounting.identity)
        work = 0
        next_shard, left = cycle.next_shard, cycle.left
        while left and work < RECOUNT_BUDGET:
            work += _DIR_COST + maintenance.recount_shard(store, next_shard).files
            next_shard, left = (next_shard + 1) % shards, left - 1
        if left:
            self._recount = cycle._replace(next_shard=next_shard, left=left)
        else:
            accounting.last_reconcile = time.time()
            self._recount = None
        store.last_total, store.last_entries = store.totals()


def _walk(store: Store, shard: int) -> Iterator[tuple[str, os.stat_result] | None]:
    """Every record of the cache, shard after shard from ``shard``, round and round.

    ``None`` after each directory, so that work is counted even in an empty cache.
    """
    shards = store.layout.shard_count
    while True:
        directories = tree.leaf_dirs(store, shard)[0]
        for directory in directories:
            yield from tree.record_stats(store, directory)
            yield None
        if not directories:
            yield None
        shard = (shard + 1) % shards


_LIVE: weakref.WeakSet[Evictor] = weakref.WeakSet()


def _reset_all_after_fork() -> None:
    for evictor in list(_LIVE):
        evictor._reset_after_fork()


os.register_at_fork(after_in_child=_reset_all_after_fork)
