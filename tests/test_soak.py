"""Soak: many processes x threads hammering overlapping keys with eviction active.

8 spawned processes x 3 threads (pickled) and 4 x 2 (raw) run a fixed number
of mixed operations -- get, set, delete, get_or_create (some with a short
expiration, so values are regenerated under dogpile's lock), get_multi,
set_multi, mutex try-locks, prune and verify -- on 64 shared keys, with a
``cache_size`` a fraction of the working set so that most writes evict.
Every value read is checked (see faultkit: key, writer, sequence, checksum).

Afterwards: zero wrong and zero torn values, no exception, the size limit
held, the accounting equal to the files on disk without any repair, no temp
file, and every worker holding exactly the descriptors it held before.

Short by default (CI); ``pytest -m soak --soak-ops 200000`` runs a long one.
"""

from __future__ import annotations

import io
import os
import queue
import random
import shutil
import tempfile
import threading
import time
import traceback

import faultkit
import pytest
from conftest import SPAWN, WAIT
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE

pytestmark = pytest.mark.soak

KEYS = [f"soak-{i}" for i in range(64)]
CI_OPS = {"pickled": 12_000, "raw": 3_000}
SHAPE = {"pickled": (8, 3), "raw": (4, 2)}  # processes, threads per process
LIMIT = {"pickled": 96 * 1024, "raw": 160 * 1024}  # well below the working set


def make(kind: str, base_dir: str):
    return make_region().configure(
        f"dogpile_fsbackend.{kind}",
        arguments={"base_dir": base_dir, "cache_size": LIMIT[kind], "reconcile_interval": 0.5},
    )


