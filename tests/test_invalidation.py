"""SharedInvalidation: dogpile's region invalidation, shared by every process on a directory.

* Same meaning as dogpile's ``DefaultInvalidationStrategy``: scripted and
  random sequences of invalidate / set / get / get_or_create (plain, with an
  async creation runner, without expiration_time) / get_multi /
  get_or_create_multi / delete give identical results with both strategies in
  one process, and again when every call runs in another spawned process.
* Concurrency: writers in several processes and threads never lose an
  invalidation of either kind; threads; pre-fork workers; fork() while a
  thread reads or writes.
* Nothing on disk fools it: damaged, truncated, empty, huge, foreign, newer,
  FIFO, symlinks, a directory, unreadable, deleted, read-only, times from the
  future.
* It shares base_dir with the cache without confusing it; the CLI.
* One syscall per check (strace).
"""

from __future__ import annotations

import errno
import fcntl
import gc
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

import faultkit
import pytest
from conftest import SPAWN, WAIT
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE
from dogpile.cache.exception import DogpileCacheException
from dogpile.cache.region import DefaultInvalidationStrategy

from dogpile_fsbackend import ConfigError, FSBackendError, SharedInvalidation, invalidation, layout
from dogpile_fsbackend.invalidation import (
    FORMAT_VERSION,
    RECORD_SIZE,
    InvalidationTimes,
    encode,
    read_times,
)

LOGGER = "dogpile_fsbackend.invalidation"
NOBODY = faultkit.NOBODY
KEYS = ("a", "b", "c")


def region_on(base_dir, invalidator, expiration_time=3600, **region_arguments):
    return make_region(**region_arguments).configure(
        "dogpile_fsbackend.pickled",
        expiration_time=expiration_time,
        arguments={"base_dir": str(base_dir)},
        region_invalidator=invalidator,
    )


def file_of(directory) -> str:
    return os.path.join(str(directory), layout.INVALIDATION_NAME)


def record_of(directory) -> InvalidationTimes | None:
    """The times in ``directory``'s file (None if it is not a valid record)."""
    return read_times(str(directory))[0]


# -- the same results as dogpile's default strategy -----------------------------------


def _regenerate_now(cache, key, creator, mutex):
    """An async_creation_runner that regenerates at once; get_or_create still returns
    the value it found, so a soft invalidation (old value served) and a hard one
    (regenerated first) give different results."""
    try:
        cache.set(key, creator())
    finally:
        mutex.release()


class Regions:
    """The regions one process drives, on one cache directory and one kind of strategy."""

    def __init__(self, base_dir: str, strategy) -> None:
        self.plain = region_on(base_dir, strategy())
        self.async_ = region_on(base_dir, strategy(), async_creation_runner=_regenerate_now)
        self.no_expiry = region_on(base_dir, strategy(), expiration_time=None)


def run(regions: Regions, step: int, op: tuple):
    """Do ``op`` on ``regions``; what it returned, in a form two runs can compare."""
    name, *args = op
    plain = regions.plain
    try:
        if name == "set":
            plain.set(args[0], f"{args[0]}={step}")
            return None
        if name == "get":
            return _shown(plain.get(args[0]))
        if name == "get_multi":
            return [_shown(value) for value in plain.get_multi(args[0])]
        if name == "delete":
            plain.delete(args[0])
            return None
        if name == "invalidate":
            plain.invalidate(hard=args[0])
            return None
        if name == "was":
            invalidator = plain.region_invalidator
            return invalidator.was_soft_invalidated(), invalidator.was_hard_invalidated()
        if name == "get_or_create_multi":
            return plain.get_or_create_multi(args[0], lambda *keys: [f"{k}@{step}" for k in keys])
        region = {
            "get_or_create": plain,
            "async get_or_create": regions.async_,
            "get_or_create without expiration": regions.no_expiry,
        }[name]
        return region.get_or_create(args[0], lambda: f"{args[0]}@{step}")
    except DogpileCacheException as exc:
        return f"raised {exc}"


def _shown(value):
    return "NO_VALUE" if value is NO_VALUE else value


SCRIPT = [
    ("was",),
    ("set", "a"),
    ("get", "a"),
    ("invalidate", False),
    ("was",),
    ("get", "a"),  # soft: get misses
    ("async get_or_create", "a"),  # soft: the old value is served while it regenerates
    ("get", "a"),  # the regenerated value
    ("set", "b"),
    ("invalidate", True),
    ("was",),
    ("async get_or_create", "b"),  # hard: regenerated before it returns
    ("get_or_create without expiration", "b"),  # a valid value needs no expiration
    ("set", "c"),
    ("invalidate", False),
    ("get_or_create without expiration", "c"),  # soft without expiration: dogpile raises
    ("delete", "c"),
    ("get_or_create without expiration", "c"),  # raises after creating, too
    ("invalidate", True),
    ("get_or_create without expiration", "c"),  # hard after soft: fine again
    ("set", "a"),
    ("invalidate", True),
    ("invalidate", False),  # soft after hard: the last call decides, as in dogpile
    ("async get_or_create", "a"),
    ("get_multi", ["a", "b", "c"]),
    ("get_or_create_multi", ["a", "b"]),
    ("get_or_create", "a"),
    ("delete", "a"),
    ("get", "a"),
    ("get_or_create", "a"),
    ("was",),
]


def random_script(seed: int, steps: int) -> list[tuple]:
    rng = random.Random(seed)
    ops: list[tuple] = []
    for _ in range(steps):
        pick, key = rng.random(), rng.choice(KEYS)
        if pick < 0.12:
            ops.append(("invalidate", rng.random() < 0.5))
        elif pick < 0.28:
            ops.append(("set", key))
        elif pick < 0.42:
            ops.append(("get", key))
        elif pick < 0.56:
            ops.append(("get_or_create", key))
        elif pick < 0.70:
            ops.append(("async get_or_create", key))
        elif pick < 0.76:
            ops.append(("get_or_create without expiration", key))
        elif pick < 0.83:
            ops.append(("get_multi", rng.sample(KEYS, 2)))
        elif pick < 0.90:
            ops.append(("get_or_create_multi", sorted(rng.sample(KEYS, 2))))
        elif pick < 0.96:
            ops.append(("delete", key))
        else:
            ops.append(("was",))
    return ops


