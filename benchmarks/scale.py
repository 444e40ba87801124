"""Workload 10: a million small entries at the size limit, evicted by several writers at once.

For each backend (ours, and diskcache at the same size beside it), in spawned
processes released together by a barrier:

1. **fill**: ``scale_fill_processes`` processes set new keys through their own
   region (``set_multi``, one key range each) under a limit far too big to
   evict.  The limit of every later phase is the size the filled entries take
   by the backend's own measure (our ``stats()["bytes"]``, diskcache's
   ``volume()``), so every later write must evict.
2. **steady**: ``scale_writers`` writers set new keys, each set timed; a light
   reader reads a hot set of old keys at a paced rate (after one sweep over
   them before the writers start); a monitor samples the backend's size
   figure every ``scale_monitor_interval_s``.
3. **at rest**: an apparent-size walk of the directory, which keys are still
   there (checked without touching recency), LRU precision against a true-LRU
   oracle fed the merged logs (oracle.py), and how many hot keys survived.
4. **maintenance**: prune, verify and clear (diskcache: cull, check, clear),
   each in a fresh process at the full size, while a writer keeps setting new
   keys; the limit is again what the cache holds when the round starts.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import time
from array import array
from collections.abc import Callable, Sequence
from typing import Any

from common import Params, WorkloadResult, percentile, read_status_kib, slug
from oracle import GET_HIT, GET_MISS, SET, OpLog, ever_set, lru_survivors, precision
from peers import BIG_CACHE, close_region
from phases import PHASE_S, WAIT_S, Phase, Ready
from scale_backends import Handle, Setup, all_bytes, key_name
from scale_tables import BLOCKED_MS, tables

_SERIES_POINTS = 2_000  # monitor samples kept in the JSON


def _rss(before_kib: int | None) -> dict[str, int | None]:
    return {"rss_before_kib": before_kib, "peak_rss_kib": read_status_kib("VmHWM")}


def _fill(ready: Ready, setup: Setup, first: int, stop: int, batch: int) -> dict[str, Any]:
    region, _ = setup.open()
    value = setup.value()
    log = OpLog()
    ready()
    start = time.perf_counter()
    for low in range(first, stop, batch):
        keys = range(low, min(low + batch, stop))
        if len(keys) == 1:
            log.add(time.monotonic_ns(), SET, low)
            region.set(key_name(low), value)
            continue
        begin = time.monotonic_ns()
        region.set_multi({key_name(key): value for key in keys})
        step = (time.monotonic_ns() - begin) / len(keys)
        for index, key in enumerate(keys):  # set_multi sets them in order: spread the stamps
            log.add(begin + int(index * step), SET, key)
    seconds = time.perf_counter() - start
    close_region(region)
    return {"log": log, "seconds": seconds}


def _write(ready: Ready, setup: Setup, first: int, count: int) -> dict[str, Any]:
    """Set ``count`` new keys, timing each set."""
    region, _ = setup.open()
    value = setup.value()
    latencies = array("q", bytes(8 * count))
    log = OpLog()
    clock, stamp = time.perf_counter_ns, time.monotonic_ns
    before = read_status_kib("VmRSS")
    ready()
    for index in range(count):
        key = first + index
        log.add(stamp(), SET, key)
        start = clock()
        region.set(key_name(key), value)
        latencies[index] = clock() - start
    stats = getattr(region.backend, "stats", None)
    close_region(region)
    return {
        "latencies_ns": latencies,
        "log": log,
        "evictions": stats()["evictions"] if stats else None,
        **_rss(before),
    }


def _read(ready: Ready, setup: Setup, hot: array[int], rate: float, stop: Any) -> dict[str, Any]:
    """Read every hot key once, then keep reading them at ``rate`` per second until ``stop``."""
    region, _ = setup.open()
    log = OpLog()
    latencies = array("q")
    clock, stamp = time.perf_counter_ns, time.monotonic_ns
    hits = misses = 0

    def read(key: int) -> int:
        nonlocal hits, misses
        stamped = stamp()
        start = clock()
        found = region.get(key_name(key))
        elapsed = clock() - start
        log.add(stamped, GET_HIT if found else GET_MISS, key)
        if found:
            hits += 1
        else:
            misses += 1
        return elapsed

    for key in hot:  # "recently read": before the writers start, every hot key is read
        read(key)
    before = read_status_kib("VmRSS")
    ready()
    begin, done = time.monotonic(), 0
    while not stop.is_set():
        for key in hot:
            latencies.append(read(key))
            done += 1
            if done % 20 == 0:  # pacing, not synchronisation: a light, steady reader
                time.sleep(max(0.0, begin + done / rate - time.monotonic()))
            if stop.is_set():
                break
    close_region(region)
    return {
        "latencies_ns": latencies,
        "log": log,
        "hits": hits,
        "misses": misses,
        **_rss(before),
    }


def _monitor(ready: Ready, setup: Setup, interval: float, stop: Any) -> dict[str, Any]:
    """Sample the backend's own size figure until ``stop``."""
    region, handle = setup.open()
    stamps, sizes = array("q"), array("q")
    before = read_status_kib("VmRSS")
    ready()
    while True:
        stamps.append(time.monotonic_ns())
        sizes.append(handle.size())
        if stop.wait(interval):
            break
    stamps.append(time.monotonic_ns())
    sizes.append(handle.size())
    close_region(region)
    return {"stamps_ns": stamps, "sizes": sizes, **_rss(before)}