class _Tally:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.problems: list[str] = []
        self.errors: list[str] = []

    def add(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1


def _check(kind: str, key: str, value, tally: _Tally) -> None:
    if value is NO_VALUE:
        tally.add("miss")
        return
    tally.add("hit")
    if kind == "pickled":
        problem = faultkit.check_value(key, value)
    else:
        problem = faultkit.check_blob(key, faultkit.read_raw(value))
    if problem:
        tally.problems.append(problem)


def _thread_ops(kind, region, worker, thread, ops, staging, tally) -> None:
    rnd = random.Random(f"{worker}-{thread}-{os.getpid()}")
    writer = worker * 100 + thread
    source_path = os.path.join(staging, f"source-{thread}")

    def value_for(key, seq):
        size = rnd.randrange(200, 6000) if kind == "pickled" else rnd.randrange(0, 12000)
        if kind == "pickled":
            return faultkit.make_value(key, writer, seq, size)
        blob = faultkit.make_blob(key, writer, seq, size)
        if rnd.random() < 0.5:
            return io.BytesIO(blob)
        with open(source_path, "wb") as handle:
            handle.write(blob)
        return open(source_path, "rb")

    def put(key, seq):
        value = value_for(key, seq)
        try:
            region.set(key, value)
        finally:
            if kind == "raw":
                value.close()

    for seq in range(ops):
        key = rnd.choice(KEYS)
        draw = rnd.random()
        try:
            if draw < 0.33:
                tally.add("get")
                _check(kind, key, region.get(key), tally)
            elif draw < 0.58:
                tally.add("set")
                put(key, seq)
            elif draw < 0.66:
                tally.add("delete")
                region.delete(key)
            elif draw < 0.83:
                tally.add("get_or_create")
                expiration = 0.2 if rnd.random() < 0.3 else None
                value = region.get_or_create(
                    key, lambda k=key, s=seq: value_for(k, s), expiration_time=expiration
                )
                _check(kind, key, value, tally)
            elif draw < 0.89:
                tally.add("get_multi")
                keys = rnd.sample(KEYS, 4)
                for found_key, value in zip(keys, region.get_multi(keys), strict=True):
                    _check(kind, found_key, value, tally)
            elif draw < 0.93 and kind == "pickled":
                tally.add("set_multi")
                keys = rnd.sample(KEYS, 3)
                region.set_multi({k: value_for(k, seq) for k in keys})
            elif draw < 0.985:
                tally.add("mutex")
                mutex = region.backend.get_mutex(key)
                if mutex.acquire(wait=False):
                    mutex.release()
            elif draw < 0.998:
                tally.add("prune")
                region.backend.prune()
            else:
                tally.add("verify")
                report = region.backend.verify()
                if report.damaged_removed:
                    tally.problems.append(f"verify found damaged entries: {report}")
        except Exception:
            tally.errors.append(traceback.format_exc())


def soak_worker(kind, base_dir, worker, threads, ops_per_thread, start, results) -> None:
    """One process of the soak: warm up, count descriptors, run threads, count again."""
    tally = _Tally()
    staging = tempfile.mkdtemp(prefix=f"soak-{worker}-")
    try:
        region = make(kind, base_dir)
        # Warm up every code path once, so lazily opened descriptors are already open.
        warm_key = f"warm-{worker}"
        _thread_ops(kind, region, worker, 99, 40, staging, _Tally())
        region.delete(warm_key)
        fds_before = faultkit.fd_count()
        start.wait(WAIT)
        began = time.monotonic()
        workers = [
            threading.Thread(
                target=_thread_ops,
                args=(kind, region, worker, t, ops_per_thread, staging, tally),
            )
            for t in range(threads)
        ]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        elapsed = time.monotonic() - began
        fds_after = faultkit.fd_count()
        evictions = region.backend.stats()["evictions"]
    except Exception:
        tally.errors.append(traceback.format_exc())
        fds_before = fds_after = evictions = elapsed = -1
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    results.put(
        {
            "worker": worker,
            "counts": tally.counts,
            "problems": tally.problems[:20],
            "problem_count": len(tally.problems),
            "errors": tally.errors[:5],
            "error_count": len(tally.errors),
            "fds": (fds_before, fds_after),
            "evictions": evictions,
            "elapsed": elapsed,
        }
    )


@pytest.mark.parametrize("kind", ["pickled", "raw"])
def test_soak(tmp_path, kind, soak_ops):
    total_ops = soak_ops or CI_OPS[kind]
    processes, threads = SHAPE[kind]
    ops_per_thread = max(1, total_ops // (processes * threads))
    base_dir = str(tmp_path / "cache")
    region = make(kind, base_dir)  # creates the directory before the workers race
    start = SPAWN.Barrier(processes + 1)
    results = SPAWN.Queue()
    workers = [
        SPAWN.Process(
            target=soak_worker,
            args=(kind, base_dir, number, threads, ops_per_thread, start, results),
        )
        for number in range(processes)
    ]
    for process in workers:
        process.start()
    try:
        start.wait(WAIT)
        deadline = time.monotonic() + max(WAIT, total_ops / 50)
        reports = []
        for _ in workers:
            remaining = max(1.0, deadline - time.monotonic())
            try:
                reports.append(results.get(timeout=remaining))
            except queue.Empty:
                pytest.fail(f"only {len(reports)} of {processes} soak workers finished")
        for process in workers:
            process.join(WAIT)
            assert process.exitcode == 0
    finally:
        for process in workers:
            if process.is_alive():
                process.kill()
                process.join(WAIT)

    problems = [p for r in reports for p in r["problems"]]
    errors = [e for r in reports for e in r["errors"]]
    assert sum(r["problem_count"] for r in reports) == 0, problems  # no wrong, no torn value
    assert sum(r["error_count"] for r in reports) == 0, errors[0] if errors else None
    for report in reports:  # no descriptor leaked by any worker
        assert report["fds"][0] == report["fds"][1], report

    assert faultkit.temp_files(base_dir) == []
    assert faultkit.foreign_files(base_dir) == []
    on_disk = faultkit.disk_usage(base_dir)
    stats = region.backend.stats()
    assert on_disk[0] <= LIMIT[kind]  # the size limit held
    assert (stats["bytes"], stats["entries"]) == on_disk  # accounting exact, no repair
    report = region.backend.verify()
    assert report.accounting_drift == 0, report
    assert (report.temp_files_removed, report.orphans_removed, report.damaged_removed) == (
        0,
        0,
        0,
    )
    for key in KEYS:
        value = region.get(key)
        if value is not NO_VALUE:
            if kind == "pickled":
                assert faultkit.check_value(key, value) is None
            else:
                assert faultkit.check_blob(key, faultkit.read_raw(value)) is None

    counts: dict[str, int] = {}
    for r in reports:
        for name, number in r["counts"].items():
            counts[name] = counts.get(name, 0) + number
    operations = sum(v for k, v in counts.items() if k not in ("hit", "miss"))
    elapsed = max(r["elapsed"] for r in reports)
    print(
        f"\nsoak {kind}: {processes} processes x {threads} threads, {operations} operations "
        f"in {elapsed:.1f} s ({operations / elapsed:.0f}/s), {counts.get('hit', 0)} hits "
        f"checked, {sum(r['evictions'] for r in reports)} evictions, "
        f"{on_disk[1]} entries / {on_disk[0]} bytes left (limit {LIMIT[kind]}); {counts}"
    )