def reference_regions(directory) -> Regions:
    default = DefaultInvalidationStrategy()  # one per process, shared by its regions
    return Regions(str(directory), lambda: default)


def shared_regions(directory) -> Regions:
    return Regions(str(directory), lambda: SharedInvalidation(directory))  # one per region


def test_soft_and_hard_keep_dogpiles_meaning(tmp_path):
    """The scripted sequence, with the results dogpile documents, for both strategies."""
    for regions in (reference_regions(tmp_path / "default"), shared_regions(tmp_path / "shared")):
        results = [run(regions, step, op) for step, op in enumerate(SCRIPT)]
        assert results[0] == (False, False)
        assert results[2] == "a=1"
        assert results[4] == (True, False)
        assert results[5] == "NO_VALUE"
        assert results[6] == "a=1"  # soft: old value served...
        assert results[7] == "a@6"  # ...and regenerated
        assert results[10] == (False, True)
        assert results[11] == "b@11"  # hard: regenerated first
        assert results[15].startswith("raised Non-None expiration time required")
        assert results[17].startswith("raised Non-None expiration time required")
        assert results[19] == "c@19"
        assert results[23] == "a=20"  # soft after hard: served while regenerated
        assert results[-1] == (True, False)


@pytest.mark.parametrize(
    "script",
    [SCRIPT, *(random_script(seed, 150) for seed in range(4))],
    ids=["scripted", *(f"random-{seed}" for seed in range(4))],
)
def test_same_results_as_dogpiles_default_strategy(tmp_path, script):
    reference = reference_regions(tmp_path / "default")
    shared = shared_regions(tmp_path / "shared")
    for step, op in enumerate(script):
        expected = run(reference, step, op)
        got = run(shared, step, op)
        assert got == expected, f"step {step} {op}: {got!r}, default strategy {expected!r}"


def _serve(base_dir: str, commands, results) -> None:
    """A spawned process that runs the ops it is sent on its own regions."""
    regions = shared_regions(base_dir)
    while (item := commands.get(timeout=WAIT)) is not None:
        step, op = item
        results.put((step, run(regions, step, op)))


def test_same_results_when_every_call_runs_in_another_process(tmp_path):
    """One process with the default strategy is the reference; with SharedInvalidation
    the same calls, each made by a randomly chosen one of four processes on one
    directory, return exactly the same."""
    script = SCRIPT + random_script(11, 150)
    shared_dir = str(tmp_path / "shared")
    reference = reference_regions(tmp_path / "default")
    here = shared_regions(shared_dir)
    workers = []
    try:
        for _ in range(3):
            commands, results = SPAWN.Queue(), SPAWN.Queue()
            process = SPAWN.Process(target=_serve, args=(shared_dir, commands, results))
            process.start()
            workers.append((process, commands, results))
        rng = random.Random(5)
        for step, op in enumerate(script):
            expected = run(reference, step, op)
            who = rng.randrange(len(workers) + 1)
            if who == len(workers):
                got = run(here, step, op)
            else:
                _, commands, results = workers[who]
                commands.put((step, op))
                done_step, got = results.get(timeout=WAIT)
                assert done_step == step
            assert got == expected, f"step {step} {op} in process {who}: {got!r} != {expected!r}"
    finally:
        for _, commands, _ in workers:
            commands.put(None)
        for process, _, _ in workers:
            process.join(WAIT)
            if process.is_alive():
                process.kill()
                process.join(WAIT)
    assert [process.exitcode for process, _, _ in workers] == [0, 0, 0]


# -- concurrency ----------------------------------------------------------------------


def _hammer(directory: str, mode: str, seed: int, ready, start, results) -> None:
    """Two threads write: ``merge`` of random past times of both kinds, or
    ``invalidate()`` of one kind.  Reports the largest time of each kind it
    merged, or the moment just before its last invalidate()."""
    invalidator = SharedInvalidation(directory)
    wrote = {"soft": 0, "hard": 0}
    guard = threading.Lock()
    past = time.time_ns() - 10**12

    def work(thread_seed: int) -> None:
        rng = random.Random(thread_seed)
        for _ in range(30):
            if mode == "merge":
                kind, value = rng.choice(("soft", "hard")), past + rng.randrange(10**11)
                invalidator.merge(InvalidationTimes(**{f"{kind}_ns": value}))
            else:
                kind, value = mode, time.time_ns()
                invalidator.invalidate(hard=mode == "hard")
            with guard:
                wrote[kind] = max(wrote[kind], value)

    threads = [threading.Thread(target=work, args=(seed * 10 + i,)) for i in range(2)]
    ready.put(os.getpid())
    assert start.wait(WAIT)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    results.put(wrote)


def _race(directory: str, modes: list[str]) -> list[dict]:
    ready, start, results = SPAWN.Queue(), SPAWN.Event(), SPAWN.Queue()
    processes = [
        SPAWN.Process(target=_hammer, args=(directory, mode, seed, ready, start, results))
        for seed, mode in enumerate(modes)
    ]
    for process in processes:
        process.start()
    for _ in processes:
        ready.get(timeout=WAIT)
    start.set()  # all at once: 4 processes x 2 threads
    reports = [results.get(timeout=WAIT) for _ in processes]
    for process in processes:
        process.join(WAIT)
        assert process.exitcode == 0
    return reports


def test_concurrent_writers_never_lose_an_invalidation_of_either_kind(tmp_path):
    """Each kind is a max-register updated under the lock: after 240 concurrent merges
    the file holds exactly the largest time of each kind; and soft invalidations
    racing hard ones never carry a stale time of the other kind over them."""
    directory = str(tmp_path / "merged")
    reports = _race(directory, ["merge"] * 4)
    assert record_of(directory) == InvalidationTimes(
        max(r["soft"] for r in reports), max(r["hard"] for r in reports)
    )
    directory = str(tmp_path / "invalidated")
    reports = _race(directory, ["soft", "hard", "soft", "hard"])
    times = record_of(directory)
    assert times.soft_ns >= max(r["soft"] for r in reports) > 0
    assert times.hard_ns >= max(r["hard"] for r in reports) > 0
    assert sorted(os.listdir(directory)) == [
        layout.INVALIDATION_NAME,
        layout.INVALIDATION_LOCK_NAME,
    ]