def _maintain(ready: Ready, setup: Setup, name: str, started: Any) -> dict[str, Any]:
    region, handle = setup.open()
    call = handle.maintenance(name)
    before = read_status_kib("VmRSS")
    ready()
    started.set()  # the writer begins now: the operation is under way before it writes
    start = time.monotonic_ns()
    outcome = call()
    end = time.monotonic_ns()
    close_region(region)
    return {"start_ns": start, "end_ns": end, "outcome": _outcome(outcome), **_rss(before)}


def _outcome(value: object) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list):  # diskcache's check(): its warnings
        return {"warnings": len(value)}
    return value


def _keep_writing(
    ready: Ready, setup: Setup, first: int, started: Any, stop: Any
) -> dict[str, Any]:
    """Set new keys from ``started`` until ``stop``: (start, latency) of every set."""
    region, _ = setup.open()
    value = setup.value()
    starts, latencies = array("q"), array("q")
    clock = time.monotonic_ns
    ready()
    if not started.wait(WAIT_S):
        raise TimeoutError("the maintenance operation never started")
    key = first
    deadline = time.monotonic() + PHASE_S
    while not stop.is_set() and time.monotonic() < deadline:
        start = clock()
        region.set(key_name(key), value)
        starts.append(start)
        latencies.append(clock() - start)
        key += 1
    close_region(region)
    return {"starts_ns": starts, "latencies_ns": latencies}


# -- one backend ---------------------------------------------------------------------


