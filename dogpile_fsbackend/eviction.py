"""Eviction on the write path: a few entries per write, never a scan of a big cache.

Once a write takes the cache over ``cache_size`` (or ``max_entries``), the
writing process *drains*: each of its writes evicts until the cache is under
the limit again (that part is never cut short), then up to ``STEP_VICTIMS``
more least recently used entries, but only while its eviction step has taken
less than ``STEP_BUDGET_NS`` (1 ms), until the cache is down to
``eviction_low_water`` of its limits.  So the work of an eviction "batch" is
spread over the following writes, and no write does more than a bounded
step, plus what it takes to get under the limit (proportional to what it
wrote).  On a disk where one ``unlink`` takes most of a millisecond, a write
at the limit evicts about what it wrote and no more: one unlink per set, not
three on a third of them, which is what a set's p99 at a million entries
came from.  Processes share no eviction lock: ``Store.discard`` is safe to
race (per-shard lock, inode and mtime checked), so two processes evicting at
once cost a failed check, never a wrong eviction, and no writer ever waits
for another process.  Both take the same oldest entries, so about half of what one
takes the other has evicted: one lock-free ``lstat`` passes over those.  Within
a process one thread at a time evicts: a write over a limit that finds
another thread's step at work waits for that step, then takes its own
(``Evictor.after_write``).  Each write is judged by the totals its publish
read after its own counter write (``AccountingFile.add``), so of publishes
at the same moment the last judges by the exact total.

Victims come from the *remembered order*: the least recently used entries of
the last pass over the cache, in a list newest first, popped from its end by
the following writes.  It stays the true LRU order without a new pass: every entry it lacks was
newer than all of it when the pass saw it, and stays so (times only move
forward, and writes are newest), and an entry used since fails ``discard``'s
check and is passed over.

* **Up to ``EXACT_MAX`` entries**, a pass is one go over the cache (``lstat``
  only, no lock, ~30 ms at most), remembering every entry.
* **Above**, a pass is spread over the writes that evict: each ``lstat``s the
  next few entries of an endless walk of the shard tree (an open directory
  iterator, kept between writes) into a bounded heap of the ``REMEMBERED``
  least recently used seen so far; when the walk has been round the whole
  tree, the heap becomes the new remembered order: the following evicting
  writes pop it, ``CLOSE_STEP`` entries each (about 1.5 ms), youngest first,
  which makes the order newest first with no sort and no heapify (a sort
  took one write 45 to 150 ms, a filter and heapify 20 to 35 ms: any
  single go over 32,768 tuples scattered in memory is that slow here),
  while the old order serves.  Each write walks just fast enough for the
  pass to end before the order in hand runs out at the current eviction
  rate (``SCAN_MIN`` to ``SCAN_MAX`` entries): about
  ``1.25 * entries * victims / REMEMBERED`` per write: 40 to 120 ``lstat``
  calls at a million entries.  Without an order from a whole pass (a fresh
  process; a cache of tens of millions whose order ran out), victims come
  from the heap so far, but only its oldest ``PARTIAL_SHARE`` of the entries
  seen (``PARTIAL_MAX`` at a time, popped from a copy made a max-heap):
  keys are hashed, so every directory is a uniform sample of the cache, and
  the oldest 2% of a sample are among the oldest of the whole cache.  Such
  a process walks what supplies twice its eviction rate that way (about
  ``100 * victims`` entries per write), not ``SCAN_MAX``: its first pass
  takes longer, each of its writes less.  Part of a pass supplies only the
  victims a write needs to get under the limit, never the extra ones; and a
  whole order that ran out before the walk ended its pass (the walk fell
  behind a burst of evictions) is followed by the rest of that pass, if
  ``HARD_SCAN`` covers it, before part of it: so what goes stays in LRU
  order.

Entries past ``expiration_time`` go first.  Memory is bounded: at most three
times ``REMEMBERED`` small tuples (the order, the pass's heap, and an ended
pass's heap with the next order popped from it) and one open directory.
The tuples hold only ints and bytes, so the cyclic garbage collector stops
tracking them at its first look: they add nothing to its pauses.

A writer also recounts the accounting when a recount is due
(``reconcile_interval``, or a file marked for one), a shard or two per write
(``RECOUNT_BUDGET`` files): never the whole cache in one request.
"""

