"""Eviction as a bounded step per write (eviction.py), with real processes.

The limits hold at every moment, as a monitor process sampling the shared
counters sees them; the order of a pass spread over writes is the true LRU
order; a write never walks more than its bounded share, and takes extra
victims only within its time budget; a due recount is spread over writes;
nothing leaks descriptors or memory.  A cache of a million entries
is the benchmark's business (benchmarks/scale.py): here the sizes of
eviction.py are shrunk in each process, so that a cache of a few thousand
entries takes the paths of a big one.
"""

from __future__ import annotations

import gc
import math
import os
import random
import shutil
import time

import faultkit
import pytest
from conftest import SPAWN, WAIT
from dogpile.cache.api import NO_VALUE

from dogpile_fsbackend import PickleFSBackend, eviction, layout, maintenance, records, tree

WRITERS = 3
# The paths of a big cache, in one of a few thousand: no pass in one go, and an order
# remembered from each pass that lasts about as long, measured in passes, as at half a
# million entries (2,000 / 128 = 500,000 / 32,768), so the walk goes about as fast.
BIG_CACHE_PATHS = {"EXACT_MAX": 0, "REMEMBERED": 128, "SCAN_MIN": 4}
# What a whole pass over those 2,000 entries and the 256 directories of the default
# layout costs: a write whose order ran out can end any pass within HARD_SCAN, so what
# goes is exact (above that, a pass that fell behind is left to part of a pass).
PASS_WORK = 2000 + 256 * eviction._DIR_COST
assert PASS_WORK < eviction.HARD_SCAN


def _sized(paths: dict[str, int] | None) -> None:
    """Shrink eviction.py's sizes in this process (each spawned process calls it)."""
    for name, value in (paths or {}).items():
        setattr(eviction, name, value)


def _backend(base_dir: str, **arguments) -> PickleFSBackend:
    return PickleFSBackend({"base_dir": base_dir, **arguments})


def _entry_size(key: str, value: bytes) -> int:
    return records.HEADER_SIZE + len(key.encode()) + len(value)


def _present(backend, key: str) -> bool:
    digest = layout.key_digest(key.encode())
    return os.path.lexists(backend.store.layout.entry_path(digest))


# -- the limits at every moment ---------------------------------------------------------


def _writer(base_dir, limits, paths, worker, count, barrier, results):
    _sized(paths)
    backend = _backend(base_dir, **limits)
    rng = random.Random(worker)
    barrier.wait(WAIT)
    largest = 0
    for i in range(count):
        key, value = f"w{worker}-{i}", rng.randbytes(rng.randint(200, 1500))
        backend.set_serialized(key, value)
        largest = max(largest, _entry_size(key, value))
    results.put(("writer", largest, backend.stats()["evictions"]))


def _monitor(base_dir, barrier, stop, results):
    backend = _backend(base_dir)
    barrier.wait(WAIT)
    samples = top_bytes = top_entries = 0
    while not stop.is_set() or samples < 10:
        stats = backend.stats()
        top_bytes, top_entries = max(top_bytes, stats["bytes"]), max(top_entries, stats["entries"])
        samples += 1
    results.put(("monitor", top_bytes, top_entries, samples))