def _ranges(total: int, parts: int) -> list[tuple[int, int]]:
    cuts = [total * i // parts for i in range(parts + 1)]
    return list(itertools.pairwise(cuts))


def _hot_keys(ranges: Sequence[tuple[int, int]], params: Params) -> array[int]:
    """About ``scale_hot_fraction`` of the filled keys, evenly spread over the oldest
    ``scale_hot_span`` of each fill process's keys: the first that LRU would evict if
    nobody read them."""
    hot = array("i")
    for low, high in ranges:
        count = max(1, int((high - low) * params.scale_hot_fraction))
        step = max(1, int((high - low) * params.scale_hot_span) // count)
        hot.extend(range(low, low + step * count, step))
    return hot


def _measure(setup: Setup, measure: Callable[[Handle], Any]) -> Any:
    region, handle = setup.open()
    try:
        return measure(handle)
    finally:
        close_region(region)


def _latency_summary(latencies_ns: Sequence[int]) -> dict[str, Any]:
    ordered = sorted(latencies_ns)
    if not ordered:
        return {"ops": 0, "p50_us": None, "p99_us": None, "max_ms": None}
    return {
        "ops": len(ordered),
        "p50_us": percentile(ordered, 0.5) / 1e3,
        "p99_us": percentile(ordered, 0.99) / 1e3,
        "max_ms": ordered[-1] / 1e6,
        "mean_us": sum(ordered) / len(ordered) / 1e3,
    }


def _growth_mib(report: dict[str, Any]) -> float | None:
    """VmHWM minus the VmRSS before the phase, never below 0: the kernel syncs a process's
    RSS counters lazily, so an idle process can read a few hundred KiB below its start."""
    before, peak = report.get("rss_before_kib"), report.get("peak_rss_kib")
    return max(0, peak - before) / 1024 if before is not None and peak is not None else None


def _run_backend(peer: str, params: Params, directory: str) -> dict[str, Any]:
    entries, writers, writes = params.scale_entries, params.scale_writers, params.scale_writes
    size = params.scale_value_size
    ranges = _ranges(entries, params.scale_fill_processes)
    record: dict[str, Any] = {"backend": peer, "entries_filled": entries}

    # 1. fill, with a limit that never evicts; the later limit is what that filled
    filling = Setup(peer, directory, BIG_CACHE, size)
    with Phase(len(ranges)) as phase:
        for number, (low, high) in enumerate(ranges, 1):
            phase.start(f"fill {number}", _fill, filling, low, high, params.scale_fill_batch)
        began = time.perf_counter()
        phase.release()
        phase.collect([f"fill {n}" for n in range(1, len(ranges) + 1)])
        record["fill_s"] = time.perf_counter() - began
    fill_logs = [phase.reports[f"fill {n}"]["log"] for n in range(1, len(ranges) + 1)]
    limit = _measure(filling, lambda handle: handle.size())
    _progress(peer, f"filled {entries:,} entries in {record['fill_s']:.0f} s: {limit:,} bytes")
    record["limit"] = limit
    setup = dataclasses.replace(filling, limit=limit)

    # 2. steady eviction: writers, a hot reader, a monitor of the limit
    hot = _hot_keys(ranges, params)
    writer_roles = [f"writer {n}" for n in range(1, writers + 1)]
    with Phase(writers + 2) as phase:
        for number, role in enumerate(writer_roles):
            phase.start(role, _write, setup, entries + number * writes, writes)
        rate = params.scale_read_rate
        phase.start("hot reader", _read, setup, hot, rate, phase.stop)
        interval = params.scale_monitor_interval_s
        phase.start("monitor", _monitor, setup, interval, phase.stop)
        released = phase.release()
        phase.collect(writer_roles)
        record["steady_s"] = (time.monotonic_ns() - released) / 1e9
        phase.stop.set()
        phase.collect(["hot reader", "monitor"])
    steady = phase.reports
    _progress(peer, f"{writers} x {writes:,} steady writes in {record['steady_s']:.0f} s")
    record["processes"] = {
        role: {
            **_latency_summary(steady[role].get("latencies_ns", ())),
            "rss_growth_mib": _growth_mib(steady[role]),
            "peak_rss_mib": (steady[role]["peak_rss_kib"] or 0) / 1024,
            **{k: steady[role][k] for k in ("evictions", "hits", "misses") if k in steady[role]},
        }
        for role in [*writer_roles, "hot reader", "monitor"]
    }
    monitor = steady["monitor"]
    record["limit_monitor"] = _limit_series(monitor, released, limit)

    # 3. at rest: the walk, what is left, and the oracle
    key_count = entries + writers * writes
    logs = [*fill_logs, *(steady[role]["log"] for role in [*writer_roles, "hot reader"])]
    record.update(_judge(setup, directory, logs, hot, key_count))
    _progress(peer, f"judged in {record['judge_s']:.0f} s: precision {record['lru_precision']}")
    del logs, fill_logs, steady

    # 4. maintenance at the full size, with a writer setting new keys meanwhile
    if params.scale_maintenance:
        first = key_count
        record["maintenance"] = []
        for name in setup.handle_type.maintenance_ops:
            at_limit = dataclasses.replace(setup, limit=_measure(setup, lambda h: h.size()))
            record["maintenance"].append(_maintenance_round(at_limit, name, first))
            _progress(peer, f"{name} took {record['maintenance'][-1]['seconds']:.1f} s")
            first += 10_000_000
    return record


def _progress(peer: str, message: str) -> None:
    print(f"   scale, {peer}: {message}", flush=True)


def _limit_series(monitor: dict[str, Any], released: int, limit: int) -> dict[str, Any]:
    sizes, stamps = monitor["sizes"], monitor["stamps_ns"]
    top = max(sizes)
    step = max(1, len(sizes) // _SERIES_POINTS)
    return {
        "samples": len(sizes),
        "max_bytes": top,
        "max_over_limit": top / limit,
        "max_overshoot_bytes": max(0, top - limit),
        "series": [
            [round((stamps[i] - released) / 1e9, 3), round(sizes[i] / limit, 5)]
            for i in range(0, len(sizes), step)
        ],
    }


def _judge(
    setup: Setup, directory: str, logs: Sequence[OpLog], hot: array[int], key_count: int
) -> dict[str, Any]:
    """The cache at rest: its size by a walk, which keys it kept, and LRU precision."""
    began = time.perf_counter()
    region, handle = setup.open()
    try:
        own_size = handle.size()
        counted = handle.counted_bytes(directory)
        present = bytearray(key_count)
        for key in range(key_count):
            present[key] = handle.present(key_name(key))
    finally:
        close_region(region)
    held = sum(present)
    set_keys = ever_set(logs, key_count)
    oracle = lru_survivors(logs, held, key_count)
    judged = precision(set_keys, present, oracle)
    return {
        "end_size_bytes": own_size,
        "end_walk_counted_bytes": counted,
        "end_walk_all_bytes": all_bytes(directory),
        "entries_at_end": held,
        "evicted": judged.evicted,
        "oracle_evicted": judged.oracle_evicted,
        "lru_precision": judged.value,
        "hot_keys": len(hot),
        "hot_kept": sum(present[key] for key in hot) / len(hot),
        "logged_calls": sum(len(log) for log in logs),
        "judge_s": time.perf_counter() - began,
        "parent_peak_rss_mib": (read_status_kib("VmHWM") or 0) / 1024,
    }


def _maintenance_round(setup: Setup, name: str, first: int) -> dict[str, Any]:
    with Phase(2) as phase:
        started = phase.event()
        phase.start(name, _maintain, setup, name, started)
        phase.start("writer", _keep_writing, setup, first, started, phase.stop)
        phase.release()
        phase.collect([name])
        phase.stop.set()
        phase.collect(["writer"])
    done, writer = phase.reports[name], phase.reports["writer"]
    start, end = done["start_ns"], done["end_ns"]
    during = [
        (latency, min(end, began + latency) - max(start, began))
        for began, latency in zip(writer["starts_ns"], writer["latencies_ns"], strict=True)
        if began < end and began + latency > start
    ]
    return {
        "operation": name,
        "limit": setup.limit,
        "seconds": (end - start) / 1e9,
        "outcome": done["outcome"],
        "rss_growth_mib": _growth_mib(done),
        "writes_during": len(during),
        "writer_max_ms": max(latency for latency, _ in during) / 1e6 if during else None,
        "writer_max_within_ms": max(inside for _, inside in during) / 1e6 if during else None,
        "writes_over_100ms": sum(latency > BLOCKED_MS * 1e6 for latency, _ in during),
        "writer_total_sets": len(writer["latencies_ns"]),
    }


# -- the workload ----------------------------------------------------------------------


def resized(params: Params, entries: int) -> Params:
    """``params`` with ``entries`` filled, and the steady writes in the same proportion."""
    writes = max(1, params.scale_writes * entries // params.scale_entries)
    return dataclasses.replace(params, scale_entries=entries, scale_writes=writes)


def scale(params: Params, workdir: str) -> WorkloadResult:
    records = []
    for peer in params.scale_peers:
        directory = os.path.join(workdir, f"scale-{slug(peer)}")
        os.makedirs(directory)
        try:
            records.append(_run_backend(peer, params, directory))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    latency, limit, maintenance = tables(params, records)
    return WorkloadResult("scale", latency, records, more_tables=[limit, maintenance])