from __future__ import annotations

import heapq
import inspect
import logging
import math
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, NamedTuple

from . import forking, maintenance, tree

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger(__name__)

EXACT_MAX = 10_000  # entries: up to this many, a pass is made in one go
STEP_VICTIMS = 2  # entries a draining write evicts beyond what takes it under the limit ...
STEP_BUDGET_NS = 1_000_000  # ... while its eviction step has taken less than this (1 ms)
REMEMBERED = 32_768  # least recently used entries a pass remembers (a few MB)
SCAN_MIN, SCAN_MAX = 16, 256  # entries an evicting write walks over in a bigger cache
PARTIAL_SHARE = 0.02  # of the entries a pass has seen, the oldest that may go before it ends
PARTIAL_MAX = 4096  # entries taken from part of a pass at a time
CLOSE_STEP = 512  # entries of a pass that ended an evicting write pops into the next order
HARD_SCAN = 4096  # entries a write may walk over to find victims when over the limit
ROOM_VICTIMS = 64  # entries a write that found the disk full evicts before its retry
RECOUNT_BUDGET = 4096  # files a write recounts when a recount is due (one shard at least)
_DIR_COST = 8  # a directory visited counts as this many entries of work
_PASSES = 3  # passes one write may make over a small cache when reads outdate them
_EXPIRY_RECHECK = 1.0  # seconds between re-judging the remembered order for expiry

# A remembered entry: (-rank, used_ns, inode, digest bytes, created_ns), where rank is the
# last use (ns), or -1 if it had expired (it goes first).  Kept as small as a tuple gets.
# The pass in progress keeps them in a min-heap (the youngest of the oldest seen on top,
# to be replaced); popped, that heap gives them youngest first: the remembered order,
# whose end is the oldest, to be evicted.
Remembered = tuple[int, int, int, bytes, int]

if sys.version_info >= (3, 14):
    from heapq import heapify_max, heappop_max
else:  # the same functions, in C, undocumented before 3.14
    heapify_max: Callable[[list[Remembered]], None] = heapq._heapify_max  # type: ignore[assignment]
    heappop_max: Callable[[list[Remembered]], Remembered] = heapq._heappop_max  # type: ignore[attr-defined]


class _Recount(NamedTuple):
    next_shard: int
    left: int
    accounting: tuple[int, int]  # the file counted into: a new one restarts the cycle


