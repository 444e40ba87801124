"""Workload 6: a million small entries at the size limit, evicted by several writers at once.

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
import multiprocessing
import os
import queue
import shutil
import time
import traceback
from array import array
from collections.abc import Callable, Sequence
from typing import Any

from common import (
    OURS,
    MiB,
    Params,
    Table,
    WorkloadResult,
    fmt_num,
    fmt_ratio,
    percentile,
    read_status_kib,
    slug,
)
from dogpile.cache.region import CacheRegion
from oracle import GET_HIT, GET_MISS, SET, OpLog, ever_set, lru_survivors, precision
from peers import BIG_CACHE, BY_NAME, close_region

from dogpile_fsbackend import layout

_WAIT_S = 600.0  # barriers: every process is importing and opening caches
_PHASE_S = 4 * 3600.0  # a phase's results: a 1M fill or a blocked eviction takes long
_BLOCKED_MS = 100.0  # issue 11: maintenance never blocks a write longer than this
_MAINTENANCE = (("prune", "cull"), ("verify", "check"), ("clear", "clear"))  # ours, diskcache
_SERIES_POINTS = 2_000  # monitor samples kept in the JSON


def key_name(key: int) -> str:
    return f"scale:{key}"


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a child needs to open the cache of one backend."""

    peer: str
    directory: str
    limit: int
    value_size: int

    @property
    def handle_type(self) -> type[_Handle]:
        return _OursHandle if self.peer == OURS else _DiskcacheHandle

    def open(self) -> tuple[CacheRegion, _Handle]:
        region = BY_NAME[self.peer].region(self.directory, self.limit)
        return region, self.handle_type(region)

    def value(self) -> bytes:
        return bytes(range(256))[: self.value_size].ljust(self.value_size, b"v")


class _Handle:
    """What the workload needs from a backend besides its region."""

    maintenance_ops: tuple[str, ...]

    def __init__(self, region: CacheRegion) -> None:
        self.region = region

    def size(self) -> int:
        """The backend's own figure for what counts against its limit."""
        raise NotImplementedError

    def present(self, key: str) -> bool:
        """Whether the key is stored, without making it recently used."""
        raise NotImplementedError

    def maintenance(self, name: str) -> Callable[[], object]:
        raise NotImplementedError

    def counted_bytes(self, directory: str) -> int:
        """Apparent size of the files the limit counts, by a walk of the directory."""
        raise NotImplementedError


class _OursHandle(_Handle):
    maintenance_ops = tuple(ours for ours, _ in _MAINTENANCE)

    def size(self) -> int:
        return int(self.region.backend.stats()["bytes"])

    def present(self, key: str) -> bool:
        # The entry's path comes from the store's internal layout, which may change:
        # this class is the one place that knows it.  lstat reads no data, stamps nothing.
        digest = layout.key_digest(layout.encode_key(key))
        try:
            os.lstat(self.region.backend.store.layout.entry_path(digest))
        except FileNotFoundError:
            return False
        return True

    def maintenance(self, name: str) -> Callable[[], object]:
        return getattr(self.region.backend, name)

    def counted_bytes(self, directory: str) -> int:
        """Every entry file under data/ (temp files of writes in flight are not counted)."""
        return _walk(os.path.join(directory, layout.DATA_DIR), skip=layout.is_temp_name)


class _DiskcacheHandle(_Handle):
    maintenance_ops = tuple(peer for _, peer in _MAINTENANCE)

    def size(self) -> int:
        return int(self.region.backend.cache.volume())

    def present(self, key: str) -> bool:
        return key in self.region.backend.cache  # a SELECT: no access time is written

    def maintenance(self, name: str) -> Callable[[], object]:
        return getattr(self.region.backend.cache, name)

    def counted_bytes(self, directory: str) -> int:
        """What volume() counts: the database file and value files (not the WAL or shm)."""
        return _walk(directory, skip=lambda name: name.endswith(("-wal", "-shm")))