@pytest.mark.parametrize("paths", [None, BIG_CACHE_PATHS], ids=["small-cache", "big-cache"])
@pytest.mark.parametrize(
    "limits",
    [
        {"cache_size": 96 * 1024},
        {"max_entries": 80},
        {"cache_size": 96 * 1024, "max_entries": 100},
    ],
    ids=["cache_size", "max_entries", "both"],
)
def test_the_limits_hold_at_every_moment(cache_dir, limits, paths):
    """Three writers set new keys far past the limits while a monitor process reads the
    shared counters as fast as it can: no sample is ever above a limit by more than one
    entry per writer (each may have published one it has not yet evicted for)."""
    _backend(cache_dir).set_serialized("seed", b"x")
    barrier, stop, results = SPAWN.Barrier(WRITERS + 1), SPAWN.Event(), SPAWN.Queue()
    writers = [
        SPAWN.Process(target=_writer, args=(cache_dir, limits, paths, w, 250, barrier, results))
        for w in range(WRITERS)
    ]
    monitor = SPAWN.Process(target=_monitor, args=(cache_dir, barrier, stop, results))
    for proc in [*writers, monitor]:
        proc.start()
    written = [results.get(timeout=WAIT) for _ in writers]
    stop.set()
    watched = results.get(timeout=WAIT)
    for proc in [*writers, monitor]:
        proc.join(WAIT)
        assert proc.exitcode == 0
    assert all(o[0] == "writer" for o in written) and watched[0] == "monitor"
    largest = max(o[1] for o in written)
    assert sum(o[2] for o in written) > 0, "the test wrote too little to evict"
    _, top_bytes, top_entries, samples = watched
    assert samples >= 10
    if "cache_size" in limits:
        assert top_bytes <= limits["cache_size"] + WRITERS * largest
    if "max_entries" in limits:
        assert top_entries <= limits["max_entries"] + WRITERS
    size, entries = faultkit.disk_usage(cache_dir)  # at rest: within the limits, exactly
    assert size <= limits.get("cache_size", size) and entries <= limits.get("max_entries", entries)
    stats = _backend(cache_dir).stats()
    assert (stats["bytes"], stats["entries"]) == (size, entries)  # no drift from races


# -- LRU quality of a pass spread over the writes -----------------------------------------

FILLED = 2000
HOT = 20


def _age_in_order(backend, keys: list[str]) -> None:
    """Date the entries an hour back, one millisecond apart, oldest first: a known order
    without waiting for the filesystem's clock."""
    start = time.time_ns() - 3600 * 10**9
    for rank, key in enumerate(keys):
        path = backend.store.layout.entry_path(layout.key_digest(key.encode()))
        when = start + rank * 10**6
        os.utime(path, ns=(when, when))


def _reader(base_dir, paths, hot, barrier, stop, results):
    _sized(paths)
    backend = _backend(base_dir)
    for key in hot:  # recently read: before the writers start
        assert backend.get_serialized(key) is not NO_VALUE
    barrier.wait(WAIT)
    reads = 0
    while not stop.is_set():
        for key in hot:
            backend.get_serialized(key)
            reads += 1
    results.put(("reader", reads))


def _new_keys_writer(base_dir, limit, paths, worker, count, barrier, results):
    _sized(paths)
    backend = _backend(base_dir, cache_size=limit)
    barrier.wait(WAIT)
    for i in range(count):
        backend.set_serialized(f"new-{worker}-{i}", b"n" * 100)
    results.put(("writer", backend.stats()["evictions"]))