class Evictor:
    """One backend instance's share of the eviction work, and what it remembers for it.

    Thread-safe by try-lock: a thread that finds another of its process
    evicting leaves the work to it, unless its own write took the cache over
    a limit (the step at work may have judged the totals before that write
    counted): then it waits for that step (one write's share of work;
    longer when that write must first get the cache under a limit or recount).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._limits = maintenance.limits(store)
        self._draining = False
        self._order: list[Remembered] = []  # newest first: pop() gives the oldest
        self._order_whole = False  # it comes from a whole pass (not from part of one)
        self._expiry_checked = 0.0
        self._rate = 1.0  # entries taken from the order per evicting write (moving average)
        # The pass in progress: the walk, the oldest entries it saw (a heap, youngest on
        # top), the shards it has left, the entries seen, and those tried meanwhile.
        self._walk: _Walk | None = None
        self._heap: list[Remembered] = []
        self._shards_left = store.layout.shard_count
        self._seen = 0
        self._gone: set[bytes] = set()
        # The pass that ended: its heap, popped into the next order a step per write, and
        # what was tried during it.
        self._closing: list[Remembered] = []
        self._next: list[Remembered] = []
        self._closing_gone: set[bytes] = set()
        self._recount: _Recount | None = None
        forking.reset_in_children(self)

    def _reset_after_fork(self) -> None:
        self._lock = threading.Lock()  # another thread of the parent may have held it
        # Dropping the walk closes the child's copy of its directory, unless a thread of
        # the parent was inside it at fork(): such a walk cannot be closed, so it is kept.
        walk, self._walk = self._walk, None
        if walk is not None and inspect.getgeneratorstate(walk) == inspect.GEN_RUNNING:
            _ABANDONED.append(walk)

    # -- the write path -------------------------------------------------------------

    def after_write(self) -> None:
        """After every successful write: recount a shard or two if due, evict if due.

        Trouble (an unreadable directory, a failing disk) is logged, never
        raised: the value was stored.
        """
        store = self.store
        waited = False
        if not self._lock.acquire(blocking=False):
            # Another thread of this process is at it, and may have judged the totals
            # before this write counted: a write that took the cache over a limit
            # waits for that step to end and then takes its own.
            if not self._over():
                return
            self._lock.acquire()
            waited = True
        started = time.monotonic_ns()
        try:
            if waited:  # judged by what the step it waited for left, not from before it
                store.snapshot_totals()
            if self._recount is not None or store.reconcile_due(fresh=False):
                self._recount_step()
            (size, max_entries), low = self._limits
            last = store.last
            if last.total > size or last.entries > max_entries:  # self._over(), inline
                self._draining = True
            if self._draining:
                self._evict(low, STEP_VICTIMS, started + STEP_BUDGET_NS)
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
            store.snapshot_totals()
            (size, max_entries), _ = self._limits
            ratio = store.settings.eviction_low_water
            target = (
                int(min(store.last.total, size) * ratio),
                int(min(store.last.entries, max_entries) * ratio),
            )
            return self._evict(target, ROOM_VICTIMS, must=True)

    def _over(self) -> bool:
        """Over a limit, by the totals this thread read last (see ``LastTotals``)."""
        (size, max_entries), _ = self._limits
        return self.store.last.total > size or self.store.last.entries > max_entries

    def _under(self, target: tuple[int, float]) -> bool:
        return self.store.last.total <= target[0] and self.store.last.entries <= target[1]

    def _evict(
        self, target: tuple[int, float], cap: int, deadline: float = math.inf, must: bool = False
    ) -> int:
        """Evict the least recently used entries until ``target`` is reached: as many as it
        takes to get the cache within its limits, then at most ``cap`` more, and those only
        before ``deadline`` (``time.monotonic_ns()``).  Returns how many went."""
        store = self.store
        (size, max_entries), _ = self._limits
        small = store.last.entries <= EXACT_MAX
        if small:
            if not self._order_whole:
                self._order.clear()  # part of a pass is not the exact order: make one
        else:
            self._walk_on(self._walk_size())
            self._close(CLOSE_STEP)
        budget = [HARD_SCAN, _PASSES]  # entries left to walk, passes left, in this write
        victims = extra = taken = 0  # extra: victims while within the limits
        while True:
            over = store.last.total > size or store.last.entries > max_entries
            spent = not over and (extra >= cap or time.monotonic_ns() >= deadline)
            if self._under(target):  # expired entries at hand go all the same (misses)
                if spent or not (self._order and self._order[-1][0] > 0):
                    break
            elif spent:
                break
            entry = self._take(small, must or over, budget)
            if entry is None:
                break
            taken += 1
            minus_rank, used_ns, inode, digest, _ = entry
            self._gone.add(digest)  # tried: no longer a candidate of the pass in progress
            if self._unchanged(digest, inode, used_ns) and store.discard(
                digest.hex(), inode, used_ns
            ):
                victims += 1
                extra += not over
                store.evictions += minus_rank < 0  # expired entries are not evictions
        self._rate = 0.9 * self._rate + 0.1 * taken
        return victims

    def _unchanged(self, digest: bytes, inode: int, used_ns: int) -> bool:
        """The entry's file is still the one judged, by one ``lstat`` and no lock.

        Every process's order holds the same oldest entries, so with several
        writers most of what one takes another has already evicted: this
        passes over those for one syscall, not the four of a locked check
        (``discard`` checks again, under the lock, before it removes).
        """
        try:
            info = os.lstat(self.store.layout.entry_path(digest.hex()))
        except FileNotFoundError:
            return False
        return info.st_ino == inode and info.st_mtime_ns == used_ns

    def _take(self, small: bool, must: bool, budget: list[int]) -> Remembered | None:
        """The oldest entry remembered; when there is none, what is known of the pass in
        progress, or (if a victim is needed) more of a pass, within ``budget``.

        A whole order that ran out before the walk ended its pass (the walk fell
        behind) is followed by the rest of that pass if the budget covers it, so
        what goes stays in LRU order; only then by part of the pass.  Extra victims
        (``must`` false) come only from a whole order.
        """
        if not (must or small or self._order_whole):
            return None
        ending_tried = False
        while not self._order:
            if self._closing:  # the pass that ended: its order now, in one go
                self._close(len(self._closing))
                continue
            if self._order_whole and not small and not ending_tried:
                if not must:
                    return None
                ending_tried = True
                budget[0] -= self._walk_on(budget[0], to_pass_end=True)
                continue
            if self._heap and not small:  # part of a pass: only its oldest are surely old
                self._order = self._oldest_untried(max(1, int(PARTIAL_SHARE * self._seen)))
                self._order_whole = False
                if self._order:
                    break
            if not must and not small:
                return None
            if small:
                if budget[1] <= 0:
                    return None
                budget[1] -= 1
                self._whole_pass()
            else:
                if budget[0] <= 0:
                    return None
                budget[0] -= self._walk_on(SCAN_MAX)
                if not self._heap:
                    return None  # nothing to find: an empty cache
        self._recheck_expiry()
        return self._order.pop()

    def _oldest_untried(self, count: int) -> list[Remembered]:
        """The oldest entries of the pass in progress that no write has tried, ``count``
        (at most ``PARTIAL_MAX``), newest first: pops from a copy made a max-heap."""
        part = self._heap.copy()
        heapify_max(part)
        oldest: list[Remembered] = []
        while part and len(oldest) < min(count, PARTIAL_MAX):
            entry = heappop_max(part)
            if entry[3] not in self._gone:
                oldest.append(entry)
        oldest.reverse()
        return oldest

    def _recheck_expiry(self) -> None:
        """Move remembered entries that expired since they were judged to the front."""
        store = self.store
        now = time.time()
        if store.settings.expiration_time is None or now - self._expiry_checked < _EXPIRY_RECHECK:
            return
        self._expiry_checked = now
        limit = (now - store.settings.expiration_time) * 1e9  # created before this: expired
        if any(e[0] < 0 < e[4] < limit for e in self._order):
            expired = [(1, *e[1:]) for e in self._order if 0 < e[4] < limit]
            self._order = [e for e in self._order if not 0 < e[4] < limit] + expired

    # -- passes over the cache -------------------------------------------------------

    def _rank(self, info: os.stat_result, now: float) -> int:
        """An entry's place in the order: its last use, or -1 if it has expired."""
        return -1 if self.store.is_expired(info.st_atime_ns / 1e9, now) else info.st_mtime_ns

    def _judged(self, rank: int, digest: str, info: os.stat_result) -> Remembered:
        created = info.st_atime_ns if self.store.settings.expiration_time is not None else 0
        return (-rank, info.st_mtime_ns, info.st_ino, bytes.fromhex(digest), created)

    def _whole_pass(self) -> None:
        """Judge every entry of a small cache at once: the exact LRU order."""
        store = self.store
        now = time.time()
        order: list[Remembered] = []
        whole = True
        for shard in range(store.layout.shard_count):
            for directory in tree.leaf_dirs(store, shard)[0]:
                for digest, info in tree.record_stats(store, directory):
                    order.append(self._judged(self._rank(info, now), digest, info))
                whole = len(order) <= 2 * EXACT_MAX
                if not whole:  # far more than the counters say: the oldest of those seen
                    break
            if not whole:
                break
        order.sort()
        self._order, self._order_whole = order, whole
        self._closing, self._next = [], []
        self._gone = set()  # no pass is in progress in a small cache: this is all it tried
        self._expiry_checked = now

    def _walk_size(self) -> int:
        """Entries to walk in this write: enough for the pass to end before the order in
        hand runs out at the current rate of eviction.  Without an order from a whole pass
        (a fresh process), enough for the pass's oldest share to supply twice that rate:
        its first pass takes longer, each of its writes less."""
        rate = max(self._rate, 1.0)
        if self._order_whole and self._order:
            work_left = max(0, self.store.last.entries - self._seen)
            work_left += self._shards_left * _DIR_COST
            need = 1.25 * work_left * rate / len(self._order)
        else:
            need = 2 * rate / PARTIAL_SHARE
        return max(SCAN_MIN, min(SCAN_MAX, math.ceil(need)))

    def _walk_on(self, count: int, to_pass_end: bool = False) -> int:
        """Walk over ``count`` entries' worth of work into the pass's heap (or less, to the
        end of the pass in progress); the work done."""
        store = self.store
        if self._walk is None:
            self._walk = _walk(store, random.randrange(store.layout.shard_count))
        heap = self._heap
        now = time.time()
        work = 0
        while work < count:
            try:
                item = next(self._walk)
            except BaseException:  # a walk that raised is over: a new one next time
                self._walk = None
                raise
            if item is None:
                work += _DIR_COST
            elif isinstance(item, int):
                self._shards_left -= 1
                if self._shards_left <= 0:
                    self._end_pass()
                    if to_pass_end:
                        break
                    heap = self._heap
            else:
                work += 1
                self._seen += 1
                digest, info = item
                rank = self._rank(info, now)
                if len(heap) < REMEMBERED:
                    heapq.heappush(heap, self._judged(rank, digest, info))
                elif -rank >= heap[0][0]:  # else newer than all it keeps: no tuple made
                    entry = self._judged(rank, digest, info)
                    if entry > heap[0]:
                        heapq.heapreplace(heap, entry)
        return work

    def _end_pass(self) -> None:
        """The walk has been round the tree: what it remembers becomes the next order, as
        the following writes pop it (``_close``), and a new pass begins."""
        self._close(len(self._closing))  # the pass before's, should it be unfinished
        self._closing, self._closing_gone = self._heap, self._gone
        self._heap, self._gone = [], set()
        self._shards_left = self.store.layout.shard_count
        self._seen = 0

    def _close(self, count: int) -> None:
        """Pop ``count`` more of the pass that ended into the next order, passing over
        what was tried since; once all are popped, that is the order.  Its heap pops
        youngest first, so the order comes out newest first, no sort, no heapify: at the
        pass's end those took one write 20 to 35 ms (32,768 scattered tuples)."""
        closing, order = self._closing, self._next
        if not closing:
            return
        tried, gone = self._closing_gone, self._gone
        for _ in range(min(count, len(closing))):
            entry = heapq.heappop(closing)
            if entry[3] not in tried and entry[3] not in gone:
                order.append(entry)
        if not closing:
            self._order, self._order_whole, self._next = order, True, []
            self._closing_gone = set()
            self._expiry_checked = time.time()

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
        store.snapshot_totals()


_Walk = Generator[tuple[str, os.stat_result] | int | None, None, None]


def _walk(store: Store, shard: int) -> _Walk:
    """Every record of the cache, shard after shard from ``shard``, round and round.

    ``None`` after each directory, and after a shard with none (work is counted
    even in an empty cache, so a walk of a tree with no directory left ends), and
    the shard's number after each shard.
    """
    shards = store.layout.shard_count
    while True:
        directories = tree.leaf_dirs(store, shard)[0]
        for directory in directories:
            yield from tree.record_stats(store, directory)
            yield None
        if not directories:
            yield None
        yield shard
        shard = (shard + 1) % shards


_ABANDONED: list[_Walk] = []  # walks a forked child inherited mid-step (one fd each, rare)