def _walk(directory: str, skip: Callable[[str], bool]) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            if not skip(name):
                try:
                    total += os.lstat(os.path.join(root, name)).st_size
                except FileNotFoundError:
                    continue
    return total


def _all_bytes(directory: str) -> int:
    return _walk(directory, skip=lambda name: False)


# -- child processes ---------------------------------------------------------------


Ready = Callable[[], None]


def _child(
    role: str, results: Any, barrier: Any, target: Callable[..., dict[str, Any]], *args: Any
) -> None:
    """Run one role and put its report (or its traceback) on the results queue.

    The role calls ``ready()`` once it is set up: that says so on the queue (so
    the parent learns of a failed set-up at once) and waits at the barrier.
    """

    def ready() -> None:
        results.put({"role": role, "ready": True})
        barrier.wait(_WAIT_S)

    try:
        report = target(ready, *args)
    except BaseException:
        report = {"error": traceback.format_exc()}
    report["role"] = role
    results.put(report)


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
    if not started.wait(_WAIT_S):
        raise TimeoutError("the maintenance operation never started")
    key = first
    deadline = time.monotonic() + _PHASE_S
    while not stop.is_set() and time.monotonic() < deadline:
        start = clock()
        region.set(key_name(key), value)
        starts.append(start)
        latencies.append(clock() - start)
        key += 1
    close_region(region)
    return {"starts_ns": starts, "latencies_ns": latencies}


# -- phases --------------------------------------------------------------------------


