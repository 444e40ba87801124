"""Workload 6: what SharedInvalidation costs on a cache hit, against dogpile's default.

On every hit dogpile asks the region's invalidator whether the value was
invalidated: its default strategy answers from memory, SharedInvalidation with
one ``lstat`` of its file.  Two measures, side by side in one run:

* time per region ``get`` and ``get_or_create`` hit, in chunks of 20 that rotate
  over the (backend, strategy) cases, on dogpile_fsbackend.pickled and on
  dogpile.cache.memory (where the check is most of the work);
* syscalls per hit, counted by ``strace -f -c`` around a child that makes the
  same hits N and then M times: (calls(M) - calls(N)) / (M - N), so start-up
  cancels out.  Deterministic where wall times swing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable

from common import (
    OURS,
    Params,
    Table,
    WorkloadResult,
    chunks,
    fmt_num,
    median,
    percentile,
    rotated,
    time_each,
)
from dogpile.cache import make_region
from dogpile.cache.region import CacheRegion

from dogpile_fsbackend import SharedInvalidation

HERE = os.path.dirname(os.path.abspath(__file__))
MEMORY = "dogpile.cache.memory"
BACKENDS = {OURS: "dogpile_fsbackend.pickled", MEMORY: MEMORY}
DEFAULT = "default"
STRATEGIES = (DEFAULT, "shared, never invalidated", "shared, invalidated")
OPS = ("get (hit)", "get_or_create (hit)")
KEY, VALUE = "key", b"v" * 100
_CHILD = "import sys; sys.path.insert(0, sys.argv[1]); import shared_invalidation as w; w.child()"


def hit_region(backend: str, strategy: str, directory: str) -> CacheRegion:
    """A region holding ``KEY``, with dogpile's default invalidation or SharedInvalidation."""
    os.makedirs(directory, exist_ok=True)
    region = make_region().configure(
        BACKENDS[backend],
        expiration_time=3600,
        arguments={"base_dir": directory} if backend == OURS else {},
        region_invalidator=None if strategy == DEFAULT else SharedInvalidation(directory),
    )
    if strategy == "shared, invalidated":
        region.invalidate()
    region.set(KEY, VALUE)
    return region


def hit(region: CacheRegion, op: str) -> Callable[[int], object]:
    if op == "get (hit)":
        return lambda i: region.get(KEY)
    return lambda i: region.get_or_create(KEY, _no_creation)


def _no_creation() -> bytes:
    raise AssertionError("a hit must not call the creator")


def child() -> None:
    """``python -c _CHILD HERE backend strategy op count directory``: the traced hits."""
    backend, strategy, op, count, directory = sys.argv[2:]
    call = hit(hit_region(backend, strategy, directory), op)
    for i in range(100):  # warm-up: imports, first reads, the strategy's first look
        call(i)
    for i in range(int(count)):
        call(i)


def syscalls_per_hit(
    backend: str, strategy: str, op: str, counts: tuple[int, int], workdir: str
) -> dict[str, float]:
    """Syscalls per hit by name (and ``total``): the difference of two traced runs."""
    traced = []
    for count in counts:
        directory = tempfile.mkdtemp(dir=workdir)
        out = os.path.join(directory, "strace.out")
        # -B: no run writes bytecode files, so both runs make the same start-up calls.
        command = [sys.executable, "-B", "-c", _CHILD, HERE, backend, strategy, op, str(count)]
        subprocess.run(
            ["strace", "-f", "-c", "-o", out, *command, directory],
            check=True,
            capture_output=True,
            timeout=600,
        )
        traced.append(_strace_summary(out))
    few, many = traced
    span = counts[1] - counts[0]
    per_hit = {name: (many.get(name, 0) - few.get(name, 0)) / span for name in {*few, *many}}
    return {n: calls for n, calls in per_hit.items() if n == "total" or abs(calls) >= 0.01}


def _strace_summary(path: str) -> dict[str, int]:
    """Calls per syscall from ``strace -c`` output (the errors column may be empty)."""
    calls = {}
    with open(path) as summary:
        for line in summary:
            fields = line.split()
            if len(fields) >= 5 and fields[3].isdigit():
                calls[fields[-1]] = int(fields[3])
    return calls


