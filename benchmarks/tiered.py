"""Workload 7: several hosts, ``dogpile_fsbackend.tiered`` on a real local redis-server.

* reads: a tiered hit (the local tier) against our local backend alone and
  against dogpile's Redis backend alone, the first read of a key on a host
  (a remote hit copied into the local tier), and sets;
* coherence: how soon a write or a delete on one host is seen by a process of
  another host (pub/sub), measured across processes with the shared monotonic
  clock;
* get_or_create handoff: simulated hosts (separate base_dirs) of several
  processes race for the same keys with lock "both", "remote" (at dogpile's
  default lock_sleep and at 10 ms) and "local": creator calls, and how long
  after a creator finished the waiters got its value;
* outage: a get while Redis is down (remote_errors="degrade") against a local hit.

The server is a private redis-server (tests/servers.py) on a free loopback
port: loopback hides network latency, so between hosts Redis costs more.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from common import (
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from servers import RedisServer, redis_server_binary  # the tests' server helper

TIERED = "tiered hit (local tier)"
LOCAL = "dogpile_fsbackend.pickled alone"
REDIS = "dogpile.cache.redis alone"
FIRST = "tiered first read on a host"
SPAWN = multiprocessing.get_context("spawn")


def tiered_arguments(url: str, base_dir: str, **top: Any) -> dict[str, Any]:
    remote = {"url": url, "distributed_lock": True, "lock_timeout": 60, **top.pop("remote", {})}
    return {
        "local": {"base_dir": base_dir, "cache_size": 2 * 1024**3},
        "remote_backend": "dogpile.cache.redis",
        "remote": remote,
        **top,
    }


def tiered_region(url: str, base_dir: str, **top: Any) -> CacheRegion:
    region = make_region().configure(
        "dogpile_fsbackend.tiered", arguments=tiered_arguments(url, base_dir, **top)
    )
    listener = region.backend.listener
    if listener is not None and not listener.wait_connected(30):
        raise RuntimeError("the invalidation listener never subscribed")
    return region


def redis_region(url: str) -> CacheRegion:
    return make_region().configure(
        "dogpile.cache.redis", arguments={"url": url, "thread_local_lock": False}
    )


def tiered(params: Params, workdir: str) -> WorkloadResult:
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError("workload 7 needs redis-server (Debian: apt-get install redis-server)")
    server = RedisServer(binary, os.path.join(workdir, "redis")).start()
    try:
        reads, read_records = _reads(params, server, workdir)
        coherence, coherence_records = _coherence(params, server.url, workdir)
        handoff, handoff_records = _handoff(params, server, workdir)
        outage, outage_records = _outage(params, server, workdir)
    finally:
        server.stop()
    table = Table(
        "Workload 7: several hosts, the tiered backend on a local redis-server",
        ["case", "measure", "median", "p90", "max / extra", "samples"],
        rows=reads.rows + coherence.rows + handoff.rows + outage.rows,
        notes=reads.notes + coherence.notes + handoff.notes + outage.notes,
    )
    records = read_records + coherence_records + handoff_records + outage_records
    return WorkloadResult("tiered", table, records)


# -- reads and writes ---------------------------------------------------------------


def redis_commands(client: Any) -> int:
    """Commands Redis has run so far, less our own INFO calls and the listeners' pings."""
    stats = client.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_info", "cmdstat_ping"))


def _commands_per_op(
    client: Any, writer: CacheRegion, reader: CacheRegion, value: bytes, count: int
) -> dict[str, float]:
    """Redis commands per first read, per tiered hit and per tiered set."""
    keys = [f"count:{len(value)}:{i}" for i in range(count)]
    writer.set_multi(dict.fromkeys(keys, value))
    operations = {
        FIRST: lambda i: reader.get(keys[i]),
        TIERED: lambda i: reader.get(keys[i]),  # the same keys again: now local
        "set: tiered": lambda i: writer.set(f"count-set:{len(value)}:{i}", value),
    }
    found = {}
    for name, operation in operations.items():
        before = redis_commands(client)
        for i in range(count):
            operation(i)
        found[name] = (redis_commands(client) - before) / count
    return found