def test_merge_keeps_the_later_time_of_each_kind(tmp_path):
    invalidator = SharedInvalidation(tmp_path / "shared")
    now = time.time_ns()
    assert invalidator.merge(InvalidationTimes(soft_ns=now - 10)) == InvalidationTimes(now - 10, 0)
    assert invalidator.merge(InvalidationTimes(hard_ns=now - 20)) == InvalidationTimes(
        now - 10, now - 20
    )
    assert invalidator.merge(InvalidationTimes(now - 30, now - 30)) == InvalidationTimes(
        now - 10, now - 20
    )
    ctime = os.lstat(file_of(tmp_path / "shared")).st_ctime_ns
    invalidator.merge(InvalidationTimes(now - 30, 0))  # nothing new: the file is not rewritten
    assert os.lstat(file_of(tmp_path / "shared")).st_ctime_ns == ctime
    assert (
        invalidator.times()
        == record_of(tmp_path / "shared")
        == InvalidationTimes(now - 10, now - 20)
    )
    assert invalidator.was_soft_invalidated()
    assert not invalidator.was_hard_invalidated()
    future = invalidator.merge(InvalidationTimes(hard_ns=now + 10**15))  # a clock days ahead
    assert now <= future.hard_ns <= time.time_ns()


def test_a_get_or_create_hit_checks_once(tmp_path, monkeypatch):
    """dogpile asks is_hard_invalidated(ct), then is_soft_invalidated(ct): the second
    answer comes from the first one's check (the call is linearised there), once,
    only for the same timestamp, and only right after it.

    The window is widened to an hour, then closed, so that the fsync'd writes of
    another instance in between never decide the outcome (they can take longer
    than the real 10 ms on a busy disk)."""
    monkeypatch.setattr(invalidation, "_PAIR_NS", 3600 * 10**9)
    invalidator, other = SharedInvalidation(tmp_path), SharedInvalidation(tmp_path)
    created = time.time()
    assert not invalidator.is_hard_invalidated(created)  # no invalidation yet
    other.invalidate(hard=False)
    assert invalidator.is_soft_invalidated(created - 1)  # another timestamp: its own check
    assert not invalidator.is_hard_invalidated(created)  # soft, so not hard
    other.invalidate(hard=True)
    assert invalidator.is_soft_invalidated(created)  # the pair: from the check before
    assert not invalidator.is_soft_invalidated(created)  # used up: the hard one is seen
    monkeypatch.setattr(invalidation, "_PAIR_NS", 0)
    assert invalidator.is_hard_invalidated(created)
    other.invalidate(hard=False)
    assert invalidator.is_soft_invalidated(created)  # too late for the pair: checked again


def test_threads_see_every_invalidation_at_once(tmp_path):
    """Readers in eight threads check each value between an invalidation in another
    instance and the next one: never stale, never a spurious miss, no descriptor leaked."""
    base_dir = tmp_path / "cache"
    region = region_on(base_dir, SharedInvalidation(base_dir))
    writer = SharedInvalidation(base_dir)
    barrier = threading.Barrier(9, timeout=WAIT)
    errors: list[str] = []
    rounds = 30

    def reader() -> None:
        for round_no in range(rounds):
            barrier.wait()  # the value is set
            if region.get(f"k{round_no}") != round_no:
                errors.append(f"round {round_no}: value missing")
            barrier.wait()  # every reader has checked; now it is invalidated
            barrier.wait()
            if region.get(f"k{round_no}") is not NO_VALUE:
                errors.append(f"round {round_no}: stale value served")
            barrier.wait()

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for thread in threads:
        thread.start()
    descriptors = None
    for round_no in range(rounds):
        region.set(f"k{round_no}", round_no)
        barrier.wait()
        barrier.wait()
        writer.invalidate(hard=round_no % 2 == 0)
        barrier.wait()
        barrier.wait()
        if round_no == 1:
            descriptors = faultkit.fd_count()
    for thread in threads:
        thread.join(WAIT)
    assert errors == []
    assert faultkit.fd_count() == descriptors


def test_threads_racing_to_read_changes_keep_one_descriptor(tmp_path):
    """Many threads check while others keep replacing the file: every refresh closes
    what it replaced exactly once (a double close would hit another descriptor)."""
    directory = tmp_path / "shared"
    invalidator = SharedInvalidation(directory)
    invalidator.invalidate()
    invalidator.times()
    descriptors = faultkit.fd_count()
    stop = threading.Event()
    errors: list[BaseException] = []

    def check() -> None:
        try:
            while not stop.is_set():
                invalidator.is_hard_invalidated(time.time())
                invalidator.is_soft_invalidated(time.time())
                invalidator.was_soft_invalidated()
        except BaseException as exc:
            errors.append(exc)

    writers = [SharedInvalidation(directory) for _ in range(2)]
    readers = [threading.Thread(target=check) for _ in range(6)]
    for thread in readers:
        thread.start()
    for round_no in range(60):
        writers[round_no % 2].invalidate(hard=round_no % 3 == 0)
    stop.set()
    for thread in readers:
        thread.join(WAIT)
    assert errors == []
    assert invalidator.times() == record_of(directory)
    assert faultkit.fd_count() == descriptors


def _prefork_master(base_dir: str, results) -> None:
    """A spawned master that uses its region, then forks workers that serve commands."""
    fork = multiprocessing.get_context("fork")
    region = region_on(base_dir, SharedInvalidation(base_dir))
    region.set("a", 1)
    region.invalidate(hard=False)  # the inherited strategy holds state and a descriptor
    region.set("a", 2)
    assert region.get("a") == 2
    workers = []
    for _ in range(3):
        commands, answers = fork.Queue(), fork.Queue()

        def serve(commands=commands, answers=answers) -> None:
            while (command := commands.get(timeout=WAIT)) is not None:
                name, *args = command
                if name == "get":
                    answers.put(_shown(region.get(args[0])))
                elif name == "set":
                    region.set(*args)
                    answers.put(None)
                else:
                    region.invalidate(hard=args[0])
                    answers.put(None)

        process = fork.Process(target=serve)
        process.start()
        workers.append((process, commands, answers))

    def ask(who: int, *command):
        if who < 0:
            name, *args = command
            if name == "get":
                return _shown(region.get(args[0]))
            if name == "set":
                return region.set(*args)
            return region.invalidate(hard=args[0])
        _, commands, answers = workers[who]
        commands.put(command)
        return answers.get(timeout=WAIT)

    seen = [[ask(who, "get", "a") for who in (-1, 0, 1, 2)]]
    ask(-1, "invalidate", True)  # the master invalidates...
    seen.append([ask(who, "get", "a") for who in (-1, 0, 1, 2)])
    ask(0, "set", "a", 3)
    seen.append([ask(who, "get", "a") for who in (-1, 0, 1, 2)])
    ask(1, "invalidate", False)  # ...and a worker
    seen.append([ask(who, "get", "a") for who in (-1, 0, 1, 2)])
    ask(2, "set", "a", 4)
    seen.append([ask(who, "get", "a") for who in (-1, 0, 1, 2)])
    for process, commands, _ in workers:
        commands.put(None)
        process.join(WAIT)
        seen.append(process.exitcode)
    results.put(seen)


