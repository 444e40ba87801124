"""Workloads 1, 2, 3 and 5: small values, growth, dogpile across processes, eviction.

Workload 4 (big raw files, one child process per case) is in bigfiles.py.
Peers run interleaved: every round visits the backends in a rotated order and
each backend's samples are pooled, so a noisy moment hurts everyone alike.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from common import (
    OURS,
    Params,
    Table,
    WorkloadResult,
    chunks,
    dir_bytes,
    fmt_num,
    fmt_ratio,
    median,
    percentile,
    ratio,
    rotated,
    size_label,
    slug,
    time_each,
)
from counts import MISSING_STRACE, Case, count_syscalls
from dogpile.cache.api import NO_VALUE
from opcases import FLOOR, HIT, MISS, RECORD_OVERHEAD, SET_NEW, Floor
from peers import (
    BY_NAME,
    DBM,
    DISKCACHE,
    DISKCACHE_LRU,
    DOGPILE_FILESYSTEM,
    MEMORY,
    OURS_PEER,
    Peer,
    bulk_set,
    close_region,
    dbm_flavour,
)

# -- 1. small values ------------------------------------------------------------


def small_values(params: Params, workdir: str) -> WorkloadResult:
    peers = [OURS_PEER, DOGPILE_FILESYSTEM, DISKCACHE, DISKCACHE_LRU, DBM, MEMORY]
    ops = ("set", "get (hit)", "get (miss)")
    samples: dict[tuple[int, str, str], list[float]] = defaultdict(list)
    batch = params.small_batch
    for size in params.small_sizes:
        value = os.urandom(size)
        regions = {
            p.name: p.region(os.path.join(workdir, f"small-{size}-{slug(p.name)}")) for p in peers
        }
        record = os.urandom(size + RECORD_OVERHEAD)  # about what a backend writes for it
        floor = Floor(os.path.join(workdir, f"small-{size}-floor"), len(record))
        runners: list[tuple[str, Callable[[str, Any], object], Callable[[str], object], bytes]]
        runners = [(p.name, regions[p.name].set, regions[p.name].get, value) for p in peers]
        runners.append((FLOOR, floor.set, floor.get, record))
        for round_no in range(params.small_rounds):
            keys = [f"small:{size}:{round_no}:{i}" for i in range(batch)]
            missing = [f"missing:{size}:{round_no}:{i}" for i in range(batch)]
            for op in ops:
                # Chunks of 20 ops rotate over the backends: slow phases of the
                # disk hit every backend alike.
                for chunk_no, chunk in enumerate(chunks(range(batch), 20)):
                    for name, setter, getter, data in rotated(runners, round_no + chunk_no):
                        operation = _small_op(op, setter, getter, keys, missing, data)
                        samples[size, op, name].extend(time_each(operation, chunk))
            for peer in peers:
                region = regions[peer.name]
                if region.get(keys[0]) != value or region.get(missing[0]) is not NO_VALUE:
                    raise AssertionError(f"{peer.name} returned a wrong value")
        for region in regions.values():
            close_region(region)
    names = [*(p.name for p in peers), FLOOR]
    counted = [
        Case(name, _COUNTED_OP[op], size)
        for size in params.small_syscall_sizes
        for op in ops
        for name in names
    ]
    syscalls = count_syscalls(counted, params.small_syscalls_n, workdir)

    records: list[dict[str, Any]] = []
    table = Table(
        "Workload 1: region set / get of small values, one process",
        ["case", "backend", "median us/op", "p90 us/op", "ops/s", "ours/peer", "syscalls/op"],
    )
    for size in params.small_sizes:
        for op in ops:
            ours = median(samples[size, op, OURS])
            for name in names:
                values = samples[size, op, name]
                mid = median(values)
                r = ratio(ours, mid)
                by_name = syscalls.get(Case(name, _COUNTED_OP[op], size))
                total = sum(by_name.values()) if by_name is not None else None
                records.append(
                    {
                        "value_bytes": size,
                        "op": op,
                        "backend": name,
                        "median_us": mid * 1e6,
                        "p90_us": percentile(values, 0.9) * 1e6,
                        "samples": len(values),
                        "ours_over_peer": r,
                        "syscalls_per_op": total,
                        "syscalls_by_name": by_name,
                    }
                )
                table.add(
                    f"{op} {size_label(size)}",
                    name,
                    fmt_num(mid * 1e6),
                    fmt_num(percentile(values, 0.9) * 1e6),
                    fmt_num(1 / mid, 0),
                    fmt_ratio(r, name == OURS),
                    fmt_num(total, 2),
                )
    entries = params.small_rounds * batch
    table.notes += [
        f"{params.small_rounds} rounds x {batch} ops per backend, op and size, in chunks of 20 "
        "that rotate over the backends; "
        f"each set writes a new key, so a cache ends with {entries:,} entries.",
        "ours/peer is our median time / the peer's median time: below 1 we are faster.",
        f"dogpile.cache.dbm uses {dbm_flavour()} here (this Python has no gdbm/ndbm); "
        "it opens the dbm file on every call.",
        "dogpile.cache.memory is a per-process dict: the ceiling set by dogpile's region "
        "overhead.",
        f"'{FLOOR}': the disk's own cost of one small file without any cache logic "
        "(create+write+close+rename; open + one read of the known size + close; a failed "
        "open), for scale.",
        "diskcache (LRU) is diskcache with eviction_policy='least-recently-used', the policy "
        "that matches ours; plain diskcache uses its default (least-recently-stored).",
    ]
    table.notes.append(_syscall_note(params, syscalls))
    return WorkloadResult("small", table, records)


_COUNTED_OP = {"set": SET_NEW, "get (hit)": HIT, "get (miss)": MISS}


def _syscall_note(params: Params, syscalls: dict[Case, dict[str, float]]) -> str:
    if not syscalls:
        return f"syscalls/op: n/a, {MISSING_STRACE}."
    sizes = ", ".join(size_label(size) for size in params.small_syscall_sizes)
    return (
        f"syscalls/op ({sizes}): strace -f of a loop of {params.small_syscalls_n} ops in a "
        "child process (only the calls between two marker calls around it) minus an "
        "empty-loop baseline, divided by N (workload 11 has them by name, "
        "with instruction counts). dogpile_filesystem lists and stats its directory on every "
        "set and dogpile.cache.dbm reads its index on every call, so their counts grow with "
        "the entries (here about 2N)."
    )


def _small_op(
    op: str,
    setter: Callable[[str, Any], object],
    getter: Callable[[str], object],
    keys: Sequence[str],
    missing: Sequence[str],
    value: bytes,
) -> Callable[[int], object]:
    if op == "set":
        return lambda i: setter(keys[i], value)
    if op == "get (hit)":
        return lambda i: getter(keys[i])
    return lambda i: getter(missing[i])


# -- 2. set cost as the cache grows -----------------------------------------------


def growth(params: Params, workdir: str) -> WorkloadResult:
    peers = [OURS_PEER, DOGPILE_FILESYSTEM, DISKCACHE, DBM, MEMORY]
    regions = {p.name: p.region(os.path.join(workdir, f"growth-{slug(p.name)}")) for p in peers}
    value = os.urandom(params.growth_value_size)
    filled = dict.fromkeys(regions, 0)
    records: list[dict[str, Any]] = []
    fill_rate: dict[str, list[float]] = defaultdict(list)
    per_level: dict[tuple[int, str], list[float]] = {}
    for level in params.growth_levels:
        active = []
        for peer in peers:
            cap = params.growth_cap(peer.name)
            if cap is not None and level > cap:
                continue
            need = level - filled[peer.name]
            start = time.perf_counter()
            for first in range(filled[peer.name], level, 1000):
                batch = {f"fill:{i}": value for i in range(first, min(first + 1000, level))}
                bulk_set(peer, regions[peer.name], batch)
            if need > 0:
                fill_rate[peer.name].append(need / (time.perf_counter() - start))
            filled[peer.name] = max(filled[peer.name], level)
            active.append(peer)
        # Interleave chunks of sets of new keys until each backend has its samples.
        taken: dict[str, list[float]] = {p.name: [] for p in active}
        spent = dict.fromkeys(taken, 0.0)
        chunk, round_no = 20, 0
        while active:
            for peer in rotated(active, round_no):
                region, got = regions[peer.name], taken[peer.name]
                first = len(got)
                keys = [f"probe:{level}:{first + i}" for i in range(chunk)]
                new = time_each(lambda i, r=region, k=keys: r.set(k[i], value), range(chunk))
                got.extend(new)
                spent[peer.name] += sum(new)
                if len(got) >= params.growth_samples or spent[peer.name] >= params.growth_budget_s:
                    active.remove(peer)
            round_no += 1
        for name, got in taken.items():
            filled[name] += len(got)
            per_level[level, name] = got

    table = Table(
        "Workload 2: cost of a set (new key, 100 B value) with N entries present",
        ["entries", "backend", "median us/set", "p90 us/set", "samples", "ours/peer"],
    )
    for level in params.growth_levels:
        ours = median(per_level.get((level, OURS), []))
        for peer in peers:
            got = per_level.get((level, peer.name))
            if got is None:
                table.add(f"{level:,}", peer.name, "capped", "", "", "")
                records.append({"entries": level, "backend": peer.name, "capped": True})
                continue
            mid = median(got)
            r = ratio(ours, mid)
            records.append(
                {
                    "entries": level,
                    "backend": peer.name,
                    "median_us": mid * 1e6,
                    "p90_us": percentile(got, 0.9) * 1e6,
                    "samples": len(got),
                    "ours_over_peer": r,
                    "fill_entries_per_s": median(fill_rate[peer.name])
                    if fill_rate[peer.name]
                    else None,
                }
            )
            table.add(
                f"{level:,}",
                peer.name,
                fmt_num(mid * 1e6),
                fmt_num(percentile(got, 0.9) * 1e6),
                len(got),
                fmt_ratio(r, peer.is_ours),
            )
    low, high = params.growth_levels[0], params.growth_levels[-1]
    ours_low = median(per_level[low, OURS])
    ours_high = median(per_level[high, OURS])
    table.notes += [
        f"dogpile_fsbackend: a set with {high:,} entries costs {ours_high / ours_low:.2f}x "
        f"a set with {low:,} entries (median over up to {params.growth_samples} sets).",
        *(
            f"{name} capped at {cap:,} entries: "
            + (
                "it lists and stats its whole directory on every set (O(n) per set)."
                if name == DOGPILE_FILESYSTEM.name
                else "dbm.dumb reads and rewrites its whole index on every open/close (O(n))."
            )
            for name, cap in params.growth_caps
        ),
        "Pre-population goes through region.set_multi in batches of 1,000 (dogpile_filesystem "
        "with its per-set directory scan switched off while filling); fewer samples than "
        f"{params.growth_samples} mean the backend used up its "
        f"{params.growth_budget_s:g} s budget.",
        "Interleaved: chunks of 20 sets rotate over the backends at each level.",
    ]
    for region in regions.values():
        close_region(region)
    return WorkloadResult("growth", table, records)


# -- 3. get_or_create across processes ---------------------------------------------


def _dogpile_worker(
    peer_name: str,
    directory: str,
    keys: int,
    passes: int,
    creator_ms: float,
    barrier: Any,
    counter: Any,
    results: Any,
) -> None:
    """One process: ``passes`` sweeps of get_or_create over the shared keys."""
    try:
        tempfile.tempdir = os.path.dirname(directory)  # see run.py
        region = BY_NAME[peer_name].region(directory)
        payload = bytes(range(100))  # the same in every process: any creator's value is right

        def creator() -> bytes:
            with counter.get_lock():
                counter.value += 1
            time.sleep(creator_ms / 1000)
            return payload

        names = [f"shared:{i}" for i in range(keys)]
        barrier.wait()
        start = time.perf_counter()
        first_pass_end = start
        for pass_no in range(passes):
            for name in names:
                if region.get_or_create(name, creator) != payload:
                    raise AssertionError(f"{peer_name} returned a wrong value for {name}")
            if pass_no == 0:
                first_pass_end = time.perf_counter()
        end = time.perf_counter()
        close_region(region)
        results.put((start, first_pass_end, end, None))
    except BaseException as exc:  # report, do not hang the parent
        results.put((0.0, 0.0, 0.0, repr(exc)))
        raise


def _dogpile_run(
    peer: Peer, processes: int, params: Params, directory: str
) -> dict[str, float | int]:
    ctx = multiprocessing.get_context("spawn")
    # Create the cache (and do any one-time first-write work) before the processes race.
    region = peer.region(directory)
    region.set("warm-up", b"warm-up")
    close_region(region)
    barrier = ctx.Barrier(processes)
    counter = ctx.Value("i", 0)
    results = ctx.Queue()
    workers = [
        ctx.Process(
            target=_dogpile_worker,
            args=(
                peer.name,
                directory,
                params.dogpile_keys,
                params.dogpile_passes,
                params.dogpile_creator_ms,
                barrier,
                counter,
                results,
            ),
        )
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    errors = [error for *_, error in outcomes if error]
    if errors:
        raise RuntimeError(f"{peer.name} with {processes} processes failed: {errors[0]}")
    start = min(o[0] for o in outcomes)
    return {
        "wall_s": max(o[2] for o in outcomes) - start,
        "first_pass_s": max(o[1] for o in outcomes) - start,
        "creator_calls": counter.value,
    }


def dogpile_processes(params: Params, workdir: str) -> WorkloadResult:
    repeats = params.dogpile_repeats
    peers = [OURS_PEER, DOGPILE_FILESYSTEM, DISKCACHE, DBM, MEMORY]
    runs: dict[tuple[int, str], list[dict[str, float | int]]] = defaultdict(list)
    serial = 0
    for repeat in range(repeats):
        for processes in params.dogpile_processes:
            for peer in rotated(peers, repeat + processes):
                serial += 1
                directory = os.path.join(workdir, f"dogpile-{serial}-{slug(peer.name)}")
                runs[processes, peer.name].append(_dogpile_run(peer, processes, params, directory))

    keys, passes = params.dogpile_keys, params.dogpile_passes
    table = Table(
        f"Workload 3: get_or_create on {keys} shared keys x {passes} passes, "
        f"creator takes {params.dogpile_creator_ms:g} ms",
        [
            "processes",
            "backend",
            "wall ms",
            "1st pass ms",
            "calls/s (all)",
            "creator calls",
            "ours/peer",
        ],
    )
    records: list[dict[str, Any]] = []
    for processes in params.dogpile_processes:
        ours_wall = median([float(r["wall_s"]) for r in runs[processes, OURS]])
        for peer in peers:
            got = runs[processes, peer.name]
            wall = median([float(r["wall_s"]) for r in got])
            first = median([float(r["first_pass_s"]) for r in got])
            creators = sorted(int(r["creator_calls"]) for r in got)
            calls = processes * keys * passes
            r = ratio(ours_wall, wall)
            expected = keys if peer.shared else keys * processes
            records.append(
                {
                    "processes": processes,
                    "backend": peer.name,
                    "wall_ms": wall * 1e3,
                    "first_pass_ms": first * 1e3,
                    "calls_per_s": calls / wall,
                    "creator_calls": creators,
                    "creator_calls_expected": expected,
                    "runs": len(got),
                    "ours_over_peer": r,
                }
            )
            shown = "/".join(str(c) for c in sorted(set(creators)))
            table.add(
                processes,
                peer.name,
                fmt_num(wall * 1e3),
                fmt_num(first * 1e3),
                fmt_num(calls / wall, 0),
                f"{shown} (want {expected})",
                fmt_ratio(r, peer.is_ours),
            )
    table.notes += [
        f"Each process sweeps the same {keys} keys {passes} times in the same order, so all "
        "processes race for every key in the first pass: one runs the creator, the others "
        "wait on the dogpile lock and then read its value. Later passes are plain hits.",
        f"Median of {repeats} runs; wall time from the first process's start to the last one's "
        "end (processes are started with 'spawn' and released together by a barrier).",
        "diskcache gets a cross-process dogpile mutex in the adapter (diskcache.Lock's "
        "add-and-poll every 1 ms); without it every process would run the creator.",
        "dogpile.cache.dbm uses one lock file for all keys, so creators of different keys "
        "serialise too.",
        "dogpile.cache.memory is not shared: every process creates every key itself "
        f"(creator calls = {keys} x processes); a ceiling only.",
        f"This machine has {os.cpu_count()} cores: with more processes than cores, wall time "
        "includes waiting for a CPU.",
    ]
    return WorkloadResult("dogpile", table, records)


# -- 5. eviction --------------------------------------------------------------------


def eviction(params: Params, workdir: str) -> WorkloadResult:
    peers = [OURS_PEER, DOGPILE_FILESYSTEM, DISKCACHE, DISKCACHE_LRU]
    limit, size = params.evict_limit, params.evict_value_size
    value = os.urandom(size)
    directories = {p.name: os.path.join(workdir, f"evict-{slug(p.name)}") for p in peers}
    regions = {p.name: p.region(directories[p.name], limit) for p in peers}
    fill = int(1.5 * limit / size)
    for peer in peers:  # write half as much again as fits: every backend is evicting now
        region = regions[peer.name]
        for i in range(fill):
            region.set(f"fill:{i}", value)
    taken: dict[str, list[float]] = {p.name: [] for p in peers}
    active: list[Peer] = list(peers)
    chunk, round_no = 50, 0
    while active:
        for peer in rotated(active, round_no):
            region, got = regions[peer.name], taken[peer.name]
            first = len(got)
            keys = [f"steady:{first + i}" for i in range(chunk)]
            got.extend(time_each(lambda i, r=region, k=keys: r.set(k[i], value), range(chunk)))
            if len(got) >= params.evict_writes or sum(got) >= params.evict_budget_s:
                active.remove(peer)
        round_no += 1

    table = Table(
        f"Workload 5: steady-state sets of {size // 1024} KiB values into a full "
        f"{limit / 2**20:g} MiB cache",
        [
            "backend",
            "writes",
            "mean us/set",
            "median us",
            "p99 us",
            "max ms",
            "on disk / limit",
            "ours/peer (mean)",
        ],
    )
    records: list[dict[str, Any]] = []
    ours_mean = sum(taken[OURS]) / len(taken[OURS])
    for peer in peers:
        got = taken[peer.name]
        mean = sum(got) / len(got)
        on_disk = dir_bytes(directories[peer.name])
        r = ratio(ours_mean, mean)
        record: dict[str, Any] = {
            "backend": peer.name,
            "writes": len(got),
            "mean_us": mean * 1e6,
            "median_us": median(got) * 1e6,
            "p99_us": percentile(got, 0.99) * 1e6,
            "max_ms": max(got) * 1e3,
            "bytes_on_disk": on_disk,
            "limit": limit,
            "ours_over_peer": r,
        }
        if peer.is_ours:
            record["stats"] = regions[peer.name].backend.stats()
        records.append(record)
        table.add(
            peer.name,
            len(got),
            fmt_num(mean * 1e6),
            fmt_num(median(got) * 1e6),
            fmt_num(percentile(got, 0.99) * 1e6),
            fmt_num(max(got) * 1e3, 2),
            f"{on_disk / limit:.2f}",
            fmt_ratio(r, peer.is_ours),
        )
    stats = regions[OURS].backend.stats()
    table.notes += [
        f"Each cache was first filled with {fill} values (1.5x what fits), so every further "
        "write pushes it over its limit; the mean is the amortised cost per set.",
        f"dogpile_fsbackend evicts in batches down to its low-water mark (90%): most sets "
        f"evict nothing and one in many pays for a scan (see p99/max); it made "
        f"{stats['evictions']:,} evictions in {stats['writes']:,} sets.",
        "dogpile_filesystem lists its directory on every set; diskcache culls up to 10 "
        "entries per set when over its size_limit (its volume includes the SQLite file).",
        "'on disk / limit': apparent size of every file in the cache directory at the end.",
        "dogpile.cache.dbm and dogpile.cache.memory have no size limit: not applicable.",
    ]
    for region in regions.values():
        close_region(region)
    return WorkloadResult("eviction", table, records)