def _reads(
    params: Params, server: RedisServer, workdir: str
) -> tuple[Table, list[dict[str, Any]]]:
    url, client = server.url, server.client()
    table = Table("", ["case", "measure", "median", "p90", "max / extra", "samples"])
    records: list[dict[str, Any]] = []
    for size in params.tiered_sizes:
        label = f"{size // 1024} KiB" if size >= 1024 else f"{size} B"
        value = os.urandom(size)
        writer = tiered_region(url, os.path.join(workdir, f"writer-{size}"))
        reader = tiered_region(url, os.path.join(workdir, f"reader-{size}"))
        local = make_region().configure(
            "dogpile_fsbackend.pickled",
            arguments={
                "base_dir": os.path.join(workdir, f"local-{size}"),
                "cache_size": 2 * 1024**3,
            },
        )
        redis = redis_region(url)
        samples: dict[str, list[float]] = defaultdict(list)
        batch = params.tiered_batch
        for round_no in range(params.tiered_rounds):
            keys = [f"read:{size}:{round_no}:{i}" for i in range(batch)]
            writer.set_multi(dict.fromkeys(keys, value))  # in Redis (and the writer's disk)
            local.set_multi(dict.fromkeys(keys, value))
            # First reads on the reader's host: every key once, a remote hit copied in.
            samples[FIRST] += time_each(lambda i, k=keys, g=reader.get: g(k[i]), range(batch))
            getters: list[tuple[str, Callable[[str], object]]] = [
                (TIERED, reader.get),
                (LOCAL, local.get),
                (REDIS, redis.get),
            ]
            for chunk_no, chunk in enumerate(chunks(range(batch), 20)):
                for name, get in rotated(getters, round_no + chunk_no):
                    samples[name] += time_each(lambda i, g=get, k=keys: g(k[i]), chunk)
            setters = [
                ("set: tiered", writer.set),
                ("set: local alone", local.set),
                ("set: Redis alone", redis.set),
            ]
            for chunk_no, chunk in enumerate(chunks(range(batch), 20)):
                for name, setter in rotated(setters, round_no + chunk_no):
                    fresh = [f"set:{name}:{size}:{round_no}:{i}" for i in range(batch)]
                    samples[name] += time_each(
                        lambda i, s=setter, k=fresh, v=value: s(k[i], v), chunk
                    )
            if reader.get(keys[0]) != value:
                raise AssertionError("the tiered backend returned a wrong value")
        # Redis commands per operation: a count, not a time.
        commands = _commands_per_op(client, writer, reader, value, batch)
        for name, per_op in commands.items():
            table.add(f"{name} {label}", "Redis commands/op", f"{per_op:.2f}", "", "", batch)
            records.append({"case": name, "value_bytes": size, "redis_commands_per_op": per_op})
        local_median = median(samples[LOCAL])
        for name, got in samples.items():
            mid = median(got)
            extra = f"{mid / local_median:.2f}x local" if not name.startswith("set") else ""
            table.add(
                f"{name} {label}",
                "us/op",
                fmt_num(mid * 1e6),
                fmt_num(percentile(got, 0.9) * 1e6),
                extra,
                len(got),
            )
            records.append(
                {
                    "case": name,
                    "value_bytes": size,
                    "median_us": mid * 1e6,
                    "p90_us": percentile(got, 0.9) * 1e6,
                    "samples": len(got),
                }
            )
    table.notes += [
        "Reads: the same keys through the tiered backend (its local tier answers), our local "
        "backend alone, and dogpile's Redis backend alone, interleaved in rotating chunks of 20. "
        "'x local' is the median over the local backend's median.",
        "First read on a host: a key another host wrote, read once: a local miss, a Redis "
        "read, and the copy written into the local tier.",
        "Sets through the tiered backend write Redis, publish the key, then write the local tier.",
    ]
    return table, records


# -- coherence ----------------------------------------------------------------------


MISS = "<miss>"


def _watcher(url: str, base_dir: str, commands: Any, answers: Any) -> None:
    """Host B: read a key until it shows what it is told to expect; say when it did."""
    from dogpile.cache.api import NO_VALUE

    region = tiered_region(url, base_dir)
    answers.put(os.getpid())
    for expected in iter(commands.get, None):
        while True:
            value = region.get("watched")
            if (MISS if value is NO_VALUE else value) == expected:
                break
            # Yield the GIL: a loop of pure local hits would keep the listener thread
            # waiting for it (up to the 5 ms switch interval), which no real app does.
            time.sleep(0.0001)
        answers.put(time.monotonic())


