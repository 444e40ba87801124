"""Crash safety: processes killed with SIGKILL while they set, delete or evict.

Two kinds of test:

* chosen crash points: a forked child is killed exactly when it reaches a
  given function (see ``faultkit.kill_at``) -- before the temp file is
  filled, under the shard lock before ``os.replace``, between the data file
  and the record of a raw entry, between a publish and its accounting
  update, in the middle of an eviction's pass over the entries ... -- so
  every window is hit on every run;
* random kills: several writers doing sets (pickled, raw copy, raw move),
  deletes, gets, get_or_create and evictions on overlapping keys, each killed
  after a random delay, many times, while the test reads the same keys.

Afterwards every key must return a whole value written for it, or a miss; the
next write reclaims the dead writers' temp files and recounts the accounting
by itself (``reconcile_interval`` is small here), so ``stats()`` equals the
files on disk; ``verify()`` then finds nothing left to repair.  No assertion
depends on timing: delays only randomize where the kills land.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import random
import signal
import struct
import sys
import tempfile
import time
from functools import partial

import faultkit
import pytest
from conftest import WAIT
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE

from dogpile_fsbackend.accounting import AccountingFile
from dogpile_fsbackend.eviction import Evictor
from dogpile_fsbackend.store import Store, remove_quietly

KEYS = [f"key-{i}" for i in range(24)]
RECONCILE = 0.1  # seconds: the automatic repair path is exercised, not a manual verify


def make(kind: str, base_dir: str, **arguments):
    backend = "dogpile_fsbackend.pickled" if kind == "pickled" else "dogpile_fsbackend.raw"
    arguments = {"reconcile_interval": RECONCILE, **arguments}
    if kind == "raw-move":
        arguments["file_movable"] = True
    return make_region().configure(backend, arguments={"base_dir": base_dir, **arguments})


def raw_source(staging: str, blob: bytes, how: str):
    """A raw value holding ``blob``: a real file (kernel copy), a BytesIO, or a named temp."""
    if how == "bytesio":
        return io.BytesIO(blob)
    if how == "file":
        fd, path = tempfile.mkstemp(dir=staging)
        os.write(fd, blob)
        os.close(fd)
        return open(path, "rb")
    handle = tempfile.NamedTemporaryFile(dir=staging, delete=(how == "named-autodelete"))  # noqa: SIM115
    handle.write(blob)
    handle.flush()
    handle.seek(0)
    return handle


def put(region, kind: str, staging: str, key: str, writer: int, seq: int, size: int, how=None):
    if kind == "pickled":
        region.set(key, faultkit.make_value(key, writer, seq, size))
        return
    if how is None:
        how = "named" if kind == "raw-move" else "file"
    source = raw_source(staging, faultkit.make_blob(key, writer, seq, size), how)
    with source:
        region.set(key, source)
    if how in ("file", "named"):
        remove_quietly(source.name)  # a copied (or not moved) source is ours to tidy


def problem_of(region, kind: str, key: str, writers: int | None = None) -> str | None:
    value = region.get(key)
    if value is NO_VALUE:
        return None
    if kind == "pickled":
        return faultkit.check_value(key, value, writers)
    return faultkit.check_raw_hit(key, value, writers)


def writer_of(region, kind: str, key: str):
    """The writer id of the value ``key`` returns, or None for a miss."""
    value = region.get(key)
    if value is NO_VALUE:
        return None
    if kind == "pickled":
        return value["writer"]
    return json.loads(faultkit.read_raw(value).partition(b"\n")[0])[1]


def assert_every_key_sane(region, kind: str, keys, writers: int | None = None) -> None:
    problems = [p for p in (problem_of(region, kind, key, writers) for key in keys) if p]
    assert not problems, problems


def assert_repaired_automatically(region, base_dir: str, kind: str, staging: str) -> int:
    """The next write after ``reconcile_interval`` reclaims temp files and recounts.

    Returns how many bytes the accounting was off before that write.
    """
    faultkit.wait_until_reconcile_due(region.backend)
    faultkit.age_temp_files(base_dir)  # the dead writers' locks are free: only the grace left
    drift = faultkit.disk_usage(base_dir)[0] - region.backend.stats()["bytes"]
    put(region, kind, staging, "trigger", 0, 0, 10)
    assert faultkit.temp_files(base_dir) == []
    assert faultkit.foreign_files(base_dir) == []
    stats = region.backend.stats()
    assert (stats["bytes"], stats["entries"]) == faultkit.disk_usage(base_dir)
    assert stats["bytes"] <= stats["limit"]
    report = region.backend.verify()
    assert report.accounting_drift == 0, report
    assert (report.temp_files_removed, report.orphans_removed, report.damaged_removed) == (
        0,
        0,
        0,
    ), report
    return drift


def killed_by_sigkill(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


# -- chosen crash points -------------------------------------------------------------

# (case id, kind, operation, function to die in, nth call, what the key may return)
#   "old|new": the old or the new value (a miss is also allowed for the raw move cases
#   only where stated); "old|miss" for deletes; "any" for evictions (value or miss).
CRASH_POINTS = [
    # pickled set
    ("pickled-set-before-write", "pickled", "set", os.write, 1, "old"),
    ("pickled-set-before-publish", "pickled", "set", Store.publish, 1, "old"),
    ("pickled-set-under-shard-lock", "pickled", "set", os.replace, 1, "old"),
    ("pickled-set-before-accounting", "pickled", "set", AccountingFile.add, 1, "new"),
    ("pickled-set-before-eviction-check", "pickled", "set", Evictor.after_write, 1, "new"),
    # pickled delete
    ("pickled-delete-before-unlink", "pickled", "delete", remove_quietly, 1, "old"),
    ("pickled-delete-before-accounting", "pickled", "delete", AccountingFile.add, 1, "miss"),
    # pickled eviction (the child's write crosses the limit)
    ("pickled-evict-mid-pass", "pickled", "evict", os.scandir, 3, "any"),
    ("pickled-evict-before-first-victim", "pickled", "evict", Store.discard, 1, "any"),
    ("pickled-evict-victim-unaccounted", "pickled", "evict", AccountingFile.add, 2, "any"),
    # raw set, copied
    ("raw-set-before-copy", "raw-copy", "set", os.copy_file_range, 1, "old"),
    ("raw-set-data-staged", "raw-copy", "set", Store.write_temp, 1, "old"),
    ("raw-set-before-publish", "raw-copy", "set", Store.publish, 1, "old"),
    ("raw-set-between-data-and-record", "raw-copy", "set", os.replace, 2, "old"),
    ("raw-set-before-old-data-removed", "raw-copy", "set", remove_quietly, 1, "new"),
    ("raw-set-before-accounting", "raw-copy", "set", AccountingFile.add, 1, "new"),
    # raw set, moved (rename, or hard link for a self-deleting NamedTemporaryFile)
    #   (under the shard lock, straight to the data file's name)
    ("raw-move-before-publish", "raw-move", "set", Store.publish, 1, "old"),
    ("raw-move-before-rename", "raw-move", "set", os.replace, 1, "old"),
    ("raw-move-between-data-and-record", "raw-move", "set", os.replace, 2, "old"),
    ("raw-move-before-accounting", "raw-move", "set", AccountingFile.add, 1, "new"),
    ("raw-link-before-link", "raw-link", "set", os.link, 1, "old"),
    ("raw-link-between-data-and-record", "raw-link", "set", os.replace, 1, "old"),
    ("raw-link-before-accounting", "raw-link", "set", AccountingFile.add, 1, "new"),
    # raw delete
    ("raw-delete-before-unlink", "raw-copy", "delete", remove_quietly, 1, "old"),
    ("raw-delete-record-gone-data-left", "raw-copy", "delete", remove_quietly, 2, "miss"),
    ("raw-delete-before-accounting", "raw-copy", "delete", AccountingFile.add, 1, "miss"),
    # raw eviction
    ("raw-evict-before-first-victim", "raw-copy", "evict", Store.discard, 1, "any"),
    ("raw-evict-record-gone-data-left", "raw-copy", "evict", remove_quietly, 2, "any"),
    ("raw-evict-victim-unaccounted", "raw-copy", "evict", AccountingFile.add, 2, "any"),
]


@pytest.mark.parametrize(
    ("kind", "operation", "target", "nth", "expect"),
    [pytest.param(*case[1:], id=case[0]) for case in CRASH_POINTS],
)
def test_kill_at_crash_point(tmp_path, kind, operation, target, nth, expect):
    base_dir = str(tmp_path / "cache")
    staging = str(tmp_path / "staging")
    os.mkdir(staging)
    store_kind = "raw-move" if kind == "raw-link" else kind
    region = make(store_kind, base_dir)
    for key in KEYS:
        put(region, store_kind, staging, key, 0, 0, 1500)
    old_bytes = region.backend.stats()["bytes"]
    victim_key = KEYS[5]
    how = "named-autodelete" if kind == "raw-link" else None

    def child() -> None:
        # Evictions: this process's limit is what is stored now, so one more write crosses it.
        limit = {"cache_size": old_bytes + 1000} if operation == "evict" else {}
        child_region = make(store_kind, base_dir, **limit)
        if operation == "set":
            key, writer = victim_key, 1
        else:
            key, writer = "key-new", 1
        if store_kind == "pickled":
            value = faultkit.make_value(key, writer, 0, 2500)
        else:
            source = how or ("named" if store_kind == "raw-move" else "file")
            value = raw_source(staging, faultkit.make_blob(key, writer, 0, 2500), source)
        faultkit.kill_at(target, nth)
        if operation == "delete":
            child_region.delete(victim_key)
        else:
            child_region.set(key, value)
        sys.setprofile(None)

    errors = str(tmp_path / "child-errors")
    status = faultkit.reap(faultkit.fork_child(child, errors), WAIT)
    assert not os.path.exists(errors), faultkit.read_text(errors)
    assert killed_by_sigkill(status), f"the child never reached the crash point: {status}"

    leftovers = faultkit.temp_files(base_dir)
    if target in (os.write, Store.publish, os.copy_file_range, Store.write_temp):
        assert leftovers, "a temp file was expected at this point"
    found = writer_of(region, store_kind, victim_key)
    allowed = {"old": {0}, "new": {1}, "miss": {None}, "any": {0, None}}[expect]
    assert found in allowed, (found, expect)
    assert_every_key_sane(region, store_kind, [*KEYS, "key-new"], writers=2)

    # The lock the dead child held is free again: nothing below blocks.
    assert_repaired_automatically(region, base_dir, store_kind, staging)
    assert writer_of(region, store_kind, victim_key) in allowed
    assert_every_key_sane(region, store_kind, [*KEYS, "key-new"], writers=2)


def test_creator_killed_inside_get_or_create_releases_the_key_lock(tmp_path):
    """A worker killed while it holds dogpile's lock for a key does not block the others."""
    base_dir = str(tmp_path / "cache")
    region = make("pickled", base_dir)
    read_end, write_end = os.pipe()

    def child() -> None:
        child_region = make("pickled", base_dir)

        def creator():
            os.write(write_end, b"in creator")
            time.sleep(WAIT)  # killed here, holding the key's mutex
            return faultkit.make_value("slow", 9, 0, 10)

        child_region.get_or_create("slow", creator)

    pid = faultkit.fork_child(child)
    os.close(write_end)
    assert os.read(read_end, 64) == b"in creator"  # blocks until the child holds the lock
    os.close(read_end)
    mutex = region.backend.get_mutex("slow")
    assert not mutex.acquire(wait=False)  # the child holds it
    os.kill(pid, signal.SIGKILL)
    assert killed_by_sigkill(faultkit.reap(pid, WAIT))
    assert mutex.acquire(wait=False)  # the kernel released it with the process
    mutex.release()
    value = region.get_or_create("slow", lambda: faultkit.make_value("slow", 1, 0, 10))
    assert value["writer"] == 1
    assert faultkit.temp_files(base_dir) == []