def test_prefork_workers_share_invalidations_with_their_master(tmp_path):
    results = SPAWN.Queue()
    master = SPAWN.Process(target=_prefork_master, args=(str(tmp_path / "cache"), results))
    master.start()
    seen = results.get(timeout=3 * WAIT)
    master.join(WAIT)
    assert master.exitcode == 0
    assert seen == [
        [2, 2, 2, 2],
        ["NO_VALUE"] * 4,
        [3, 3, 3, 3],
        ["NO_VALUE"] * 4,
        [4, 4, 4, 4],
        0,
        0,
        0,
    ]


def _fork_while_a_thread_refreshes(directory: str) -> bool:
    invalidator = SharedInvalidation(directory)
    invalidator.times()
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with invalidator._refreshing:
            holding.set()
            release.wait(WAIT)

    thread = threading.Thread(target=hold)
    thread.start()
    assert holding.wait(WAIT)

    def child() -> bool:
        SharedInvalidation(directory).invalidate()  # the file changes: a refresh is due
        return invalidator.was_hard_invalidated()  # needs the lock the thread held

    try:
        return faultkit.in_child(child, timeout=WAIT / 3)  # well before the outer child dies
    finally:
        release.set()
        thread.join(WAIT)


def test_fork_while_another_thread_refreshes(tmp_path):
    assert faultkit.in_child(_fork_while_a_thread_refreshes, str(tmp_path / "shared"))


def _fork_while_a_thread_writes(directory: str) -> dict:
    """A thread is inside invalidate()'s locked section when another thread forks.

    The fork must wait for it: a child forked meanwhile would inherit the locked
    descriptor and keep every writer out for as long as it lives.
    """
    invalidator = SharedInvalidation(directory)
    invalidator.invalidate()
    inside, go = threading.Event(), threading.Event()
    write = invalidator._write

    def slow_write(*args):
        inside.set()
        assert go.wait(WAIT)
        write(*args)

    invalidator._write = slow_write
    writer = threading.Thread(target=invalidator.invalidate)
    writer.start()
    assert inside.wait(WAIT)
    lock_path = os.path.join(directory, layout.INVALIDATION_LOCK_NAME)

    def child_body() -> None:
        # A descriptor inherited while locked would keep the lock for the child's life.
        fd = os.open(lock_path, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    pids: list[int] = []
    forker = threading.Thread(target=lambda: pids.append(faultkit.fork_child(child_body)))
    forker.start()
    deadline = time.monotonic() + WAIT
    while not pids and not _waits_in(forker, "_before_fork"):
        assert time.monotonic() < deadline, "fork neither waited nor happened"
        time.sleep(0.001)
    waited = not pids
    go.set()
    writer.join(WAIT)
    forker.join(WAIT)
    return {"waited": waited, "child": faultkit.reap(pids[0], WAIT)}


def _waits_in(thread: threading.Thread, function: str) -> bool:
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def test_fork_waits_for_a_writer_holding_the_lock(tmp_path):
    outcome = faultkit.in_child(_fork_while_a_thread_writes, str(tmp_path / "shared"))
    assert outcome == {"waited": True, "child": 0}


def _fork_while_a_writer_waits_for_another_process(directory: str) -> dict:
    invalidator = SharedInvalidation(directory)
    invalidator.invalidate()
    lock_fd = os.open(os.path.join(directory, layout.INVALIDATION_LOCK_NAME), os.O_RDONLY)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)  # as if another process were writing
    writer = threading.Thread(target=invalidator.invalidate, kwargs={"hard": False})
    writer.start()
    deadline = time.monotonic() + WAIT
    while not _waits_in(writer, "_locked"):
        assert time.monotonic() < deadline, "the writer never tried the lock"
        time.sleep(0.001)
    try:
        forked = faultkit.in_child(os.getpid, timeout=WAIT / 3)  # must not wait for it
    finally:
        os.close(lock_fd)
    writer.join(WAIT)
    return {"forked": forked != os.getpid(), "written": invalidator.was_soft_invalidated()}


def test_fork_never_waits_for_another_process_writing(tmp_path):
    outcome = faultkit.in_child(
        _fork_while_a_writer_waits_for_another_process, str(tmp_path / "shared")
    )
    assert outcome == {"forked": True, "written": True}


# -- nothing on disk fools it -----------------------------------------------------------


def _valid_record(soft_ns: int = 0, hard_ns: int = 0) -> bytes:
    return encode(InvalidationTimes(soft_ns, hard_ns))


def _bit_flipped(path: str, outside: str) -> None:
    data = bytearray(_valid_record(time.time_ns() - 10**9))
    data[15] ^= 0x10
    _write(path, bytes(data))


def _huge(path: str, outside: str) -> None:
    _write(path, _valid_record(time.time_ns() - 10**9))
    os.truncate(path, 1 << 40)  # sparse: a terabyte that must never be read


def _newer(path: str, outside: str) -> None:
    head = b"dpfsinv\n" + (FORMAT_VERSION + 1).to_bytes(2, "big")
    _write(path, head + bytes(RECORD_SIZE + 8 - len(head)))


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


def _symlink_to_a_valid_record(path: str, outside: str) -> None:
    _write(outside, _valid_record())  # no invalidation at all: followed, it would revive
    os.symlink(outside, path)


