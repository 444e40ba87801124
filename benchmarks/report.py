"""The targets of issue 5, checked against the numbers (shown, never asserted), and the chart."""

from __future__ import annotations

import dataclasses
from typing import Any

from common import OURS, MiB, Table, WorkloadResult, fmt_num

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
        style = {"linewidth": 2.5} if backend == OURS else {"linewidth": 1.5}
        capped = any(r.get("capped") for r in growth.records if r["backend"] == backend)
        label = f"{backend} (capped at {xs[-1]:,})" if capped else backend
        axes.plot(xs, ys, marker="o", label=label, **style)
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