def shared_invalidation(params: Params, workdir: str) -> WorkloadResult:
    cases = [(backend, strategy) for backend in BACKENDS for strategy in STRATEGIES]
    regions = {
        case: hit_region(*case, os.path.join(workdir, f"{i}-{case[0]}"))
        for i, case in enumerate(cases)
    }
    samples: dict[tuple[str, tuple[str, str]], list[float]] = defaultdict(list)
    for round_no in range(params.invalidation_rounds):
        for op in OPS:
            for chunk_no, chunk in enumerate(chunks(range(params.invalidation_batch), 20)):
                for case in rotated(cases, round_no + chunk_no):
                    samples[op, case].extend(time_each(hit(regions[case], op), chunk))
    traced = shutil.which("strace") is not None
    counts = params.invalidation_traced_hits
    if traced:  # the first child fills caches later ones read (stevedore's entry points)
        subprocess.run(
            [sys.executable, "-B", "-c", _CHILD, HERE, OURS, DEFAULT, OPS[0], "0", workdir],
            check=True,
            capture_output=True,
            timeout=600,
        )
    syscalls = {
        (op, case): syscalls_per_hit(*case, op, counts, workdir) if traced else {}
        for op in OPS
        for case in cases
    }

    table = Table(
        "Workload 6: a cache hit with dogpile's default invalidation vs SharedInvalidation",
        [
            "case",
            "backend, strategy",
            "median us/op",
            "p90 us/op",
            "syscalls/op",
            "added syscalls",
            "added us",
            "time vs default",
        ],
    )
    records = []
    for op in OPS:
        for backend in BACKENDS:
            base = median(samples[op, (backend, DEFAULT)])
            base_calls = syscalls[op, (backend, DEFAULT)].get("total")
            for strategy in STRATEGIES:
                values = samples[op, (backend, strategy)]
                mid = median(values)
                calls = syscalls[op, (backend, strategy)]
                total = calls.get("total")
                added = None if total is None or base_calls is None else total - base_calls
                records.append(
                    {
                        "op": op,
                        "backend": backend,
                        "strategy": strategy,
                        "median_us": mid * 1e6,
                        "p90_us": percentile(values, 0.9) * 1e6,
                        "samples": len(values),
                        "syscalls_per_op": calls,
                        "added_syscalls": added,
                        "added_us": (mid - base) * 1e6,
                        "over_default": mid / base,
                    }
                )
                table.add(
                    op,
                    f"{backend}, {strategy}",
                    fmt_num(mid * 1e6, 2),
                    fmt_num(percentile(values, 0.9) * 1e6, 2),
                    fmt_num(total, 2),
                    "baseline" if strategy == DEFAULT else f"{fmt_num(added, 2)}",
                    "baseline" if strategy == DEFAULT else f"{(mid - base) * 1e6:+.2f}",
                    "1 (baseline)" if strategy == DEFAULT else f"{mid / base:.2f}",
                )
    breakdown = {
        strategy: syscalls["get (hit)", (OURS, strategy)] for strategy in (DEFAULT, STRATEGIES[2])
    }
    table.notes += [
        f"{params.invalidation_rounds} rounds x {params.invalidation_batch} hits per op and case, "
        "in chunks of 20 that rotate over the cases; one key, a 100-byte value.",
        "'shared, never invalidated': no invalidation file yet (the lstat fails with ENOENT); "
        "'shared, invalidated': region.invalidate() was called once, so every hit compares "
        "the file's lstat with the one it last read.",
        f"syscalls/op: strace -f -c of a child making the hits {counts[0]:,} and "
        f"{counts[1]:,} times; the difference divided by {counts[1] - counts[0]:,}."
        + ("" if traced else " strace is not installed here: not counted."),
    ]
    if traced:
        table.notes.append(
            f"A {OURS} get hit, by syscall: default "
            f"{_calls_text(breakdown[DEFAULT])}; SharedInvalidation "
            f"{_calls_text(breakdown[STRATEGIES[2]])}."
        )
    return WorkloadResult("invalidation", table, records)


def _calls_text(calls: dict[str, float]) -> str:
    return ", ".join(
        f"{name} {count:g}" for name, count in sorted(calls.items()) if name != "total"
    )
