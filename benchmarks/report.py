"""The targets of issues 5, 11 and 12, checked against the numbers (shown, never asserted),
and the chart."""

from __future__ import annotations

import dataclasses
from typing import Any

from common import OURS, MiB, Table, WorkloadResult, fmt_num, size_label
from opcases import FLOOR

DFS = "dogpile_filesystem"
DISKCACHE = "diskcache"


@dataclasses.dataclass
class Target:
    name: str
    measured: str
    met: bool | None  # None: the workload did not run

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _find(records: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for record in records:
        if all(record.get(k) == v for k, v in match.items()):
            return record
    return None


def _speedup(record: dict[str, Any] | None) -> float | None:
    """How many times faster we are than the peer of ``record``."""
    if record is None or not record.get("ours_over_peer"):
        return None
    return 1 / record["ours_over_peer"]


def targets(results: dict[str, WorkloadResult]) -> list[Target]:
    found: list[Target] = []
    small = results.get("small")
    if small:
        sizes = sorted({r["value_bytes"] for r in small.records})
        for op, label in (("get (hit)", "get hit"), ("set", "set")):
            for peer, want, text in (
                (DFS, 5.0, ">= 5x faster than"),
                (DISKCACHE, 1.0, "not slower than"),
            ):
                speedups = [
                    _speedup(_find(small.records, op=op, backend=peer, value_bytes=s))
                    for s in sizes
                ]
                shown = ", ".join(
                    f"{s} B: {x:.2f}x" if x is not None else f"{s} B: n/a"
                    for s, x in zip(sizes, speedups, strict=True)
                )
                ok = all(x is not None and x >= want for x in speedups)
                found.append(Target(f"small-value {label} {text} {peer}", f"speed-up {shown}", ok))
    growth = results.get("growth")
    if growth:
        levels = sorted({r["entries"] for r in growth.records if r["backend"] == OURS})
        low = _find(growth.records, backend=OURS, entries=levels[0])
        high = _find(growth.records, backend=OURS, entries=levels[-1])
        if low and high:
            factor = high["median_us"] / low["median_us"]
            found.append(
                Target(
                    f"set at {levels[-1]:,} entries within 1.5x of set at {levels[0]:,}",
                    f"{high['median_us']:.0f} us vs {low['median_us']:.0f} us = {factor:.2f}x",
                    factor <= 1.5,
                )
            )
    raw = results.get("raw")
    if raw:
        sizes = sorted({r["size_bytes"] for r in raw.records})
        parts, ok = [], True
        for size in sizes:
            ours = _find(raw.records, size_bytes=size, op="set (copy)", backend=OURS)
            limit = _find(raw.records, size_bytes=size, op="set (copy)", backend="shutil.copyfile")
            if ours and limit:
                share = ours["mib_per_s"] / limit["mib_per_s"]
                ok &= share >= 0.8
                parts.append(f"{_size(size)}: {share:.0%}")
        name = "raw copy set >= 80% of shutil.copyfile throughput (best run)"
        found.append(Target(name, ", ".join(parts), ok))
        largest = sizes[-1]
        move = _find(raw.records, size_bytes=largest, op="set (move)", backend=OURS)
        if move:
            found.append(
                Target(
                    f"movable set of {_size(largest)} under 5 ms",
                    f"{move['best_ms']:.2f} ms best, {move['median_ms']:.2f} ms median",
                    move["median_ms"] < 5.0,
                )
            )
        growths = [r["rss_growth_mib"] for r in raw.records if r["backend"] == OURS]
        peaks = {
            size: max(
                r["peak_rss_mib"]
                for r in raw.records
                if r["backend"] == OURS and r["size_bytes"] == size
            )
            for size in sizes
        }
        spread = peaks[largest] - peaks[sizes[0]]
        found.append(
            Target(
                "flat RSS for raw set/get (ours)",
                f"peak {peaks[sizes[0]]:.1f} MiB at {_size(sizes[0])}, "
                f"{peaks[largest]:.1f} MiB at {_size(largest)}; "
                f"growth during a case at most {max(growths):.1f} MiB",
                spread < 8 and max(growths) < 16,
            )
        )
    invalidation = results.get("invalidation")
    if invalidation:
        added = {
            r["op"]: r["added_syscalls"]
            for r in invalidation.records
            if r["backend"] == OURS and r["strategy"] == "shared, invalidated"
        }
        known = [x for x in added.values() if x is not None]
        found.append(
            Target(
                "SharedInvalidation: at most one more syscall per hit than the default",
                ", ".join(f"{op}: +{x:.2f}" for op, x in added.items())
                if len(known) == len(added)
                else "not counted (strace is not installed)",
                all(x <= 1.01 for x in known) if len(known) == len(added) else None,
            )
        )
    found += _hot_path_times(small)
    found += _scale_targets(results.get("scale"))
    found += _count_targets(results.get("counts"))
    return found


def _hot_path_times(small: WorkloadResult | None) -> list[Target]:
    """Issue 12's time goals that workload 1 measures (on this run's filesystem)."""
    if small is None:
        return []
    sizes = sorted({r["value_bytes"] for r in small.records})
    found = []
    for op, peer, want, name in (
        ("get (hit)", DISKCACHE, 0.8, "get hit <= 0.8x diskcache's time"),
        ("set", FLOOR, 1.3, "set within 1.3x of the os floor's create+write+close+rename"),
    ):
        got = [_find(small.records, op=op, backend=peer, value_bytes=s) for s in sizes]
        ratios = [r["ours_over_peer"] if r else None for r in got]
        shown = ", ".join(
            f"{size_label(s)}: {x:.2f}x" if x else f"{size_label(s)}: n/a"
            for s, x in zip(sizes, ratios, strict=True)
        )
        ok = all(x is not None and x <= want for x in ratios)
        found.append(Target(f"issue 12: {name}", f"ours/peer {shown}", ok))
    return found


def _scale_targets(scale: WorkloadResult | None) -> list[Target]:
    """Issue 11's goals, from workload 10 (ours)."""
    ours = _find(scale.records, backend=OURS) if scale else None
    if ours is None:
        return []
    writers = {k: v for k, v in ours["processes"].items() if k.startswith("writer")}
    p99 = ", ".join(f"{k} {v['p99_us'] / 1e3:,.2f} ms" for k, v in writers.items())
    top = ", ".join(f"{k} {v['max_ms']:,.1f} ms" for k, v in writers.items())
    scans = [(k, v["rss_growth_mib"]) for k, v in writers.items()]
    scans += [(m["operation"], m["rss_growth_mib"]) for m in ours.get("maintenance", [])]
    limit = ours["limit"]
    allowed = max(0.01 * limit, len(writers) * limit / ours["entries_filled"])
    over = max(ours["limit_monitor"]["max_bytes"] - limit, ours["end_walk_counted_bytes"] - limit)
    blocked = [(m["operation"], m["writer_max_ms"]) for m in ours.get("maintenance", [])]
    n = f"{ours['entries_filled']:,} entries"
    found = [
        Target(
            f"issue 11 ({n}): every writer's set p99 <= 5 ms",
            p99,
            all(v["p99_us"] <= 5_000 for v in writers.values()),
        ),
        Target(
            f"issue 11 ({n}): every writer's set max <= 100 ms",
            top,
            all(v["max_ms"] <= 100 for v in writers.values()),
        ),
        Target(
            f"issue 11 ({n}): RSS growth <= 50 MiB in every process that evicts or scans",
            ", ".join(f"{k} {v:.1f} MiB" for k, v in scans if v is not None),
            all(v is not None and v <= 50 for _, v in scans),
        ),
        Target(
            f"issue 11 ({n}): never over cache_size by more than max(1%, an entry per writer)",
            f"at most {over:+,} bytes (allowed {allowed:,.0f}): monitor "
            f"{ours['limit_monitor']['max_over_limit']:.4f}x, walk at the end "
            f"{ours['end_walk_counted_bytes'] / limit:.4f}x",
            over <= allowed,
        ),
        Target(
            f"issue 11 ({n}): LRU precision >= 0.95 against a true-LRU oracle",
            f"{ours['lru_precision']:.4f}" if ours["lru_precision"] is not None else "n/a",
            ours["lru_precision"] is not None and ours["lru_precision"] >= 0.95,
        ),
        Target(
            f"issue 11 ({n}): recently read entries survive (every hot key kept)",
            f"{ours['hot_kept']:.1%} of {ours['hot_keys']:,} hot keys kept",
            ours["hot_kept"] == 1.0,
        ),
    ]
    if blocked:
        found.append(
            Target(
                f"issue 11 ({n}): prune/verify/clear never block a write > 100 ms",
                ", ".join(f"{k}: writer max {v:,.1f} ms" for k, v in blocked if v is not None),
                all(v is not None and v <= 100 for _, v in blocked),
            )
        )
    return found


_COUNT_GOALS = (  # issue 12: (op, level, goal, instructions or syscalls)
    ("get (hit)", "region", 50_000, "instructions_per_op"),
    ("set (new key)", "region", 120_000, "instructions_per_op"),
    ("set (overwrite)", "region", 120_000, "instructions_per_op"),
    ("get (hit)", "region", 4, "syscalls_per_op"),
    ("get (miss)", "region", 1, "syscalls_per_op"),
    ("set (new key)", "region", 8, "syscalls_per_op"),
    ("set (overwrite)", "region", 8, "syscalls_per_op"),
    ("raw get (hit) + close", "raw", 9, "syscalls_per_op"),
    ("raw set (copy)", "raw", 12, "syscalls_per_op"),
    ("raw set (move)", "raw", 15, "syscalls_per_op"),
)


def _count_targets(counted: WorkloadResult | None) -> list[Target]:
    """Issue 12's deterministic goals, from workload 11 (ours, every size measured)."""
    if counted is None:
        return []
    found = []
    for op, level, goal, field in _COUNT_GOALS:
        mine = [
            r
            for r in counted.records
            if r["op"] == op and r["level"] == level and r["subject"].startswith(OURS)
        ]
        values = [(r["size_bytes"], r[field]) for r in mine if r[field] is not None]
        if not values:
            continue
        unit = "instructions" if field == "instructions_per_op" else "syscalls"
        shown = ", ".join(f"{size_label(size)}: {value:,.1f}" for size, value in values)
        found.append(
            Target(
                f"issue 12: {op} <= {goal:,} {unit}",
                shown,
                all(round(value, 1) <= goal for _, value in values),
            )
        )
    return found


def _size(size: int) -> str:
    return f"{size / 2**30:g} GiB" if size >= 2**30 else f"{size // MiB} MiB"


def targets_table(found: list[Target]) -> Table:
    table = Table("Targets (shown, not asserted)", ["target", "measured", "met"])
    for target in found:
        met = "n/a" if target.met is None else ("yes" if target.met else "NO")
        table.add(target.name, target.measured, met)
    return table


def set_cost_chart(growth: WorkloadResult, path: str, subtitle: str) -> None:
    """Median set cost against entries present, one line per backend (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5), dpi=110)
    backends: list[str] = []
    for record in growth.records:
        if record["backend"] not in backends:
            backends.append(record["backend"])
    for backend in backends:
        points = [
            (r["entries"], r["median_us"])
            for r in growth.records
            if r["backend"] == backend and not r.get("capped")
        ]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        width = 2.5 if backend == OURS else 1.5
        capped = any(r.get("capped") for r in growth.records if r["backend"] == backend)
        label = f"{backend} (capped at {xs[-1]:,})" if capped else backend
        axes.plot(xs, ys, marker="o", label=label, linewidth=width)
        axes.annotate(
            fmt_num(ys[-1], 0),
            (xs[-1], ys[-1]),
            textcoords="offset points",
            xytext=(5, 3),
            fontsize=8,
        )
    axes.set_xscale("log")
    axes.set_yscale("log")
    levels = sorted({r["entries"] for r in growth.records})
    axes.set_xticks(levels, [f"{level:,}" for level in levels])
    axes.minorticks_off()
    axes.set_xlabel("entries already in the cache")
    axes.set_ylabel("median time of one region.set (us, log)")
    axes.set_title(f"Set cost as the cache grows\n{subtitle}", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