def _coherence(params: Params, url: str, workdir: str) -> tuple[Table, list[dict[str, Any]]]:
    """Each round host B caches an old value, then host A writes (or deletes) the key."""
    writer = tiered_region(url, os.path.join(workdir, "coherence-a"))
    commands, answers = SPAWN.Queue(), SPAWN.Queue()
    watcher = SPAWN.Process(
        target=_watcher, args=(url, os.path.join(workdir, "coherence-b"), commands, answers)
    )
    watcher.start()
    answers.get(timeout=60)
    latency: dict[str, list[float]] = defaultdict(list)
    try:
        for round_no in range(params.tiered_coherence_rounds):
            old = f"old {round_no}"
            writer.set("watched", old)
            commands.put(old)  # host B reads it, which caches it locally
            answers.get(timeout=60)
            kind = "delete" if round_no % 2 else "write"
            commands.put(MISS if kind == "delete" else f"new {round_no}")
            time.sleep(0.005)  # host B is polling its local copy now
            started = time.monotonic()
            if kind == "delete":
                writer.delete("watched")
            else:
                writer.set("watched", f"new {round_no}")
            latency[kind].append(answers.get(timeout=60) - started)
    finally:
        commands.put(None)
        watcher.join(60)
    table = Table("", [])
    records = []
    for kind, got in latency.items():
        table.add(
            f"a {kind} on host A seen by host B",
            "ms",
            fmt_num(median(got) * 1e3, 2),
            fmt_num(percentile(got, 0.9) * 1e3, 2),
            fmt_num(max(got) * 1e3, 2),
            len(got),
        )
        records.append(
            {
                "case": f"{kind} seen on another host",
                "median_ms": median(got) * 1e3,
                "p90_ms": percentile(got, 0.9) * 1e3,
                "max_ms": max(got) * 1e3,
                "samples": len(got),
            }
        )
    table.notes.append(
        "Coherence: host B (another process, another base_dir) polls the key it has cached; "
        "the time runs from just before host A's set or delete to host B's first read of the "
        "change (pub/sub on loopback, CLOCK_MONOTONIC shared by both processes)."
    )
    return table, records


# -- get_or_create handoff ------------------------------------------------------------


def _racer(url, base_dir, host, top, keys, creator_ms, log_path, barrier, results) -> None:
    region = tiered_region(url, base_dir, **top)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    served = {}

    def creator_for(key):
        def creator():
            time.sleep(creator_ms / 1000)
            os.write(
                log_fd, (json.dumps([key, time.monotonic(), host, os.getpid()]) + "\n").encode()
            )
            return f"{host}/{os.getpid()}"

        return creator

    barrier.wait(60)
    start = time.monotonic()
    for key in keys:
        region.get_or_create(key, creator_for(key))
        served[key] = time.monotonic()
    results.put((host, os.getpid(), start, served))


HANDOFF_CASES = [
    ("both", {"lock": "both"}),
    ("both, lock_sleep 0.01", {"lock": "both", "remote": {"lock_sleep": 0.01}}),
    ("remote (lock_sleep 0.1, dogpile's default)", {"lock": "remote"}),
    ("remote, lock_sleep 0.01", {"lock": "remote", "remote": {"lock_sleep": 0.01}}),
    ("local", {"lock": "local"}),
]