# name -> (plant(path, outside), rewritten by a reader, what a reader reports)
FAULTS = {
    "bit flip": (_bit_flipped, True, "checksum mismatch"),
    "truncated": (
        lambda path, outside: _write(path, _valid_record(time.time_ns())[:10]),
        True,
        "truncated or damaged (10 bytes",
    ),
    "empty": (lambda path, outside: _write(path, b""), True, "truncated or damaged (0 bytes"),
    "huge": (_huge, True, f"truncated or damaged ({1 << 40} bytes"),
    "foreign": (
        lambda path, outside: _write(path, b"my shopping list\n"),
        False,
        "is not a dogpile_fsbackend invalidation file",
    ),
    "newer format": (_newer, False, f"format version {FORMAT_VERSION + 1}"),
    "FIFO": (lambda path, outside: os.mkfifo(path), True, "is a FIFO"),
    "symlink to a valid record": (_symlink_to_a_valid_record, True, "is a symlink"),
    "symlink to /dev/zero": (lambda path, outside: os.symlink("/dev/zero", path), True, "symlink"),
    "dangling symlink": (lambda path, outside: os.symlink(outside, path), True, "symlink"),
    "directory": (lambda path, outside: os.mkdir(path), False, "is a directory"),
}


def _fault_scenario(base_dir: str, outside: str, fault: str) -> dict:
    plant = FAULTS[fault][0]
    region = region_on(base_dir, SharedInvalidation(base_dir))
    region.invalidate(hard=False)
    region.set("old", "old")
    assert region.get("old") == "old"
    path = file_of(base_dir)
    os.unlink(path)
    plant(path, outside)
    planted = os.lstat(path)
    outcome = {"old": _shown(region.get("old"))}  # a hard invalidation as of now
    outcome["regenerated"] = region.get_or_create("old", lambda: "new")
    outcome["stays"] = [region.get("old"), region.get("old")]  # not invalidated again
    outcome["hard"] = region.region_invalidator.was_hard_invalidated()
    after = os.lstat(path)
    outcome["rewritten"] = stat.S_ISREG(after.st_mode) and record_of(base_dir) is not None
    outcome["untouched"] = (after.st_ino, after.st_mode) == (planted.st_ino, planted.st_mode)
    later = region_on(base_dir, SharedInvalidation(base_dir))  # a process started now
    outcome["later process"] = _shown(later.get("old"))
    try:
        region.invalidate()
        outcome["invalidate"] = "ok"
    except FSBackendError as exc:
        outcome["invalidate"] = str(exc)
    outcome["honoured anyway"] = _shown(region.get("old"))
    return outcome


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_damaged_or_planted_file_is_a_hard_invalidation_now(tmp_path, caplog, fault):
    """Never a crash, a hang or a revived value: a hard invalidation from the moment it
    is seen, logged once.  What is ours to replace is rewritten, so later processes
    agree; what is not (foreign, newer, a directory) is left alone, and writing refuses."""
    _, rewritten, reported = FAULTS[fault]
    base_dir, outside = str(tmp_path / "cache"), str(tmp_path / "outside-target")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    outcome = faultkit.run_bounded(_fault_scenario, base_dir, outside, fault)
    assert outcome["old"] == "NO_VALUE"
    assert outcome["regenerated"] == "new"
    assert outcome["stays"] == ["new", "new"]
    assert outcome["hard"] is True
    assert outcome["honoured anyway"] == "NO_VALUE"
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any(file_of(base_dir) in w and reported in w for w in warnings), warnings
    if rewritten:
        assert outcome["rewritten"]
        assert outcome["later process"] == "new"  # it honours what the first reader wrote
        assert outcome["invalidate"] == "ok"
    else:
        assert outcome["untouched"]
        assert outcome["later process"] == "NO_VALUE"  # its own first sight of it
        assert file_of(base_dir) in outcome["invalidate"]
        assert "move it away" in outcome["invalidate"]
    if fault == "symlink to a valid record":
        with open(outside, "rb") as target:
            assert target.read() == _valid_record()  # the target is never written
    if fault == "foreign":
        with open(file_of(base_dir), "rb") as planted:
            assert planted.read() == b"my shopping list\n"


def test_a_deleted_file_is_written_back_by_a_process_that_honours_it(tmp_path, caplog):
    """A tmp cleaner or an ``rm``: running processes keep honouring the invalidation and
    write it back, so a process started later does not revive old values."""
    base_dir = tmp_path / "cache"
    region = region_on(base_dir, SharedInvalidation(base_dir))
    region.set("old", "old")
    region.invalidate()
    region.set("new", "new")
    honoured = region.region_invalidator.times()
    os.unlink(file_of(base_dir))
    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert (region.get("old"), region.get("new")) == (NO_VALUE, "new")
    assert record_of(base_dir) == honoured
    assert any("rewritten" in r.getMessage() for r in caplog.records)
    later = region_on(base_dir, SharedInvalidation(base_dir))
    assert (later.get("old"), later.get("new")) == (NO_VALUE, "new")


def test_a_deleted_file_never_makes_a_reader_wait_for_the_lock(tmp_path):
    base_dir = tmp_path / "cache"
    region = region_on(base_dir, SharedInvalidation(base_dir))
    region.set("old", "old")
    region.invalidate()
    lock_fd = os.open(os.path.join(base_dir, layout.INVALIDATION_LOCK_NAME), os.O_RDONLY)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # another writer, stuck
        os.unlink(file_of(base_dir))
        assert region.get("old") is NO_VALUE  # at once: the open never waits for the holder
        assert not os.path.exists(file_of(base_dir))  # left for the writer
    finally:
        os.close(lock_fd)