@pytest.mark.parametrize("paths", [None, BIG_CACHE_PATHS], ids=["small-cache", "big-cache"])
@pytest.mark.parametrize("writers", [1, 2])
def test_a_pass_spread_over_the_writes_evicts_in_true_lru_order(cache_dir, writers, paths):
    """Two thousand entries of a known age, a reader keeping 20 of the oldest in use, and
    writers setting new keys past the limit: what went is exactly what true LRU would
    have evicted (the oldest entries nobody read), both from one pass in one go (a cache
    of up to EXACT_MAX entries) and with the paths of a big cache (a spread pass)."""
    filler = _backend(cache_dir)
    keys = [f"old-{rank:04d}" for rank in range(FILLED)]
    for key in keys:
        filler.set_serialized(key, b"o" * 100)
    _age_in_order(filler, keys)
    limit = filler.stats()["bytes"]
    hot = keys[10 : 10 * HOT + 10 : 10]  # among the oldest tenth
    barrier, stop, results = SPAWN.Barrier(writers + 1), SPAWN.Event(), SPAWN.Queue()
    procs = [
        SPAWN.Process(
            target=_new_keys_writer,
            args=(cache_dir, limit, paths, w, 600 // writers, barrier, results),
        )
        for w in range(writers)
    ]
    reader = SPAWN.Process(target=_reader, args=(cache_dir, paths, hot, barrier, stop, results))
    for proc in [*procs, reader]:
        proc.start()
    outcomes = [results.get(timeout=WAIT) for _ in procs]
    stop.set()
    outcomes.append(results.get(timeout=WAIT))
    for proc in [*procs, reader]:
        proc.join(WAIT)
        assert proc.exitcode == 0
    gone = [key for key in keys if not _present(filler, key)]
    assert len(gone) >= 600  # as many as were written, and more while draining
    cold = [key for key in keys if key not in hot]
    assert gone == cold[: len(gone)]  # the oldest unread ones, and only those
    assert all(_present(filler, key) for key in hot)
    assert all(_present(filler, f"new-{w}-{i}") for w in range(writers) for i in range(5))


def test_a_walk_that_fell_behind_ends_its_pass_rather_than_evict_out_of_order(
    cache_dir, monkeypatch
):
    """When the order from a whole pass runs out before the walk has ended the next pass
    (the walk fell behind), the write that needs a victim walks the rest of that pass
    (within HARD_SCAN) and evicts from its whole order, not from part of it; and no extra
    victim comes from part of a pass.  What went is still exactly the oldest entries."""
    for name, value in BIG_CACHE_PATHS.items():
        monkeypatch.setattr(eviction, name, value)
    filler = _backend(cache_dir)
    keys = [f"old-{rank:04d}" for rank in range(FILLED)]
    for key in keys:
        filler.set_serialized(key, b"o" * 100)
    _age_in_order(filler, keys)
    backend = _backend(cache_dir, cache_size=filler.stats()["bytes"])
    evictor = backend.evictor
    writes = 0
    while not evictor._order_whole:  # a fresh process: part of a pass until one ends
        backend.set_serialized(f"new-{writes}", b"n" * 100)
        writes += 1
    monkeypatch.setattr(evictor, "_walk_size", lambda: eviction.SCAN_MIN)  # falls behind
    ran_out = 0
    for i in range(400):
        ran_out += not evictor._order and not evictor._closing
        backend.set_serialized(f"new-{writes + i}", b"n" * 100)
        assert evictor._order_whole
    assert ran_out >= 2  # the order of 128 ran out, more than once, with the walk behind
    gone = [key for key in keys if not _present(filler, key)]
    assert len(gone) >= writes + 400
    assert gone == keys[: len(gone)]


# -- bounded work per write ----------------------------------------------------------------


def test_a_write_that_must_evict_from_a_tree_with_no_directory_left_gives_up(
    cache_dir, monkeypatch
):
    """Counters that still count entries whose directories are gone (``data/`` emptied by
    hand): a write that must evict walks the empty tree a few times within its budget
    and finds nothing, rather than go round it for ever (a shard with no directory is
    work too)."""
    for name, value in BIG_CACHE_PATHS.items():
        monkeypatch.setattr(eviction, name, value)
    filler = _backend(cache_dir)
    for i in range(50):
        filler.set_serialized(f"k{i}", b"v" * 100)
    data_dir = filler.store.layout.data_dir
    for name in os.listdir(data_dir):
        shutil.rmtree(os.path.join(data_dir, name))
    backend = _backend(cache_dir, max_entries=10)
    looks: list[int] = []
    leaf_dirs = tree.leaf_dirs

    def counted(store, shard: int):
        looks.append(shard)
        if len(looks) > 20 * store.layout.shard_count:
            pytest.fail("the walk goes round a tree with no directory for ever")
        return leaf_dirs(store, shard)

    monkeypatch.setattr(tree, "leaf_dirs", counted)
    assert backend.evictor.make_room() == 0
    assert 0 < len(looks) <= 20 * backend.store.layout.shard_count


def _spread_passes_at_the_limit(cache_dir: str, monkeypatch) -> PickleFSBackend:
    """3,000 entries at their limit, with sizes that spread each pass over the writes."""
    monkeypatch.setattr(eviction, "EXACT_MAX", 500)
    monkeypatch.setattr(eviction, "REMEMBERED", 256)
    filler = _backend(cache_dir)
    for i in range(3000):
        filler.set_serialized(f"k{i}", b"v" * 50)
    return _backend(cache_dir, cache_size=filler.stats()["bytes"])


def test_a_write_walks_a_bounded_share_and_never_the_whole_cache(cache_dir, monkeypatch):
    """Above EXACT_MAX entries no write makes a pass in one go: each walks at most
    SCAN_MAX entries, plus HARD_SCAN if it must find victims to get under the limit; and
    over many writes the walk is what a pass per REMEMBERED evictions takes."""
    backend = _spread_passes_at_the_limit(cache_dir, monkeypatch)
    evictor = backend.evictor
    walked = []
    walk_on = evictor._walk_on

    def counting(count: int, to_pass_end: bool = False) -> int:
        walked[-1] += (work := walk_on(count, to_pass_end))
        return work

    monkeypatch.setattr(evictor, "_walk_on", counting)
    monkeypatch.setattr(evictor, "_whole_pass", lambda: pytest.fail("a pass in one go"))
    for i in range(1500):
        walked.append(0)
        backend.set_serialized(f"new{i}", b"v" * 50)
    assert max(walked) <= eviction.SCAN_MAX + eviction.HARD_SCAN
    evictions = backend.stats()["evictions"]
    assert evictions >= 1500
    # A pass (3,000 entries and 256 directories) ends as the order in hand runs low: one
    # for every ~0.8 REMEMBERED entries taken, and the first one besides.
    passes = sum(walked) / (3000 + 256 * eviction._DIR_COST)
    assert passes <= 2 + 1.5 * evictions / eviction.REMEMBERED


def test_an_ended_pass_becomes_the_order_a_bounded_step_per_write(cache_dir, monkeypatch):
    """The heap of a pass that ended is popped into the next order CLOSE_STEP entries per
    evicting write while the old order serves: all at once only when that ran out."""
    monkeypatch.setattr(eviction, "CLOSE_STEP", 16)
    backend = _spread_passes_at_the_limit(cache_dir, monkeypatch)
    evictor = backend.evictor
    steps: list[tuple[int, int, bool]] = []  # (pops asked, heap left, order in hand)
    close = evictor._close

    def recording(count: int) -> None:
        if evictor._closing:
            steps.append((count, len(evictor._closing), bool(evictor._order)))
        close(count)

    monkeypatch.setattr(evictor, "_close", recording)
    for i in range(1500):
        backend.set_serialized(f"new{i}", b"v" * 50)
    assert backend.stats()["evictions"] >= 1500
    stepped = [left for count, left, _ in steps if count == eviction.CLOSE_STEP]
    assert any(left > eviction.CLOSE_STEP for left in stepped)  # spread over writes
    assert all(not in_hand for count, _, in_hand in steps if count > eviction.CLOSE_STEP)


def _filled_to_the_limit(cache_dir: str, entries: int) -> PickleFSBackend:
    """A backend whose limit is what ``entries`` entries of one size take."""
    filler = _backend(cache_dir)
    for i in range(entries):
        filler.set_serialized(f"k{i:05d}", b"v" * 100)
    return _backend(cache_dir, cache_size=filler.stats()["bytes"])


@pytest.mark.parametrize("paths", [None, BIG_CACHE_PATHS], ids=["small-cache", "big-cache"])
@pytest.mark.parametrize("budget_ns", [0, math.inf], ids=["no-time-to-spare", "time-to-spare"])
def test_a_draining_write_takes_extra_victims_only_within_its_time_budget(
    cache_dir, monkeypatch, paths, budget_ns
):
    """Writes past the limit always evict what takes the cache under it; the extra victims
    that drain it towards the low-water mark stop at STEP_BUDGET_NS.  With no time to
    spare, each write evicts exactly what its own entry needs (entries of one size: one
    each) and the cache stays at its limit; with time, writes drain it below."""
    for name, value in (paths or {}).items():
        monkeypatch.setattr(eviction, name, value)
    monkeypatch.setattr(eviction, "STEP_BUDGET_NS", budget_ns)
    backend = _filled_to_the_limit(cache_dir, 300)
    limit = backend.store.settings.cache_size
    for i in range(100):
        backend.set_serialized(f"n{i:05d}", b"v" * 100)  # the same size as every entry
    evictions, size = backend.stats()["evictions"], faultkit.disk_usage(cache_dir)[0]
    if budget_ns == 0:
        assert (evictions, size) == (100, limit)
    else:
        assert evictions > 100 and size < limit


def test_a_small_cache_forgets_what_it_tried_at_each_pass(cache_dir):
    """What an evictor of a small cache remembers having tried stays within one pass's
    worth (the cache's entries), however many writes evict."""
    backend = _filled_to_the_limit(cache_dir, 100)
    for i in range(3000):
        backend.set_serialized(f"n{i:05d}", b"v" * 100)
    assert backend.stats()["evictions"] >= 3000
    assert len(backend.evictor._gone) <= 100


# -- the periodic recount, spread over writes ---------------------------------------------


def test_a_due_recount_is_spread_over_writes_and_ends_exact(cache_dir, monkeypatch):
    """Drift (files removed behind the cache's back) is repaired by the recount that falls
    due, a budget of files per write, never the whole cache in one write."""
    monkeypatch.setattr(eviction, "RECOUNT_BUDGET", 200)
    backend = _backend(cache_dir, reconcile_interval=3600)
    for i in range(1500):
        backend.set_serialized(f"k{i}", b"v" * 50)
    for i in range(0, 1500, 3):  # a third deleted by hand: the counters do not know
        os.unlink(backend.store.layout.entry_path(layout.key_digest(f"k{i}".encode())))
    assert backend.stats()["entries"] == 1500
    backend.store.accounting.last_reconcile = 0.0  # marked for a recount, as damage does
    recounted = []
    recount_shard = maintenance.recount_shard

    def counting(store, shard, damaged=None):
        found = recount_shard(store, shard, damaged)
        recounted[-1] += found.files
        return found

    monkeypatch.setattr(maintenance, "recount_shard", counting)
    writes = 0
    while backend.store.reconcile_due():
        recounted.append(0)
        backend.set_serialized(f"new{writes}", b"v" * 50)
        writes += 1
        assert writes < 200, "the recount never ended"
    assert writes > 1  # spread out
    assert max(recounted) <= 200 + 40  # the budget, and one shard's files past it at most
    size, entries = faultkit.disk_usage(cache_dir)
    assert (backend.stats()["bytes"], backend.stats()["entries"]) == (size, entries)
    assert entries == 1000 + writes


# -- nothing leaks ---------------------------------------------------------------------------


def test_many_backends_that_evicted_leave_no_descriptor_behind(cache_dir, monkeypatch):
    """200 backends on one directory, each evicting with a walk in progress (an open
    directory), then dropped: the process's descriptor count stays flat."""
    monkeypatch.setattr(eviction, "EXACT_MAX", 0)
    _backend(cache_dir).set_serialized("seed", b"x")
    gc.collect()
    before = faultkit.fd_count()
    for round_number in range(200):
        backend = _backend(cache_dir, cache_size=8 * 1024)
        for i in range(12):
            backend.set_serialized(f"r{round_number}-{i}", b"v" * 900)
        assert backend.evictor._walk is not None  # a directory is open right now
        del backend
    gc.collect()
    assert faultkit.fd_count() == before


# -- prune: a global cut without a list of all entries ------------------------------------


def test_prune_cuts_in_true_lru_order_from_a_histogram(cache_dir):
    """prune finds where to cut in a histogram of last use (constant memory) and evicts
    what is older in a second pass: exactly the least recently used entries go."""
    filler = _backend(cache_dir)
    keys = [f"k{rank:04d}" for rank in range(3000)]
    for key in keys:
        filler.set_serialized(key, b"v" * 100)
    _age_in_order(filler, keys)
    size = filler.stats()["bytes"]
    small = _backend(cache_dir, cache_size=size // 2, max_entries=2000)
    passes = []
    result = maintenance.prune(small.store, progress=passes.append)
    assert len(passes) == maintenance.PRUNE_PASSES * small.store.layout.shard_count
    kept = [key for key in keys if _present(filler, key)]
    assert kept == keys[len(keys) - len(kept) :]  # the newest stayed, the oldest went
    assert (result.removed, result.expired) == (len(keys) - len(kept), 0)
    stats = small.stats()
    assert stats["bytes"] <= size // 2 * 0.9 and stats["entries"] <= 1800
    assert stats["bytes"] > size // 2 * 0.9 - 200  # no more than needed (an entry is ~140 B)
    assert stats["evictions"] == result.removed