def _handoff(
    params: Params, server: RedisServer, workdir: str
) -> tuple[Table, list[dict[str, Any]]]:
    url, client = server.url, server.client()
    hosts, per_host = params.tiered_hosts, params.tiered_processes
    keys = [f"race:{i}" for i in range(params.tiered_keys)]
    table = Table("", [])
    records = []
    for serial, (name, top) in enumerate(HANDOFF_CASES):
        log_path = os.path.join(workdir, f"handoff-{serial}.log")
        open(log_path, "w").close()
        barrier = SPAWN.Barrier(hosts * per_host)
        results = SPAWN.Queue()
        run_keys = [f"{serial}:{key}" for key in keys]
        workers = [
            SPAWN.Process(
                target=_racer,
                args=(
                    url,
                    os.path.join(workdir, f"handoff-{serial}-host{h}"),
                    h,
                    top,
                    run_keys,
                    params.tiered_creator_ms,
                    log_path,
                    barrier,
                    results,
                ),
            )
            for h in range(hosts)
            for _ in range(per_host)
        ]
        for worker in workers:
            worker.start()
        client.config_resetstat()  # the workers wait at the barrier until all are ready
        outcomes = [results.get(timeout=600) for _ in workers]
        for worker in workers:
            worker.join(60)
        lock_sets = client.info("commandstats").get("cmdstat_set", {}).get("calls", 0)
        with open(log_path) as log:
            creations = [json.loads(line) for line in log]
        waits: dict[str, list[float]] = defaultdict(list)
        for host, pid, _, served in outcomes:
            for key in run_keys:
                made = [c for c in creations if c[0] == key]
                if pid in (c[3] for c in made):
                    continue  # its own value
                first = min(made, key=lambda c: c[1])
                where = "same host" if any(c[2] == host for c in made) else "other host"
                waits[where].append(served[key] - first[1])
        wall = max(max(o[3].values()) for o in outcomes) - min(o[2] for o in outcomes)
        wanted = len(keys) * (hosts if name == "local" else 1)
        for where, got in sorted(waits.items(), reverse=True):
            table.add(
                f"get_or_create handoff, lock {name}: waiter on the {where}",
                "ms after the creator",
                fmt_num(median(got) * 1e3, 2),
                fmt_num(percentile(got, 0.9) * 1e3, 2),
                f"{len(creations)} creator calls (want <= {wanted}), "
                f"{lock_sets / len(keys):.1f} Redis lock SETs per key",
                len(got),
            )
            records.append(
                {
                    "case": f"handoff lock {name}, {where}",
                    "median_ms": median(got) * 1e3,
                    "p90_ms": percentile(got, 0.9) * 1e3,
                    "creator_calls": len(creations),
                    "redis_lock_sets_per_key": lock_sets / len(keys),
                    "wall_ms": wall * 1e3,
                    "waiters": len(got),
                }
            )
    table.notes.append(
        f"Handoff: {hosts} simulated hosts x {per_host} processes race through the same "
        f"{len(keys)} keys in the same order; a creator takes {params.tiered_creator_ms:g} ms. "
        "The time runs from a creator's return to each waiter's get_or_create returning its "
        "value, for waiters on the creator's host and on the other hosts. With lock 'local' "
        "each host may create a key once (a host that finds another's value uses it). "
        "Redis lock SETs count every SET NX of a lock, polls included (values are written "
        "with MSET)."
    )
    return table, records


# -- outage -------------------------------------------------------------------------


def _outage(
    params: Params, server: RedisServer, workdir: str
) -> tuple[Table, list[dict[str, Any]]]:
    region = tiered_region(server.url, os.path.join(workdir, "outage"), remote_errors="degrade")
    local = make_region().configure(
        "dogpile_fsbackend.pickled", arguments={"base_dir": os.path.join(workdir, "outage-local")}
    )
    keys = [f"outage:{i}" for i in range(params.tiered_batch)]
    region.set_multi(dict.fromkeys(keys, b"x" * 100))
    local.set_multi(dict.fromkeys(keys, b"x" * 100))
    server.kill()
    samples: dict[str, list[float]] = defaultdict(list)
    try:
        region.get(keys[0])  # the call that finds Redis gone
        attempts = region.backend.guard.attempts
        for round_no in range(params.tiered_rounds):
            runners = [
                ("get during an outage (degrade)", region.get),
                ("local hit, for scale", local.get),
            ]
            for chunk_no, chunk in enumerate(chunks(range(len(keys)), 20)):
                for name, get in rotated(runners, round_no + chunk_no):
                    samples[name] += time_each(lambda i, g=get: g(keys[i]), chunk)
        probes = region.backend.guard.attempts - attempts
    finally:
        server.start()
    table = Table("", [])
    records = []
    for name, got in samples.items():
        table.add(
            name,
            "us/op",
            fmt_num(median(got) * 1e6),
            fmt_num(percentile(got, 0.9) * 1e6),
            f"{probes} Redis probes" if "outage" in name else "",
            len(got),
        )
        records.append(
            {
                "case": name,
                "median_us": median(got) * 1e6,
                "p90_us": percentile(got, 0.9) * 1e6,
                "samples": len(got),
                "probes": probes,
            }
        )
    table.notes.append(
        "Outage: Redis killed; with remote_errors='degrade' every get is served by the local "
        "tier, and Redis is probed once per back-off period (1 s, doubling) by one thread."
    )
    return table, records


if __name__ == "__main__":  # python benchmarks/tiered.py: this workload alone, quick sizes
    from common import QUICK

    with tempfile.TemporaryDirectory() as directory:
        print(tiered(QUICK, directory).table.text())
