"""Shared pieces of the benchmark: parameters, timing helpers, result tables.

Every workload returns a :class:`WorkloadResult`: raw numbers (``records``,
written to the JSON file) and a :class:`Table` built from them (printed, and
written as Markdown).  Ratios are always *our time / the peer's time*, so a
value below 1 means dogpile_fsbackend is faster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

OURS = "dogpile_fsbackend"
MiB = 1024**2
GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Params:
    """Sizes and counts of one benchmark mode (full or ``--quick``)."""

    # 1. small values
    small_sizes: tuple[int, ...] = (100, 10 * 1024)
    small_rounds: int = 6
    small_batch: int = 200
    # 2. set cost as the cache grows
    growth_levels: tuple[int, ...] = (1_000, 10_000, 100_000)
    growth_samples: int = 300
    growth_budget_s: float = 8.0  # per backend and level; fewer samples if a backend is slow
    growth_caps: tuple[tuple[str, int], ...] = (
        ("dogpile_filesystem", 10_000),
        ("dogpile.cache.dbm", 10_000),
    )
    growth_value_size: int = 100
    # 3. get_or_create across processes
    dogpile_processes: tuple[int, ...] = (1, 2, 4)
    dogpile_keys: int = 100
    dogpile_passes: int = 5
    dogpile_creator_ms: float = 2.0
    dogpile_repeats: int = 5
    # 4. raw big files
    raw_sizes: tuple[int, ...] = (256 * MiB, GiB)
    raw_repeats: int = 7
    # 5. eviction
    evict_value_size: int = 10 * 1024
    evict_limit: int = 4 * MiB
    evict_writes: int = 2_000
    evict_budget_s: float = 25.0  # per backend
    # 6. shared invalidation
    invalidation_rounds: int = 6
    invalidation_batch: int = 500
    invalidation_traced_hits: tuple[int, int] = (1_000, 5_000)  # strace runs: N, then M hits
    # 7. several hosts (tiered, on a local redis-server)
    tiered_sizes: tuple[int, ...] = (100, 100 * 1024)
    tiered_rounds: int = 5
    tiered_batch: int = 200
    tiered_coherence_rounds: int = 200
    tiered_hosts: int = 2
    tiered_processes: int = 3
    tiered_keys: int = 30
    tiered_creator_ms: float = 20.0
    # 8. large files across hosts (raw_tiered, on local S3 and Redis servers)
    rawtiered_sizes: tuple[int, ...] = (64 * MiB, GiB)
    rawtiered_repeats: int = 3
    # 9. listing and deleting keys
    listing_entries: int = 1_000_000
    listing_repeats: int = 3
    # 10. scale: a million entries at the limit, several writers evicting
    scale_entries: int = 1_000_000
    scale_value_size: int = 100
    scale_fill_processes: int = 2
    scale_fill_batch: int = 10  # keys per region.set_multi while filling (1: region.set)
    scale_writers: int = 2
    scale_writes: int = 60_000  # per writer; > 10% of the entries in all: two eviction rounds
    scale_hot_fraction: float = 0.01  # of the filled keys, read by the reader ...
    scale_hot_span: float = 0.1  # ... spread over this oldest share of each fill process's keys
    scale_read_rate: float = 2_000.0  # hot reads per second during the steady phase
    scale_monitor_interval_s: float = 0.05
    scale_peers: tuple[str, ...] = ("dogpile_fsbackend", "diskcache", "diskcache (LRU)")
    scale_maintenance: bool = True  # prune/verify/clear rounds at the full size
    # 11. deterministic counts (and the syscall column of workload 1)
    counts_sizes: tuple[int, ...] = (100, 1024)
    counts_raw_size: int = 16 * 1024
    counts_strace_n: int = 1_000
    counts_callgrind_n: int = 200
    small_syscalls_n: int = 200
    small_syscall_sizes: tuple[int, ...] = (100, 10 * 1024)

    def growth_cap(self, backend: str) -> int | None:
        return dict(self.growth_caps).get(backend)


FULL = Params()
QUICK = Params(
    small_rounds=2,
    small_batch=50,
    growth_levels=(1_000, 5_000),
    growth_samples=60,
    growth_budget_s=1.5,
    growth_caps=(("dogpile_filesystem", 5_000), ("dogpile.cache.dbm", 5_000)),
    dogpile_processes=(1, 2),
    dogpile_keys=20,
    dogpile_passes=3,
    dogpile_creator_ms=1.0,
    dogpile_repeats=1,
    raw_sizes=(16 * MiB, 64 * MiB),
    raw_repeats=2,
    evict_limit=1 * MiB,
    evict_writes=300,
    evict_budget_s=4.0,
    invalidation_rounds=2,
    invalidation_batch=100,
    invalidation_traced_hits=(200, 1_000),
    tiered_rounds=2,
    tiered_batch=40,
    tiered_coherence_rounds=20,
    tiered_keys=6,
    rawtiered_sizes=(8 * MiB, 32 * MiB),
    rawtiered_repeats=1,
    listing_entries=20_000,
    listing_repeats=2,
    scale_entries=100_000,
    scale_writes=6_000,
    counts_sizes=(100,),
    counts_strace_n=100,
    counts_callgrind_n=30,
    small_syscalls_n=100,
    small_syscall_sizes=(100,),
)


# -- timing -------------------------------------------------------------------


def time_each(operation: Callable[[int], object], indices: Sequence[int]) -> list[float]:
    """Seconds taken by ``operation(i)`` for each ``i``, one sample per call."""
    clock = time.perf_counter_ns
    samples = []
    for i in indices:
        start = clock()
        operation(i)
        samples.append((clock() - start) / 1e9)
    return samples


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def rotated(items: Sequence[Any], shift: int) -> list[Any]:
    """``items`` starting at a different element each round: no backend always goes first."""
    if not items:
        return []
    shift %= len(items)
    return [*items[shift:], *items[:shift]]


def slug(name: str) -> str:
    """``name`` fit for a directory name."""
    return "".join(c if c.isalnum() else "-" for c in name)


def generate_file(path: str, size: int) -> None:
    """A file of ``size`` random bytes (incompressible, so no layer can cheat on it)."""
    with open(path, "wb") as out:
        left = size
        while left:
            block = os.urandom(min(left, 4 * MiB))
            out.write(block)
            left -= len(block)


def size_label(size: int) -> str:
    """``"100 B"``, ``"10 KiB"``, ``"64 MiB"``, ``"1 GiB"``: how the tables name a size."""
    if size >= GiB:
        return f"{size / GiB:g} GiB"
    if size >= MiB:
        return f"{size // MiB} MiB"
    return f"{size // 1024} KiB" if size >= 1024 else f"{size} B"


def dir_bytes(path: str) -> int:
    """Apparent size of every file below ``path``."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def read_status_kib(field: str) -> int | None:
    """A ``kB`` field (``VmHWM``, ``VmRSS``) of /proc/self/status; None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


# -- results ------------------------------------------------------------------


def ratio(ours_seconds: float | None, peer_seconds: float | None) -> float | None:
    """Our time / the peer's time (below 1: we are faster)."""
    if not ours_seconds or not peer_seconds:
        return None
    return ours_seconds / peer_seconds