def test_a_writer_stopped_holding_the_lock_costs_a_bounded_wait_and_a_clear_error(
    tmp_path, monkeypatch
):
    """Another process takes invalidation.lock and is stopped (SIGSTOP): an invalidation
    waits ``LOCK_WAIT``, then raises naming the lock file (this process honours it, the
    others never saw it); once the holder is gone the next one reaches every process."""
    base_dir = tmp_path / "cache"
    region = region_on(base_dir, SharedInvalidation(base_dir))
    region.set("k", "v")
    region.invalidate()  # creates the lock file
    region.set("k", "v2")
    lock_path = os.path.join(base_dir, layout.INVALIDATION_LOCK_NAME)
    with faultkit.stopped_flock_holder(lock_path):
        monkeypatch.setattr(invalidation, "LOCK_WAIT", 0.5)
        started = time.monotonic()
        with pytest.raises(FSBackendError, match=re.escape(lock_path)):
            region.invalidate(hard=False)
        assert time.monotonic() - started < WAIT  # bounded, not a hang
        assert region.get("k") is NO_VALUE  # this process honours it all the same
        other = region_on(base_dir, SharedInvalidation(base_dir))
        assert other.get("k") == "v2"  # the others never heard of it
        assert not other.region_invalidator.was_soft_invalidated()
    region.invalidate(hard=False)
    assert other.get("k") is NO_VALUE
    assert SharedInvalidation(base_dir).was_soft_invalidated()


def test_a_time_from_the_future_counts_as_now(tmp_path, caplog):
    """A record from a clock a year ahead must not invalidate every value until then."""
    base_dir = tmp_path / "cache"
    region = region_on(base_dir, SharedInvalidation(base_dir))
    region.set("old", "old")
    year = 365 * 24 * 3600 * 10**9
    _write(file_of(base_dir), _valid_record(hard_ns=time.time_ns() + year))
    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert region.get("old") is NO_VALUE
    region.set("new", "new")
    assert region.get("new") == "new"  # created after "now", not after next year
    assert region.region_invalidator.times().hard_ns <= time.time_ns()
    assert any("future" in r.getMessage() for r in caplog.records)
    assert record_of(base_dir).hard_ns <= time.time_ns()  # written down as now
    later = region_on(base_dir, SharedInvalidation(base_dir))
    assert (later.get("old"), later.get("new")) == (NO_VALUE, "new")


def test_a_clock_stepped_back_leaves_no_time_in_the_future(tmp_path, monkeypatch):
    """A process invalidated, then the clock was stepped back an hour (NTP, a VM
    resumed).  Its next write must not put that time, now in the future, back into
    the file (every other process would take it as a new invalidation "now"), and
    once it has written, it too honours the time only as of now, as dogpile's
    default strategy forgets the earlier call.  The step is simulated by the clock
    this process reads during its first invalidate(): the machine's clock is shared."""
    directory = tmp_path / "shared"
    running = SharedInvalidation(directory)
    real_time_ns = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real_time_ns() + 3600 * 10**9)
    running.invalidate()  # hard, an hour "ahead" of the clock as it is after the step
    monkeypatch.undo()
    assert SharedInvalidation(directory).times().hard_ns <= time.time_ns()  # as of now
    merged = running.merge(InvalidationTimes(soft_ns=time.time_ns()))
    assert merged.latest_ns <= time.time_ns()
    assert record_of(directory).latest_ns <= time.time_ns()
    running.invalidate(hard=False)
    assert record_of(directory).latest_ns <= time.time_ns()
    assert running.times().latest_ns <= time.time_ns()  # it read what it wrote
    assert not running.is_invalidated(time.time())  # so a value made now is valid


def _unreadable_as_nobody(base_dir: str) -> dict:
    region = region_on(base_dir, SharedInvalidation(base_dir))
    region.invalidate(hard=False)
    region.set("old", "old")
    os.chmod(file_of(base_dir), 0)  # its owner may not read it now
    outcome = {"old": _shown(region.get("old"))}
    region.set("new", "new")
    outcome["new"] = region.get("new")
    outcome["mode"] = stat.S_IMODE(os.stat(file_of(base_dir)).st_mode)
    outcome["later"] = _shown(region_on(base_dir, SharedInvalidation(base_dir)).get("new"))
    return outcome


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user")
def test_an_unreadable_file_is_a_hard_invalidation_now():
    with faultkit.nobody_dir("unreadable") as top:
        outcome = faultkit.in_child_as_nobody(_unreadable_as_nobody, os.path.join(top, "cache"))
    assert outcome == {"old": "NO_VALUE", "new": "new", "mode": 0o600, "later": "new"}


def _hold_a_write_lease(path: str, ready, done) -> None:
    """Put a valid record at ``path`` that another process holds a write lease on.

    An open of a leased file waits for the holder to give the lease up (45 s by
    default), or with O_NONBLOCK fails at once with EWOULDBLOCK.  The holder ignores
    the SIGIO that tells it to let go, as a stuck or hostile holder would.
    """
    signal.signal(signal.SIGIO, signal.SIG_IGN)
    planted = path + ".planted"
    fd = os.open(planted, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, _valid_record(time.time_ns() - 10**9))
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        except OSError as exc:
            ready.put(f"no lease here ({exc.strerror})")
            return
        os.replace(planted, path)
        ready.put(None)
        done.wait(WAIT)
    finally:
        os.close(fd)


def test_a_leased_file_is_a_hard_invalidation_not_an_error(tmp_path, caplog):
    """A file that another process holds a write lease on cannot be opened for now:
    that is an unknown state (a hard invalidation now), never an exception from get()."""
    base_dir = str(tmp_path / "cache")
    region = region_on(base_dir, SharedInvalidation(base_dir))
    region.invalidate(hard=False)
    region.set("old", "old")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    ready, done = SPAWN.Queue(), SPAWN.Event()
    holder = SPAWN.Process(target=_hold_a_write_lease, args=(file_of(base_dir), ready, done))
    holder.start()
    try:
        problem = ready.get(timeout=WAIT)
        if problem:
            pytest.skip(problem)
        assert region.get("old") is NO_VALUE  # at once: the open never waits for the holder
        assert region.get_or_create("old", lambda: "new") == "new"
        assert region.get("old") == "new"
    finally:
        done.set()
        holder.join(WAIT)
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any(file_of(base_dir) in w and "cannot be opened" in w for w in warnings), warnings


def _read_only_child(base_dir: str, region, old_ct: float, new_ct: float) -> dict:
    fresh = SharedInvalidation(base_dir)  # a process that starts on the read-only mount
    outcome = {"fresh": (fresh.is_invalidated(old_ct), fresh.is_invalidated(new_ct))}
    outcome["running"] = (_shown(region.get("old")), _shown(region.get("new")))
    try:
        region.invalidate()
    except OSError as exc:
        outcome["invalidate"] = errno.errorcode[exc.errno]
    outcome["honoured anyway"] = _shown(region.get("new"))
    return outcome


