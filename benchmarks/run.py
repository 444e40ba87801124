"""Side-by-side benchmarks of dogpile_fsbackend against its peers.

Usage::

    pip install -e . -r benchmarks/requirements.txt
    apt-get install -y strace valgrind  # Debian packages, for the counts (optional)
    python benchmarks/run.py            # full run, 20-30 min; writes benchmarks/results/
    python benchmarks/run.py --quick    # smoke check, 1-2 min
    python benchmarks/run.py --only growth,raw
    python benchmarks/run.py --only scale    # issue 11: 1M entries at the limit
    python benchmarks/run.py --only scale --scale-entries 200000   # the same, in minutes
    python benchmarks/run.py --only counts   # issue 12: syscalls and instructions per op

Each workload prints a table whose ``ours/peer`` column is our time divided by
the peer's time (below 1: dogpile_fsbackend is faster).  The same numbers go to
``latest.json`` (and ``latest.md``) in the output directory, with a chart of set
cost against entry count in ``set_cost.png``.  Nothing is asserted: the exit
status only says whether the benchmark itself ran.

Workload 10 (scale, scale.py) fills each backend with a million 100-byte
entries from several processes, sets its limit to exactly that size and runs
two evicting writers, a hot reader and a limit monitor at once: it needs about
6 GiB and 1.1 million inodes free under ``--tmp``.  Workload 11 (counts,
counts.py) and the syscalls/op column of workload 1 run each operation N times
in a child under ``strace -f`` and ``valgrind --tool=callgrind``; without
those tools (CI does not install them) the counts are skipped with a note.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import bigfiles
import counts
import listing
import rawtiered
import report
import scale
import shared_invalidation
import tiered
import workloads
from common import FULL, QUICK, Params, WorkloadResult
from peers import dbm_flavour

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
SCRATCH = os.path.join(RESULTS, "scratch")  # quick and partial runs (git-ignored)

WORKLOADS: list[tuple[str, str, Callable[[Params, str], WorkloadResult]]] = [
    ("1", "small", workloads.small_values),
    ("2", "growth", workloads.growth),
    ("3", "dogpile", workloads.dogpile_processes),
    ("4", "raw", bigfiles.big_files),
    ("5", "eviction", workloads.eviction),
    ("6", "invalidation", shared_invalidation.shared_invalidation),
    ("7", "tiered", tiered.tiered),
    ("8", "raw_tiered", rawtiered.raw_tiered),
    ("9", "listing", listing.listing),
    ("10", "scale", scale.scale),
    ("11", "counts", counts.counts),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small counts and sizes: checks the benchmark runs"
    )
    parser.add_argument(
        "--out",
        help="directory for latest.json, latest.md and set_cost.png (default: "
        "benchmarks/results for a full run of everything, else benchmarks/results/scratch)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="workloads to run, by number or name (small, growth, dogpile, raw, eviction, "
        "invalidation, tiered, raw_tiered, listing, scale, counts); "
        "comma-separated or repeated",
    )
    parser.add_argument(
        "--tmp",
        default=tempfile.gettempdir(),
        help="where caches and generated files go (default: %(default)s); "
        "needs about 6 GiB and 1.1 million inodes free for the full run",
    )
    parser.add_argument(
        "--scale-entries",
        type=int,
        metavar="N",
        help="workload 10 (scale) with N entries instead of 1,000,000 (100,000 with --quick); "
        "the steady writes scale with it: to iterate on eviction in a few minutes",
    )
    args = parser.parse_args(argv)
    if args.scale_entries is not None and args.scale_entries < 1_000:
        parser.error("--scale-entries must be at least 1000")
    names = {number: name for number, name, _ in WORKLOADS}
    chosen = []
    for item in ",".join(args.only).split(","):
        item = item.strip().lower()
        if not item:
            continue
        name = names.get(item, item)
        if name not in names.values():
            parser.error(f"unknown workload {item!r}; choose from {', '.join(names.values())}")
        chosen.append(name)
    args.only = chosen
    return args


def machine_info(workdir: str) -> dict[str, Any]:
    versions = {}
    for dist in ("dogpile_fsbackend", "dogpile.cache", "dogpile_filesystem", "diskcache"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        commit = subprocess.run(
            ["git", "-C", HERE, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "filesystem": _filesystem(workdir),
        "dbm_module": dbm_flavour(),
        "versions": versions,
        "commit": commit,
        "load_average_at_start": _load(),
    }


def _load() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine skews every timing."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as meminfo:
            kib = int(meminfo.readline().split()[1])
        return round(kib / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


def _filesystem(path: str) -> str | None:
    """Type and mount point of the filesystem holding ``path`` (Linux only)."""
    best: tuple[str, str] | None = None
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                _, mount_point, fs_type, *_ = line.split()
                inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
                if inside and (best is None or len(mount_point) > len(best[0])):
                    best = (mount_point, fs_type)
    except OSError:
        return None
    return f"{best[1]} on {best[0]}" if best else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = QUICK if args.quick else FULL
    if args.scale_entries is not None:
        params = scale.resized(params, args.scale_entries)
    selected = [w for w in WORKLOADS if not args.only or w[1] in args.only]
    out = args.out or (RESULTS if not args.quick and not args.only else SCRATCH)
    os.makedirs(out, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="dogpile-fsbackend-bench-", dir=args.tmp)
    # dogpile_filesystem stages every write in tempfile's directory and renames it
    # into the cache: keep that on the cache's filesystem.
    tempfile.tempdir = workdir
    info = machine_info(workdir)
    mode = "quick" if args.quick else "full"
    print(
        f"dogpile_fsbackend benchmarks ({mode}) in {workdir} [{info['filesystem']}], "
        f"Python {info['python']}, {info['cpus']} CPUs\n",
        flush=True,
    )
    results: dict[str, WorkloadResult] = {}
    started = time.perf_counter()
    try:
        for number, name, run in selected:
            print(f"-- running workload {number} ({name}) ...", flush=True)
            directory = os.path.join(workdir, name)
            os.makedirs(directory)
            begin = time.perf_counter()
            try:
                result = run(params, directory)
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            result.seconds = time.perf_counter() - begin
            results[name] = result
            tables = "\n\n".join(table.text() for table in result.tables)
            print(tables, f"\n   ({result.seconds:.0f} s)\n", sep="\n", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    total = time.perf_counter() - started
    info["load_average_at_end"] = _load()

    found = report.targets(results)
    targets = report.targets_table(found)
    if found:
        print(targets.text(), "\n", flush=True)
    document = {
        "mode": mode,
        "seconds": round(total, 1),
        "machine": info,
        "params": dataclasses.asdict(params),
        "targets": [t.to_json() for t in found],
        "workloads": {name: result.to_json() for name, result in results.items()},
    }
    json_path = os.path.join(out, "latest.json")
    with open(json_path, "w") as handle:
        json.dump(document, handle, indent=1, default=str)
        handle.write("\n")
    md_path = os.path.join(out, "latest.md")
    with open(md_path, "w") as handle:
        handle.write(_markdown(results, targets if found else None, info, mode))
    written = [json_path, md_path]
    if "growth" in results:
        png_path = os.path.join(out, "set_cost.png")
        subtitle = (
            f"{mode} run, {info['date'][:10]}, {info['filesystem']}, Python {info['python']}"
        )
        report.set_cost_chart(results["growth"], png_path, subtitle)
        written.append(png_path)
    print(f"total {total:.0f} s; wrote {', '.join(os.path.relpath(p) for p in written)}")
    return 0


def _markdown(
    results: dict[str, WorkloadResult], targets: Any, info: dict[str, Any], mode: str
) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    parts = [
        f"Benchmark run ({mode}) of {info['date']} on Python {info['python']}, "
        f"{info['cpus']} CPUs, {info['memory_gib']} GiB RAM, {info['filesystem']}; "
        f"{versions}; dbm module: {info['dbm_module']}; load average (1/5/15 min) "
        f"{info['load_average_at_start']} at the start, {info['load_average_at_end']} at the end.",
        "",
    ]
    if targets is not None:
        parts += [targets.markdown(), ""]
    for result in results.values():
        parts += [part for table in result.tables for part in (table.markdown(), "")]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
