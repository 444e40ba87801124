"""The tables of the scale workload (workload 10), built from its records."""

from __future__ import annotations

import os
from typing import Any

from common import OURS, MiB, Params, Table, fmt_num, fmt_ratio

BLOCKED_MS = 100.0  # issue 11: maintenance never blocks a write longer than this


def _entry_bytes(records: list[dict[str, Any]]) -> str:
    return "/".join(f"{r['limit'] / r['entries_filled']:.0f}" for r in records)


def tables(params: Params, records: list[dict[str, Any]]) -> tuple[Table, Table, Table]:
    entries, writers = params.scale_entries, params.scale_writers
    title = (
        f"Workload 10: {entries:,} entries of {params.scale_value_size} B at the size limit, "
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
            f"sets > {BLOCKED_MS:g} ms",
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
        "set just before the call) until it is done (ours have no eviction lock: the two "
        "meet only on a shard's lock; diskcache's share its database's).",
        "sets meanwhile / writer max: the writer's sets whose duration overlaps the operation, "
        "and the longest of them; 'of it during the op': the longest part of one set that fell "
        "inside the operation (a set blocked by the operation may go on to evict for itself "
        f"once it gets the lock). Issue 11: no write blocked for more than {BLOCKED_MS:g} ms "
        "at a time.",
    ]
    if not params.scale_maintenance:
        maintenance.notes.append("Maintenance rounds were not run (scale_maintenance=False).")
    return latency, limit, maintenance