def test_read_only_filesystem(tmp_path):
    """Readers never write; invalidate() raises EROFS, and this process honours it."""
    base_dir = str(tmp_path / "cache")
    region = region_on(base_dir, SharedInvalidation(base_dir))
    region.set("old", "old")
    region.invalidate()
    region.set("new", "new")
    old_ct, new_ct = (
        region.get_value_metadata(k, ignore_expiration=True).metadata["ct"] for k in ("old", "new")
    )
    with faultkit.mounted("--bind", base_dir, target=base_dir):
        problem = faultkit.try_mount("-o", "remount,bind,ro", base_dir)
        if problem:
            pytest.skip(problem)
        # A child does the work: no descriptor of it keeps the mount busy afterwards.
        outcome = faultkit.in_child(_read_only_child, base_dir, region, old_ct, new_ct)
    assert outcome == {
        "fresh": (True, False),
        "running": ("NO_VALUE", "new"),
        "invalidate": "EROFS",
        "honoured anyway": "NO_VALUE",
    }


def test_a_failed_write_leaves_no_descriptor_open(tmp_path, monkeypatch):
    """A filesystem that cannot hold the mode (vfat refuses such a chmod with EPERM):
    each invalidate() raises the error, and leaks nothing while doing so."""

    def refuse(fd, mode):
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    invalidator = SharedInvalidation(tmp_path / "shared")
    invalidator.times()
    gc.collect()  # what earlier tests dropped must not close its descriptors meanwhile
    gc.disable()
    try:
        descriptors = faultkit.fd_count()
        monkeypatch.setattr(os, "fchmod", refuse)
        for _ in range(3):  # the first call creates the lock file, the others find it
            with pytest.raises(PermissionError):
                invalidator.invalidate()
        monkeypatch.undo()
        assert faultkit.fd_count() == descriptors
    finally:
        gc.enable()
    assert invalidator.was_hard_invalidated()  # honoured here all the same
    assert os.listdir(tmp_path / "shared") == [layout.INVALIDATION_LOCK_NAME]


# -- sharing base_dir with the cache ------------------------------------------------------


def test_the_cache_never_touches_the_invalidation_files(tmp_path):
    base_dir = tmp_path / "cache"
    region = region_on(base_dir, SharedInvalidation(base_dir))
    region.invalidate(hard=False)
    for i in range(20):
        region.set(f"k{i}", i)
    recorded = record_of(base_dir)
    report = region.backend.verify()
    assert (report.damaged_removed, report.orphans_removed, report.temp_files_removed) == (0, 0, 0)
    region.backend.prune()
    assert region.backend.clear().removed == 20
    assert record_of(base_dir) == recorded
    assert set(os.listdir(base_dir)) == {
        layout.MARKER_NAME,
        layout.LOCK_NAME,
        layout.ACCOUNTING_NAME,
        layout.MAINTENANCE_LOCK_NAME,
        layout.DATA_DIR,
        layout.INVALIDATION_NAME,
        layout.INVALIDATION_LOCK_NAME,
    }
    assert region_on(base_dir, SharedInvalidation(base_dir)).region_invalidator.times() == recorded


def test_nothing_is_created_before_the_first_invalidation(tmp_path):
    """So the backend creates base_dir with its own modes, and the files follow them."""
    base_dir = tmp_path / "cache"
    invalidator = SharedInvalidation(base_dir)
    assert not invalidator.is_invalidated(time.time())
    assert not base_dir.exists()
    region = make_region().configure(
        "dogpile_fsbackend.pickled",
        arguments={"base_dir": str(base_dir), "dir_mode": 0o750, "file_mode": 0o640},
        region_invalidator=invalidator,
    )
    assert stat.S_IMODE(base_dir.stat().st_mode) == 0o750
    region.invalidate()
    for name in (layout.INVALIDATION_NAME, layout.INVALIDATION_LOCK_NAME):
        assert stat.S_IMODE((base_dir / name).stat().st_mode) == 0o640


def test_one_directory_shared_by_several_regions(tmp_path):
    """A directory that is not a cache: created on the first invalidation, shared by
    regions on different caches (and backends)."""
    shared = tmp_path / "shared" / "invalidation-dir"
    one = region_on(tmp_path / "one", SharedInvalidation(shared))
    two = make_region().configure(
        "dogpile.cache.memory", expiration_time=3600, region_invalidator=SharedInvalidation(shared)
    )
    one.set("k", 1)
    two.set("k", 2)
    assert not shared.exists()
    one.invalidate()
    assert (one.get("k"), two.get("k")) == (NO_VALUE, NO_VALUE)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o700
    assert stat.S_IMODE((shared / layout.INVALIDATION_NAME).stat().st_mode) == 0o600
    assert sorted(os.listdir(shared)) == [layout.INVALIDATION_NAME, layout.INVALIDATION_LOCK_NAME]


