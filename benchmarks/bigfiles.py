"""Workload 4: big files through the raw backends, one fresh child process per case.

Every case runs in a ``spawn``-ed child so that its peak RSS (``VmHWM``) is its
own: a value that were loaded into memory would show up there.  The source file
is generated once per size; "move" cases hard-link it to a new name first, so
each repetition renames a fresh name without rewriting the bytes.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import tempfile
import time
import traceback
from collections import defaultdict
from typing import IO, Any

import diskcache
from common import (
    OURS,
    MiB,
    Params,
    Table,
    WorkloadResult,
    fmt_num,
    fmt_ratio,
    generate_file,
    median,
    ratio,
    read_status_kib,
    rotated,
    size_label,
)
from dogpile.cache import make_region
from dogpile.cache.region import CacheRegion

DFS = "dogpile_filesystem"
DISKCACHE = "diskcache"
MOVE, COPY, READ = "set (move)", "set (copy)", "get + read"
CASES: list[tuple[str, str]] = [
    (MOVE, OURS),
    (MOVE, DFS),
    (COPY, OURS),
    (COPY, DFS),
    (COPY, DISKCACHE),
    (COPY, "shutil.copyfile"),
    (COPY, "cp"),
    (READ, OURS),
    (READ, DFS),
    (READ, DISKCACHE),
    (READ, "plain read"),
]
_READ_CHUNK = 1 << 20


def _raw_region(backend: str, cache_dir: str, size: int, movable: bool) -> CacheRegion:
    name = "dogpile_fsbackend.raw" if backend == OURS else "paylogic.raw_filesystem"
    arguments = {"base_dir": cache_dir, "cache_size": 4 * size + 64 * MiB, "file_movable": movable}
    return make_region().configure(name, arguments=arguments)


def _read_all(handle: IO[bytes]) -> int:
    buffer = bytearray(_READ_CHUNK)
    total = 0
    while count := handle.readinto(buffer):  # type: ignore[attr-defined]
        total += count
    return total


def _fresh_link(source: str, workdir: str) -> str:
    link = os.path.join(workdir, "source-link")
    os.link(source, link)
    return link


def _run_case(op: str, backend: str, source: str, size: int, workdir: str) -> dict[str, Any]:
    """The timed part of one case, in this (child) process."""
    tempfile.tempdir = workdir  # dogpile_filesystem stages copies in tempdir: same disk
    cache_dir = os.path.join(workdir, "cache")
    region: CacheRegion | None = None
    cache: diskcache.Cache | None = None
    if backend in (OURS, DFS):
        region = _raw_region(backend, cache_dir, size, movable=op != COPY)
    elif backend == DISKCACHE:
        cache = diskcache.Cache(cache_dir, size_limit=4 * size + 64 * MiB)
    # Untimed preparation.  A first write into a fresh cache does one-time work
    # (ours recounts its shards), so every backend gets a small warm-up entry;
    # the source is read once so that every case starts from a warm page cache.
    warm = os.path.join(workdir, "warm-up")
    with open(warm, "wb") as handle:
        handle.write(b"warm-up")
    with open(warm, "rb") as handle:
        if region is not None:
            region.set("warm-up", handle)
        elif cache is not None:
            cache.set("warm-up", handle, read=True)
    with open(source, "rb") as handle:
        _read_all(handle)
    if op == READ:  # store the entry first, and read it once
        if region is not None:
            with open(_fresh_link(source, workdir), "rb") as handle:
                region.set("big", handle)
            entry = region.get("big")
        elif cache is not None:
            with open(source, "rb") as handle:
                cache.set("big", handle, read=True)
            entry = cache.get("big", read=True)
        else:
            entry = open(source, "rb")  # noqa: SIM115
        with entry:
            _read_all(entry)
    baseline = read_status_kib("VmRSS")
    start = time.perf_counter()
    if op == MOVE:
        assert region is not None
        with open(_fresh_link(source, workdir), "rb") as handle:
            start = time.perf_counter()
            region.set("big", handle)
    elif op == COPY:
        target = os.path.join(workdir, "copy")
        if backend == "shutil.copyfile":
            shutil.copyfile(source, target)
        elif backend == "cp":
            subprocess.run(["cp", source, target], check=True)
        else:
            with open(source, "rb") as handle:
                start = time.perf_counter()
                if region is not None:
                    region.set("big", handle)
                elif cache is not None:
                    cache.set("big", handle, read=True)
    else:
        if region is not None:
            value = region.get("big")
        elif cache is not None:
            value = cache.get("big", read=True)
        else:
            value = open(source, "rb")  # noqa: SIM115 -- closed below, inside the timing
        try:
            got = _read_all(value)
        finally:
            value.close()
        if got != size:
            raise AssertionError(f"{backend} returned {got} bytes of {size}")
    seconds = time.perf_counter() - start
    if cache is not None:
        cache.close()
    return {
        "seconds": seconds,
        "baseline_rss_kib": baseline,
        "peak_rss_kib": read_status_kib("VmHWM"),
    }


def _child(op: str, backend: str, source: str, size: int, workdir: str, results: Any) -> None:
    try:
        results.put(_run_case(op, backend, source, size, workdir))
    except BaseException:
        results.put({"error": traceback.format_exc()})


def big_files(params: Params, workdir: str) -> WorkloadResult:
    ctx = multiprocessing.get_context("spawn")
    results: dict[tuple[int, str, str], list[dict[str, Any]]] = defaultdict(list)
    serial = 0
    for size in params.raw_sizes:
        source = os.path.join(workdir, f"source-{size}")
        generate_file(source, size)
        for repeat in range(params.raw_repeats):
            for op, backend in rotated(CASES, repeat * 4):
                serial += 1
                case_dir = os.path.join(workdir, f"raw-{serial}")
                os.makedirs(case_dir)
                os.sync()  # no writeback of an earlier case competes with this one
                queue = ctx.Queue()
                child = ctx.Process(
                    target=_child, args=(op, backend, source, size, case_dir, queue)
                )
                child.start()
                outcome = queue.get(timeout=900)
                child.join(timeout=60)
                shutil.rmtree(case_dir, ignore_errors=True)
                if "error" in outcome:
                    raise RuntimeError(f"{op} {backend} {size}: {outcome['error']}")
                results[size, op, backend].append(outcome)
        os.unlink(source)

    table = Table(
        "Workload 4: raw backend with big generated files (each case in a fresh child process)",
        [
            "case",
            "backend",
            "best ms",
            "median ms",
            "MiB/s (best)",
            "peak RSS MiB",
            "RSS growth MiB",
            "ours/peer (best)",
        ],
    )
    records: list[dict[str, Any]] = []
    for size in params.raw_sizes:
        label = size_label(size)
        for op in (MOVE, COPY, READ):
            ours = min(r["seconds"] for r in results[size, op, OURS])
            for case_op, backend in CASES:
                if case_op != op:
                    continue
                got = results[size, op, backend]
                best = min(r["seconds"] for r in got)
                mid = median([r["seconds"] for r in got])
                peak = max(r["peak_rss_kib"] or 0 for r in got) / 1024
                growth = max((r["peak_rss_kib"] or 0) - (r["baseline_rss_kib"] or 0) for r in got)
                r = ratio(ours, best)
                records.append(
                    {
                        "size_bytes": size,
                        "op": op,
                        "backend": backend,
                        "best_ms": best * 1e3,
                        "median_ms": mid * 1e3,
                        "mib_per_s": size / MiB / best,
                        "all_ms": [x["seconds"] * 1e3 for x in got],
                        "peak_rss_mib": peak,
                        "rss_growth_mib": growth / 1024,
                        "ours_over_peer": r,
                    }
                )
                table.add(
                    f"{op} {label}",
                    backend,
                    fmt_num(best * 1e3, 2),
                    fmt_num(mid * 1e3, 2),
                    fmt_num(size / MiB / best, 0),
                    fmt_num(peak),
                    fmt_num(growth / 1024),
                    fmt_ratio(r, backend == OURS),
                )
    table.notes += [
        f"{params.raw_repeats} runs per case, cases interleaved; os.sync() before each case. "
        "Big copies on this VM swing by up to 5x from run to run (writeback and page "
        "allocation outside our control), so throughput and ratios use the best run; every "
        "run's time is in the JSON.",
        "Source and cache share one filesystem. Untimed before each case: one small warm-up "
        "entry in the fresh cache (a first write may do one-time set-up work) and a full read "
        "of the source (and of the entry for get + read): every case starts from a warm page "
        "cache.",
        "set (move): file_movable=True and a named file on the cache's filesystem (a rename). "
        "set (copy): file_movable=False; cp and shutil.copyfile are the copy limit of this disk.",
        "dogpile_filesystem copies through Python (shutil.copyfileobj, 1 MiB) into a temp file "
        "and renames it; diskcache is used directly (Cache.set/get with read=True), as its "
        "dogpile adapter has no file mode.",
        "peak RSS: the child's VmHWM (Python + imports included); RSS growth: VmHWM minus VmRSS "
        "just before the timed part. Flat RSS means these do not grow with the file size.",
    ]
    return WorkloadResult("raw", table, records)