class _Phase:
    """Processes started together, released by one barrier (the parent is a party too),
    reporting on one queue.  Leaving the block with an error stops every process."""

    def __init__(self, parties: int) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self.barrier = self._ctx.Barrier(parties + 1)
        self.stop = self._ctx.Event()
        self._results = self._ctx.Queue()
        self._processes: dict[str, Any] = {}
        self._ready: dict[str, Any] = {}
        self.reports: dict[str, dict[str, Any]] = {}

    def start(self, role: str, target: Callable[..., dict[str, Any]], *args: Any) -> None:
        process = self._ctx.Process(
            target=_child,
            args=(role, self._results, self.barrier, target, *args),
            name=role,
            daemon=True,
        )
        process.start()
        self._processes[role] = process

    def event(self) -> Any:
        """One more event for the processes of this phase (pass it when starting them)."""
        return self._ctx.Event()

    def release(self) -> int:
        """Wait until every process is ready and let them all go; the release time (ns)."""
        self._wait_for(self._ready, list(self._processes), _WAIT_S)
        self.barrier.wait(_WAIT_S)
        return time.monotonic_ns()

    def collect(self, roles: Sequence[str], timeout: float = _PHASE_S) -> None:
        """Wait for the reports of ``roles``; an error or a silent death raises."""
        self._wait_for(self.reports, roles, timeout)

    def _wait_for(self, got: dict[str, Any], roles: Sequence[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(role not in got for role in roles):
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing from {sorted(set(roles) - set(got))}")
            try:
                message = self._results.get(timeout=1.0)
            except queue.Empty:  # check that nobody died without a word
                dead = [
                    role
                    for role, process in self._processes.items()
                    if role not in self.reports and process.exitcode is not None
                ]
                if dead:
                    raise RuntimeError(f"{dead} exited without a report") from None
                continue
            if "error" in message:
                raise RuntimeError(f"{message['role']} failed:\n{message['error']}")
            (self._ready if message.get("ready") else self.reports)[message["role"]] = message

    def __enter__(self) -> _Phase:
        return self

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        self.stop.set()
        if error is not None:
            self.barrier.abort()
        for process in self._processes.values():
            process.join(timeout=60 if error is None else 5)
            if process.is_alive():  # only after an error or a hang: our own child, by handle
                process.terminate()
                process.join(timeout=10)


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


def _measure(setup: Setup, measure: Callable[[_Handle], Any]) -> Any:
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
    with _Phase(len(ranges)) as phase:
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
    with _Phase(writers + 2) as phase:
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
        "end_walk_all_bytes": _all_bytes(directory),
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
    with _Phase(2) as phase:
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
        "writes_over_100ms": sum(latency > _BLOCKED_MS * 1e6 for latency, _ in during),
        "writer_total_sets": len(writer["latencies_ns"]),
    }


# -- the workload ----------------------------------------------------------------------


def scale(params: Params, workdir: str) -> WorkloadResult:
    records = []
    for peer in params.scale_peers:
        directory = os.path.join(workdir, f"scale-{slug(peer)}")
        os.makedirs(directory)
        try:
            records.append(_run_backend(peer, params, directory))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    latency, limit, maintenance = _tables(params, records)
    return WorkloadResult("scale", latency, records, more_tables=[limit, maintenance])


def _entry_bytes(records: list[dict[str, Any]]) -> str:
    return "/".join(f"{r['limit'] / r['entries_filled']:.0f}" for r in records)


def _tables(params: Params, records: list[dict[str, Any]]) -> tuple[Table, Table, Table]:
    entries, writers = params.scale_entries, params.scale_writers
    title = (
        f"Workload 6: {entries:,} entries of {params.scale_value_size} B at the size limit, "
        f"{writers} writers evicting"
    )
    latency = Table(
        f"{title}: latency and memory per process",
        [
            "backend",
            "process",
            "ops",
            "p50 us",
            "p99 us",
            "max ms",
            "RSS growth MiB",
            "ours/peer (max)",
        ],
    )
    ours = next((r for r in records if r["backend"] == OURS), None)
    for record in records:
        for role, got in record["processes"].items():
            mine = ours["processes"][role]["max_ms"] if ours else None
            if role == "monitor":
                ops, versus = f"({record['limit_monitor']['samples']:,} samples)", ""
            else:
                r = mine / got["max_ms"] if mine and got["max_ms"] else None
                ops, versus = f"{got['ops']:,}", fmt_ratio(r, record is ours)
            latency.add(
                record["backend"],
                role,
                ops,
                fmt_num(got["p50_us"]),
                fmt_num(got["p99_us"]),
                fmt_num(got["max_ms"], 2),
                fmt_num(got["rss_growth_mib"]),
                versus,
            )
    hot = records[0]["hot_keys"] if records else 0
    latency.notes += [
        f"Each backend is first filled with {entries:,} new keys by "
        f"{params.scale_fill_processes} processes (region.set_multi, {params.scale_fill_batch} "
        "keys a call, a key range each) under a limit too large to evict; its limit is then "
        "exactly what those entries take by its own measure (our stats()['bytes'], diskcache's "
        "volume()), so every later write must evict.",
        f"Steady phase: {writers} writer processes each set {params.scale_writes:,} new keys, "
        "every set timed (perf_counter_ns); released together by a barrier with the reader and "
        "the monitor. Processes are spawned; this machine has "
        f"{os.cpu_count()} cores for {writers + 2} processes.",
        f"hot reader: {hot:,} hot keys ({params.scale_hot_fraction:.0%} of the filled keys, "
        f"evenly over the oldest {params.scale_hot_span:.0%} of each fill process's keys, the "
        "first LRU would evict if nobody read them), each read once before the writers start, "
        f"then read in turn at about {params.scale_read_rate:,.0f} reads/s (paced with sleep) "
        "until the writers are done; its latencies are those of the paced reads.",
        "RSS growth: VmHWM at the end of the process minus VmRSS just before its phase's "
        "barrier (/proc/self/status), so the interpreter and imports are not counted.",
        "ours/peer (max): our maximum set (or read) latency over the peer's, same process role.",
    ]
    limit = Table(
        f"{title}: the limit and LRU quality",
        [
            "backend",
            "limit MiB",
            "fill s",
            "steady s",
            "max size/limit (monitor)",
            "max overshoot B",
            "walk/limit (counted)",
            "walk/limit (all files)",
            "entries at end",
            "LRU precision",
            "hot keys kept",
        ],
    )
    for record in records:
        cap = record["limit"]
        limit.add(
            record["backend"],
            fmt_num(cap / MiB),
            fmt_num(record["fill_s"]),
            fmt_num(record["steady_s"]),
            f"{record['limit_monitor']['max_over_limit']:.4f}",
            f"{record['limit_monitor']['max_overshoot_bytes']:,}",
            f"{record['end_walk_counted_bytes'] / cap:.4f}",
            f"{record['end_walk_all_bytes'] / cap:.4f}",
            f"{record['entries_at_end']:,}",
            f"{record['lru_precision']:.4f}" if record["lru_precision"] is not None else "n/a",
            f"{record['hot_kept']:.1%}",
        )
    limit.notes += [
        f"max size/limit: the largest of the backend's own size figure (ours: stats()['bytes'], "
        f"the shared counters; diskcache: volume()) sampled every "
        f"{params.scale_monitor_interval_s * 1e3:g} ms by a monitor process during the steady "
        "phase, over the limit; max overshoot: the largest sample minus the limit, in bytes "
        f"(an entry is about {_entry_bytes(records)} B here). Issue 11 allows 1% or one "
        "largest entry per concurrent writer, whichever is larger.",
        "walk/limit: an independent walk at the end, apparent sizes (lstat): counted = what the "
        "limit counts (ours: the entry files under data/, not temp files; diskcache: the "
        "database and value files, not the WAL or shm); all files = everything in the directory "
        "(bookkeeping, SQLite WAL).",
        "LRU precision: every writer and the reader log each call as (monotonic ns just before "
        "it, op, key id); the logs are merged by time and replayed into an entry-count LRU "
        "(OrderedDict) whose capacity is the number of entries the backend holds at the end; "
        "a set or a get that hit is a use (the oracle re-inserts a key it had dropped while "
        "the backend, filled to its limit, still served it), so the oracle keeps exactly the "
        "most recently used keys. "
        "Evicted = ever set and absent at the end (ours: lstat of the entry path; diskcache: "
        "`key in cache`; neither changes recency). Precision = |evicted by the backend and by "
        "the oracle| / |evicted by the backend|. Fill keys are stamped per set_multi call, and "
        "our order is only as fine as the kernel's timestamp tick, so ties at the boundary "
        "cost a little precision.",
        "hot keys kept: share of the hot keys present at the end. diskcache's default policy "
        "is least-recently-stored: reads do not protect an entry; diskcache (LRU) writes the "
        "access time on every read.",
    ]
    maintenance = Table(
        f"{title}: maintenance at the full size while a writer sets new keys",
        [
            "backend",
            "operation",
            "seconds",
            "RSS growth MiB",
            "sets meanwhile",
            "writer max ms",
            "of it during the op ms",
            f"sets > {_BLOCKED_MS:g} ms",
        ],
    )
    for record in records:
        for done in record.get("maintenance", []):
            maintenance.add(
                record["backend"],
                done["operation"],
                fmt_num(done["seconds"], 2),
                fmt_num(done["rss_growth_mib"]),
                f"{done['writes_during']:,}",
                fmt_num(done["writer_max_ms"], 2),
                fmt_num(done["writer_max_within_ms"], 2),
                done["writes_over_100ms"],
            )
    maintenance.notes += [
        "After the steady phase, one round per operation (ours: prune, verify, clear; "
        "diskcache: cull, check, clear), each in a fresh process, with a limit equal to what "
        "the cache holds at the start of the round (so the writer's sets must evict), while "
        "a second fresh process sets new keys from the moment the operation starts (an event "
        "set just before the call) until it is done; which of them takes the eviction lock "
        "first is a race.",
        "sets meanwhile / writer max: the writer's sets whose duration overlaps the operation, "
        "and the longest of them; 'of it during the op': the longest part of one set that fell "
        "inside the operation (a set blocked by the operation may go on to evict for itself "
        f"once it gets the lock). Issue 11: no write blocked for more than {_BLOCKED_MS:g} ms "
        "at a time.",
    ]
    if not params.scale_maintenance:
        maintenance.notes.append("Maintenance rounds were not run (scale_maintenance=False).")
    return latency, limit, maintenance