def test_bad_arguments_name_the_argument(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for arguments, name in (
        ({"directory": a_file}, "directory"),
        ({"directory": 42}, "directory"),
        ({"directory": ""}, "directory"),
        ({"directory": tmp_path, "file_mode": "rwx"}, "file_mode"),
        ({"directory": tmp_path, "dir_mode": 0o1000}, "dir_mode"),
    ):
        with pytest.raises(ConfigError) as info:
            SharedInvalidation(**arguments)
        assert info.value.argument == name
    with pytest.raises(ConfigError) as info:
        InvalidationTimes(soft_ns=-1)
    assert info.value.argument == "soft_ns"
    assert SharedInvalidation(tmp_path, file_mode="640").file_mode == 0o640


# -- the command line -------------------------------------------------------------------


def test_cli_invalidate_reaches_running_processes(tmp_path):
    base_dir = str(tmp_path / "cache")
    region = region_on(base_dir, SharedInvalidation(base_dir))
    stale = region_on(
        base_dir, SharedInvalidation(base_dir), async_creation_runner=_regenerate_now
    )
    region.set("k", "old")
    assert "invalidated never" in faultkit.run_cli("stats", base_dir).stdout
    done = faultkit.run_cli("invalidate", base_dir)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"soft invalidation of {base_dir} at ")
    assert region.get("k") is NO_VALUE
    assert stale.get_or_create("k", lambda: "new") == "old"  # soft: served while regenerated
    assert region.get("k") == "new"
    done = faultkit.run_cli("invalidate", base_dir, "--hard", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    times = record_of(base_dir)
    assert data == {
        "directory": base_dir,
        "kind": "hard",
        "invalidated_at": times.hard_at,
        "soft_invalidated": times.soft_at,
        "hard_invalidated": times.hard_at,
        "invalidation_problem": None,
    }
    assert stale.get_or_create("k", lambda: "newer") == "newer"  # hard: regenerated first
    stats = json.loads(faultkit.run_cli("stats", base_dir, "--json").stdout)
    assert (stats["soft_invalidated"], stats["hard_invalidated"]) == (times.soft_at, times.hard_at)
    text = faultkit.run_cli("stats", base_dir).stdout.splitlines()[-1]
    assert text.startswith("invalidated hard 20") and "; soft 20" in text


def test_cli_invalidate_of_a_directory_that_is_not_a_cache(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    region = region_on(tmp_path / "cache", SharedInvalidation(shared))
    region.set("k", 1)
    assert faultkit.run_cli("invalidate", str(shared), "--hard").returncode == 0
    assert region.get("k") is NO_VALUE
    assert sorted(os.listdir(shared)) == [layout.INVALIDATION_NAME, layout.INVALIDATION_LOCK_NAME]


def test_cli_invalidate_refuses_what_it_must_not_touch(tmp_path):
    missing, a_file, foreign = tmp_path / "missing", tmp_path / "file", tmp_path / "foreign"
    a_file.write_text("x")
    for path in (missing, a_file):
        done = faultkit.run_cli("invalidate", str(path))
        assert done.returncode == 2
        assert str(path) in done.stderr
    assert not missing.exists()  # a mistyped path is not created
    foreign.mkdir()
    (foreign / layout.INVALIDATION_NAME).write_text("someone else's\n")
    done = faultkit.run_cli("invalidate", str(foreign))
    assert done.returncode == 1
    assert file_of(foreign) in done.stderr
    assert (foreign / layout.INVALIDATION_NAME).read_text() == "someone else's\n"
    stats = faultkit.run_cli("stats", str(foreign))
    assert stats.returncode == 2  # not a cache: stats refuses it as before


def _set_as_nobody(base_dir: str) -> None:
    region_on(base_dir, SharedInvalidation(base_dir)).set("k", 1)


def _app_as_nobody(base_dir: str) -> dict:
    region = region_on(base_dir, SharedInvalidation(base_dir))
    outcome = {"after root": _shown(region.get("k"))}
    region.invalidate(hard=False)  # the app can still write: the files are its own
    outcome["own"] = region.region_invalidator.was_soft_invalidated()
    return outcome


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user")
def test_root_running_the_cli_leaves_files_the_application_can_use():
    with faultkit.nobody_dir("root-cli") as top:
        base_dir = os.path.join(top, "cache")
        faultkit.in_child_as_nobody(_set_as_nobody, base_dir)  # the application's cache
        # sudo, after a deploy:
        assert faultkit.run_cli("invalidate", base_dir, "--hard").returncode == 0
        for name in (layout.INVALIDATION_NAME, layout.INVALIDATION_LOCK_NAME):
            info = os.stat(os.path.join(base_dir, name))
            assert (info.st_uid, info.st_gid) == (NOBODY, NOBODY)
        outcome = faultkit.in_child_as_nobody(_app_as_nobody, base_dir)
    assert outcome == {"after root": "NO_VALUE", "own": True}


# -- cost: one syscall per check ----------------------------------------------------------

_COUNTED = """
import sys
from dogpile.cache import make_region
from dogpile_fsbackend import SharedInvalidation
strategy, op, count, base_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
options = {"region_invalidator": SharedInvalidation(base_dir)} if strategy != "default" else {}
region = make_region().configure(
    "dogpile_fsbackend.pickled", expiration_time=3600, arguments={"base_dir": base_dir}, **options
)
if strategy == "shared, invalidated":
    region.invalidate()
region.set("k", "v")
call = region.get if op == "get" else lambda key: region.get_or_create(key, lambda: "x")
for _ in range(100):
    call("k")
for _ in range(count):
    call("k")
"""


def count_syscalls(strategy: str, op: str, count: int, workdir: str) -> dict[str, int]:
    """Calls per syscall (and ``total``) of a child making ``count`` hits (plus set-up)."""
    base_dir = tempfile.mkdtemp(dir=workdir)
    out = os.path.join(base_dir, "strace.out")
    arguments = (strategy, op, str(count), base_dir)
    subprocess.run(
        ["strace", "-f", "-c", "-o", out, sys.executable, "-B", "-c", _COUNTED, *arguments],
        check=True,
        timeout=WAIT,
        capture_output=True,
    )
    calls = {}
    with open(out) as summary:
        for line in summary:
            fields = line.split()
            if len(fields) >= 5 and fields[3].isdigit():
                calls[fields[-1]] = int(fields[3])
    return calls


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
@pytest.mark.parametrize("op", ["get", "get_or_create"])
def test_a_hit_costs_one_more_syscall_than_with_the_default_strategy(tmp_path, op):
    if subprocess.run(["strace", "-o", "/dev/null", "true"], check=False).returncode:
        pytest.skip("strace may not trace here (ptrace is restricted)")
    few, many = 500, 2500
    # The first child fills caches that later ones only read (stevedore's entry points).
    subprocess.run([sys.executable, "-c", _COUNTED, "default", op, "0", str(tmp_path)], check=True)
    per_hit = {}
    for strategy in ("default", "shared, never invalidated", "shared, invalidated"):
        small, large = (count_syscalls(strategy, op, n, str(tmp_path)) for n in (few, many))
        per_hit[strategy] = {
            name: (large.get(name, 0) - small.get(name, 0)) / (many - few)
            for name in {*small, *large}
            if large.get(name, 0) != small.get(name, 0)
        }
    for strategy in ("shared, never invalidated", "shared, invalidated"):
        added = per_hit[strategy]["total"] - per_hit["default"]["total"]
        assert added == pytest.approx(1, abs=0.05), per_hit
