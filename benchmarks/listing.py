"""Workload 9: listing keys and deleting by prefix, at the scale users reach.

Both caches hold the same entries (keys ``user:<i % 1000>:item:<i>``, 100-byte values),
so a prefix ``user:<n>:`` matches a thousandth of them.  Every case runs in a fresh
``spawn``-ed child, so its peak RSS growth (``VmHWM`` minus ``VmRSS`` before the timed
part) is its own; cases alternate between the backends.  diskcache lists keys with an
SQL scan (``iterkeys``) and has no prefix query: its prefix cases filter in Python, and
its delete removes each matching key.  The floor lists every directory of our tree
(names only, no file read): what any listing of a file-per-entry cache must pay.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

import diskcache
from common import OURS, Params, Table, WorkloadResult, fmt_num, fmt_ratio, ratio, read_status_kib

from dogpile_fsbackend import PickleFSBackend

SPAWN = multiprocessing.get_context("spawn")
DISKCACHE = "diskcache"
FLOOR = "os floor (scandir, names only)"
VALUE = b"v" * 100


def _key(index: int) -> str:
    return f"user:{index % 1000}:item:{index}"


def _fill(ours_dir: str, peer_dir: str, entries: int) -> None:
    backend = PickleFSBackend({"base_dir": ours_dir, "cache_size": 1 << 40})
    with diskcache.Cache(peer_dir, size_limit=1 << 40) as cache:
        for start in range(0, entries, 1000):
            batch = [_key(i) for i in range(start, min(start + 1000, entries))]
            for key in batch:
                backend.set_serialized(key, VALUE)
            with cache.transact():
                for key in batch:
                    cache.set(key, VALUE)


def _operation(backend: str, case: str, directory: str, prefix: str) -> Callable[[], int]:
    """The timed part of one case: returns how many keys it listed or removed."""
    if backend == OURS:
        ours = PickleFSBackend({"base_dir": directory, "cache_size": 1 << 40})
        return {
            "list all keys": lambda: sum(1 for _ in ours.keys()),  # noqa: SIM118 (not a dict)
            "list keys by prefix": lambda: sum(1 for _ in ours.keys(prefix)),
            "delete by prefix": lambda: ours.delete_matching(prefix),
            "verify (a full scan)": lambda: ours.verify().entries,
        }[case]
    if backend == FLOOR:
        return lambda: sum(len(names) for _, _, names in os.walk(directory))
    cache = diskcache.Cache(directory)

    def delete_by_prefix() -> int:
        doomed = [key for key in cache.iterkeys() if key.startswith(prefix)]
        return sum(cache.delete(key) for key in doomed)

    return {
        "list all keys": lambda: sum(1 for _ in cache.iterkeys()),
        "list keys by prefix": lambda: sum(1 for k in cache.iterkeys() if k.startswith(prefix)),
        "delete by prefix": delete_by_prefix,
    }[case]


def _child(backend: str, case: str, directory: str, prefix: str, results: Any) -> None:
    operation = _operation(backend, case, directory, prefix)
    rss = read_status_kib("VmRSS") or 0
    start = time.perf_counter()
    count = operation()
    seconds = time.perf_counter() - start
    results.put((count, seconds, max(0, (read_status_kib("VmHWM") or 0) - rss) / 1024))


def _run(backend: str, case: str, directory: str, prefix: str) -> tuple[int, float, float]:
    results = SPAWN.Queue()
    child = SPAWN.Process(target=_child, args=(backend, case, directory, prefix, results))
    child.start()
    outcome: tuple[int, float, float] = results.get(timeout=3600)
    child.join(60)
    return outcome


CASES = [  # (operation, the backends that run it)
    ("list all keys", (OURS, DISKCACHE, FLOOR)),
    ("list keys by prefix", (OURS, DISKCACHE)),
    ("delete by prefix", (OURS, DISKCACHE)),  # a new prefix each run: each removes as much
    ("verify (a full scan)", (OURS,)),
]


def listing(params: Params, workdir: str) -> WorkloadResult:
    entries, repeats = params.listing_entries, params.listing_repeats
    directories = {
        OURS: os.path.join(workdir, "ours"),
        DISKCACHE: os.path.join(workdir, "diskcache"),
    }
    directories[FLOOR] = os.path.join(directories[OURS], "data")
    _fill(directories[OURS], directories[DISKCACHE], entries)
    table = Table(
        f"Workload 9: listing and deleting keys, {entries:,} entries",
        [
            "operation",
            "backend",
            "keys",
            "best s",
            "median s",
            "us per entry (best)",
            "RSS growth MiB",
            "ours/peer (best)",
        ],
    )
    records: list[dict[str, Any]] = []
    for case, backends in CASES:
        taken: dict[str, list[tuple[int, float, float]]] = {b: [] for b in backends}
        for repeat in range(repeats):
            prefix = f"user:{7 + repeat}:"
            for backend in backends[repeat % len(backends) :] + backends[: repeat % len(backends)]:
                taken[backend].append(_run(backend, case, directories[backend], prefix))
        ours_best = min(seconds for _, seconds, _ in taken[OURS])
        for backend in backends:
            runs = taken[backend]
            times = sorted(seconds for _, seconds, _ in runs)
            best, median = times[0], times[len(times) // 2]
            growth = max(rss for _, _, rss in runs)
            r = ratio(ours_best, best)
            records.append(
                {
                    "operation": case,
                    "backend": backend,
                    "keys": runs[0][0],
                    "seconds": times,
                    "rss_growth_mib": growth,
                    "ours_over_peer": r,
                }
            )
            table.add(
                case,
                backend,
                f"{runs[0][0]:,}",
                fmt_num(best, 2),
                fmt_num(median, 2),
                fmt_num(best / entries * 1e6, 2),
                fmt_num(growth),
                fmt_ratio(r, backend == OURS),
            )
    table.notes += [
        f"Each case ran {repeats} times, each run in a fresh spawned child; the caches were "
        "written just before, so their files are in the page cache (a warm listing).",
        "keys() reads each entry's first 4 KiB (header and key) and the whole record of "
        "each key it lists (CRC, expiry); delete by prefix reads the headers and removes "
        "the matches under their shard locks. 'us per entry' divides by every entry in "
        "the cache: all of them are visited.",
        "RSS growth: the child's VmHWM minus its VmRSS just before the timed part. Flat "
        "means the listing holds one directory at a time, whatever the cache's size.",
        "diskcache keeps keys in one SQLite table: iterkeys() is an index scan in C, no "
        "file per entry; it has no prefix query, so its prefix cases filter in Python.",
    ]
    return WorkloadResult("listing", table, records)
