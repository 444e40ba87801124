"""Workload 11: syscalls and instructions per operation, and the syscall counts of workload 1.

Both counts come from child processes that run one operation N times (see
opcases.py), so that only the operation is counted:

- **syscalls per op**: the operation's loop runs under ``strace -f``, and so
  does its baseline loop, in a second child with the same preparation, set-up
  and warm-up; only the calls between two marker calls around the loop count
  (start-up and one-time work stay out); (loop - baseline) / N, per syscall name.  The baseline
  is the caller's own share of the loop (nothing, or opening the file handed
  to a raw set).
- **instructions per op**: one child under callgrind runs every case's
  baseline loop and then its body loop, each between two marker calls at which
  callgrind zeroes and dumps its counters; (body - baseline) / N user-space
  instructions (Ir).  Start-up, imports and preparation are never counted.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import opcases
import tracing
from common import OURS, Params, Table, WorkloadResult, fmt_num, fmt_ratio, size_label, slug

MISSING_STRACE = "strace is not installed (Debian: apt-get install strace): no syscall counts"
MISSING_VALGRIND = (
    "valgrind is not installed (Debian: apt-get install valgrind): no instruction counts"
)


@dataclasses.dataclass(frozen=True)
class Case:
    """One operation of one subject (see opcases.subject) at one value size."""

    subject: str
    op: str
    size: int

    @property
    def level(self) -> str:
        if self.op in opcases.RAW_OPS:
            return "raw"
        return "backend" if self.subject.endswith(" (backend level)") else "region"


def count_syscalls(cases: Sequence[Case], n: int, workdir: str) -> dict[Case, dict[str, float]]:
    """Syscalls per operation of each case, by syscall name; {} if strace is missing.

    Every run of a subject starts from the same prepared state, so operations
    with the same baseline (the caller's share) share one baseline run.  The
    runs are prepared one after the other, then traced two at a time (counts do
    not depend on timing).
    """
    if tracing.strace_path() is None or not cases:
        return {}
    runs: dict[tuple[Any, ...], tuple[Case, str]] = {}
    for case in cases:
        share = opcases.subject(case.subject, case.size).caller_share(case.op)
        runs.setdefault(("baseline", case.subject, case.size, share), (case, "baseline"))
        runs["op", case] = (case, "op")
    directories = []
    for serial, (case, _) in enumerate(runs.values()):
        directory = os.path.join(workdir, f"strace-{serial}-{slug(case.subject)}")
        os.makedirs(directory)
        opcases.subject(case.subject, case.size).prepare(directory, n)
        directories.append(directory)
    env = tracing.child_env(workdir)

    def trace(job: tuple[tuple[Case, str], str]) -> Counter[str]:
        (case, mode), directory = job
        command = tracing.opcases_command(
            "run", case.subject, str(case.size), case.op, mode, directory, str(n)
        )
        return tracing.strace_marked_counts(command, directory + ".strace", env)

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            jobs = zip(runs.values(), directories, strict=True)
            traced = dict(zip(runs, pool.map(trace, jobs), strict=True))
    finally:
        for directory in directories:
            shutil.rmtree(directory, ignore_errors=True)
    results: dict[Case, dict[str, float]] = {}
    for case in cases:
        share = opcases.subject(case.subject, case.size).caller_share(case.op)
        baseline = traced["baseline", case.subject, case.size, share]
        counted = traced["op", case]
        per_op = {
            name: (counted[name] - baseline[name]) / n for name in set(counted) | set(baseline)
        }
        results[case] = {name: v for name, v in per_op.items() if abs(v) >= 0.005}
    return results


def count_instructions(cases: Sequence[Case], n: int, workdir: str) -> dict[Case, float]:
    """User-space instructions per operation of each case; {} if valgrind is missing."""
    if tracing.valgrind_path() is None or not cases:
        return {}
    groups: dict[tuple[str, int], list[Case]] = defaultdict(list)
    for case in cases:
        groups[case.subject, case.size].append(case)
    plan: list[dict[str, Any]] = []
    order: list[Case] = []
    for serial, ((name, size), members) in enumerate(groups.items()):
        directory = os.path.join(workdir, f"callgrind-{serial}-{slug(name)}")
        os.makedirs(directory)
        ops = [case.op for case in members]
        opcases.subject(name, size).prepare(directory, n)
        plan.append({"subject": name, "size": size, "ops": ops, "directory": directory})
        order += members
    command = tracing.opcases_command("marked", str(n), json.dumps(plan))
    loops = tracing.callgrind_loops(
        command, os.path.join(workdir, "callgrind"), tracing.child_env(workdir)
    )
    if len(loops) != 2 * len(order):
        raise RuntimeError(f"callgrind wrote {len(loops)} profiles, expected {2 * len(order)}")
    return {case: (loops[2 * i + 1] - loops[2 * i]) / n for i, case in enumerate(order)}


def by_name_text(by_name: dict[str, float]) -> str:
    """``openat 1, read 1, close 1``: largest first."""
    items = sorted(by_name.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{name} {_count_text(value)}" for name, value in items)


def _count_text(value: float) -> str:
    return str(round(value)) if abs(value - round(value)) < 0.005 else f"{value:.2f}"


def _cases(params: Params) -> list[Case]:
    region = [OURS, "diskcache", "diskcache (LRU)", opcases.FLOOR]
    backend = [f"{OURS} (backend level)", "diskcache (backend level)"]
    raw = [f"{OURS}.raw", "diskcache (read=True)", opcases.FLOOR]
    cases = []
    for size in params.counts_sizes:
        for op in opcases.REGION_OPS:
            cases += [Case(name, op, size) for name in region]
            if op in (opcases.HIT, opcases.SET_NEW):
                cases += [Case(name, op, size) for name in backend]
    for op in opcases.RAW_OPS:
        for name in raw:
            if op in opcases.subject(name, params.counts_raw_size).ops:
                cases.append(Case(name, op, params.counts_raw_size))
    return cases


def _ours_of(case: Case) -> Case:
    name = {"raw": f"{OURS}.raw", "backend": f"{OURS} (backend level)"}.get(case.level, OURS)
    return dataclasses.replace(case, subject=name)


def counts(params: Params, workdir: str) -> WorkloadResult:
    cases = _cases(params)
    syscalls = count_syscalls(cases, params.counts_strace_n, workdir)
    instructions = count_instructions(cases, params.counts_callgrind_n, workdir)
    table = Table(
        "Workload 11: syscalls and user-space instructions per operation (strace, callgrind)",
        ["case", "backend", "syscalls/op", "instructions/op", "ours/peer (instr.)", "syscalls"],
    )
    records: list[dict[str, Any]] = []
    for case in cases:
        by_name = syscalls.get(case)
        total = sum(by_name.values()) if by_name is not None else None
        ir = instructions.get(case)
        ours_ir = instructions.get(_ours_of(case))
        is_ours = _ours_of(case) == case
        r = ours_ir / ir if ours_ir and ir else None
        records.append(
            {
                "subject": case.subject,
                "op": case.op,
                "size_bytes": case.size,
                "level": case.level,
                "syscalls_per_op": total,
                "syscalls_by_name": by_name,
                "instructions_per_op": ir,
                "ours_over_peer_instructions": r,
            }
        )
        table.add(
            f"{case.op} {size_label(case.size)}",
            case.subject,
            fmt_num(total, 2),
            fmt_num(ir, 0),
            fmt_ratio(r, is_ours),
            by_name_text(by_name) if by_name else "n/a",
        )
    table.notes += [
        f"syscalls/op: the operation's loop ({params.counts_strace_n} ops) and its baseline "
        "loop each run in a fresh child under `strace -f` with the same preparation, set-up "
        f"and warm-up ({opcases.WARM} ops of every kind); only the calls between two marker "
        "calls around the loop count; (loop - baseline) / N, failed calls included. The "
        "baseline is the caller's own share: nothing, or opening and closing the "
        "file handed to a raw set.",
        f"instructions/op: user-space instructions (callgrind Ir) of {params.counts_callgrind_n} "
        "ops minus the same baseline loop, counted between marker calls (callgrind "
        f"--zero-before={tracing.ZERO_MARKER} --dump-before={tracing.DUMP_MARKER}), so start-up "
        "and imports are not counted; ours/peer compares them at the same level. Where "
        "valgrind has no openat2 (3.19 has not), our sets under callgrind take the path-check "
        "branch (a stat of the shard directory, then an open) that strace does not see.",
        "Region level is what applications call (dogpile's CachedValue, metadata and pickling "
        "included); backend level is get_serialized/set_serialized of the serialized value. "
        "diskcache runs behind the dogpile adapter of benchmarks/peers.py; diskcache (LRU) is "
        "eviction_policy='least-recently-used', which writes on every hit.",
        f"raw get (hit) + close: region.get returns an open file, closed at once without "
        f"reading; raw set (copy) hands over an open {size_label(params.counts_raw_size)} file "
        "(file_movable=False), raw set (move) a named file on the cache's filesystem "
        "(file_movable=True). diskcache has no move.",
        "os floor: open + one read of the known size + close; a failed open; create (O_EXCL) + "
        "write + close + rename; open + close of a file; create + copy_file_range + close + "
        "rename; one rename.",
    ]
    if tracing.strace_path() is None:
        table.notes.append(MISSING_STRACE)
    if tracing.valgrind_path() is None:
        table.notes.append(MISSING_VALGRIND)
    return WorkloadResult("counts", table, records)