# -- random kills ---------------------------------------------------------------------

WRITERS_PER_ROUND = 4
CI_ROUNDS = 40
MAX_KILL_DELAY = 0.1  # seconds; a writer needs a few ms to start, an eviction scan a few more
LIMIT = 48 * 1024  # small: most writes end in an eviction
COUNTER = struct.Struct("<qq")  # per writer: operations started, entries evicted


def _writer_loop(kind: str, base_dir: str, staging: str, writer: int, counters) -> None:
    """Mixed operations on KEYS until killed; a bad value read raises (and is reported).

    ``counters`` (shared memory) receives this writer's operation and eviction counts.
    """
    region = make(kind, base_dir, cache_size=LIMIT)
    rnd = random.Random(writer)
    seq = 0
    sources = {"pickled": [None], "raw-copy": ["file", "bytesio"]}.get(
        kind, ["named", "named-autodelete"]
    )
    slot = COUNTER.size * writer
    while True:
        COUNTER.pack_into(counters, slot, seq, region.backend.stats()["evictions"])
        key = rnd.choice(KEYS)
        draw = rnd.random()
        seq += 1
        if draw < 0.55:
            size = rnd.randrange(100, 4000) if kind == "pickled" else rnd.randrange(0, 9000)
            put(region, kind, staging, key, writer, seq, size, rnd.choice(sources))
        elif draw < 0.65:
            region.delete(key)
        elif draw < 0.85:
            problem = problem_of(region, kind, key)
            assert problem is None, problem
        elif draw < 0.99:
            if kind == "pickled":
                value = region.get_or_create(
                    key, partial(faultkit.make_value, key, writer, seq, 300)
                )
                problem = faultkit.check_value(key, value)
            else:
                blob = faultkit.make_blob(key, writer, seq, 300)
                value = region.get_or_create(key, partial(io.BytesIO, blob))
                problem = faultkit.check_blob(key, faultkit.read_raw(value))
            assert problem is None, problem
        else:
            region.backend.prune()