def fmt_ratio(value: float | None, is_ours: bool = False) -> str:
    if is_ours:
        return "1 (ours)"
    if value is None:
        return "n/a"
    return f"{value:.2f}"


def fmt_num(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:  # None or NaN
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


@dataclasses.dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([str(cell) for cell in cells])

    def _widths(self) -> list[int]:
        return [
            max(len(self.headers[i]), *(len(row[i]) for row in self.rows))
            if self.rows
            else len(self.headers[i])
            for i in range(len(self.headers))
        ]

    def text(self) -> str:
        widths = self._widths()

        def line(cells: Sequence[str]) -> str:
            out = []
            for i, cell in enumerate(cells):
                out.append(cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i]))
            return "  ".join(out).rstrip()

        parts = [self.title, "=" * len(self.title), line(self.headers)]
        parts.append("  ".join("-" * w for w in widths))
        parts.extend(line(row) for row in self.rows)
        parts.extend(f"  * {note}" for note in self.notes)
        return "\n".join(parts)

    def markdown(self) -> str:
        align = ["---" if i < 2 else "---:" for i in range(len(self.headers))]
        parts = [f"#### {self.title}", ""]
        parts.append("| " + " | ".join(self.headers) + " |")
        parts.append("| " + " | ".join(align) + " |")
        parts.extend("| " + " | ".join(row) + " |" for row in self.rows)
        if self.notes:
            parts.append("")
            parts.extend(f"- {note}" for note in self.notes)
        return "\n".join(parts)


@dataclasses.dataclass
class WorkloadResult:
    key: str
    table: Table
    records: list[dict[str, Any]]
    seconds: float = 0.0
    more_tables: list[Table] = dataclasses.field(default_factory=list)

    @property
    def tables(self) -> list[Table]:
        return [self.table, *self.more_tables]

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.table.title,
            "seconds": round(self.seconds, 1),
            "records": self.records,
            "table": {"headers": self.table.headers, "rows": self.table.rows},
            "notes": self.table.notes,
            "more_tables": [
                {"title": t.title, "headers": t.headers, "rows": t.rows, "notes": t.notes}
                for t in self.more_tables
            ],
        }


def chunks(indices: range, size: int) -> Iterator[range]:
    for start in range(indices.start, indices.stop, size):
        yield range(start, min(start + size, indices.stop))