@pytest.mark.parametrize("kind", ["pickled", "raw-copy", "raw-move"])
def test_random_sigkills_leave_the_cache_consistent(tmp_path, kind, soak_ops):
    base_dir = str(tmp_path / "cache")
    staging = str(tmp_path / "staging")
    os.mkdir(staging)
    errors = str(tmp_path / "writer-errors")
    region = make(kind, base_dir, cache_size=LIMIT)
    rounds = CI_ROUNDS if soak_ops is None else max(CI_ROUNDS, soak_ops // 100)
    rnd = random.Random(f"{kind}-{os.getpid()}")
    counters = mmap.mmap(-1, COUNTER.size * (rounds * WRITERS_PER_ROUND + 1))
    for key in KEYS:  # start at the limit: eviction is active from the first write
        put(region, kind, staging, key, 0, 0, 2500)
    kills = checked = 0
    next_writer = 1
    max_temps = 0
    for round_number in range(rounds):
        pids = []
        for _ in range(WRITERS_PER_ROUND):
            loop = partial(_writer_loop, kind, base_dir, staging, next_writer, counters)
            kill_time = time.monotonic() + rnd.uniform(0.002, MAX_KILL_DELAY)
            pids.append((faultkit.fork_child(loop, errors), kill_time))
            next_writer += 1
        # Read the same keys while the writers run; kill each at its random moment.
        for pid, kill_time in sorted(pids, key=lambda item: item[1]):
            while time.monotonic() < kill_time:
                key = rnd.choice(KEYS)
                problem = problem_of(region, kind, key, next_writer)
                assert problem is None, problem
                checked += 1
                time.sleep(0.002)  # leave the two cores mostly to the writers
            os.kill(pid, signal.SIGKILL)
        for pid, _ in pids:
            status = faultkit.reap(pid, WAIT)
            assert not os.path.exists(errors), faultkit.read_text(errors)
            assert killed_by_sigkill(status), status
            kills += 1
        max_temps = max(max_temps, len(faultkit.temp_files(base_dir)))
        if round_number % 10 == 9:
            assert_every_key_sane(region, kind, KEYS, next_writer)
    assert_every_key_sane(region, kind, KEYS, next_writer)
    drift = assert_repaired_automatically(region, base_dir, kind, staging)
    assert_every_key_sane(region, kind, KEYS, next_writer)
    counts = [COUNTER.unpack_from(counters, COUNTER.size * w) for w in range(next_writer)]
    print(
        f"{kind}: {kills} writers killed in {rounds} rounds after {sum(c[0] for c in counts)} "
        f"operations and {sum(c[1] for c in counts)} evictions; {checked} concurrent reads "
        f"checked; up to {max_temps} temp files left by dead writers, all reclaimed; "
        f"accounting off by {drift} bytes before the automatic repair"
    )
