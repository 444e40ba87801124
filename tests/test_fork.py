"""Pre-fork servers and threads: one cache object created before fork(), used after.

* gunicorn/celery style: a master configures the region and uses it, then
  forks workers that each run several threads; get_or_create runs every
  creator exactly once across all of them, and every value read is whole.
* fork() while other threads of the parent are inside the cache (holding
  thread locks, shard locks, the eviction lock): the children never deadlock
  on state copied from those threads.
* A child does not inherit the parent's locks: what the parent holds, the
  child waits for; what the parent releases, the child gets.
* Many threads in one process: one creation per key, mutexes exclusive.

Masters run in spawned processes (a clean interpreter) and fork from there;
every wait is bounded, and a deadlocked child is killed and reported.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import random
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import faultkit
import pytest
from conftest import SPAWN, WAIT
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE

KEYS = [f"fork-{i}" for i in range(24)]
CHILD_ALARM = 30  # seconds: a forked child still running then is deadlocked


def make(kind: str, base_dir: str, **arguments):
    return make_region().configure(
        f"dogpile_fsbackend.{kind}", arguments={"base_dir": base_dir, **arguments}
    )


def _creator(kind: str, key: str, writer: int, log_path: str):
    def create():
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{key}\n".encode())  # one short O_APPEND write: atomic
        finally:
            os.close(fd)
        time.sleep(0.005)  # widen the window in which others would create too
        if kind == "pickled":
            return faultkit.make_value(key, writer, 0, 500)
        return io.BytesIO(faultkit.make_blob(key, writer, 0, 500))

    return create


def _check(kind: str, key: str, value) -> str | None:
    if value is NO_VALUE:
        return f"{key}: get_or_create returned NO_VALUE"
    if kind == "pickled":
        return faultkit.check_value(key, value)
    return faultkit.check_blob(key, faultkit.read_raw(value))


def _run_in_spawned(target, *args):
    """Run ``target(*args, results)`` in a spawned process; its one result, bounded."""
    results = SPAWN.Queue()
    process = SPAWN.Process(target=target, args=(*args, results))
    process.start()
    try:
        outcome = results.get(timeout=3 * WAIT)
        process.join(WAIT)
        assert process.exitcode == 0
    finally:
        if process.is_alive():
            process.kill()
            process.join(WAIT)
    return outcome


# -- pre-fork workers --------------------------------------------------------------------


def _worker_threads(kind, region, worker, threads, log_path) -> list[str]:
    problems: list[str] = []
    start = threading.Barrier(threads)

    def run(thread: int) -> None:
        try:
            start.wait(WAIT)
            keys = random.Random(f"{worker}-{thread}").sample(KEYS, len(KEYS))
            for key in keys:
                creator = _creator(kind, key, worker * 100 + thread, log_path)
                problem = _check(kind, key, region.get_or_create(key, creator))
                if problem:
                    problems.append(problem)
        except Exception:
            problems.append(traceback.format_exc())

    pool = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return problems


def prefork_master(kind, base_dir, log_path, workers, threads, results) -> None:
    """Configure and use the region, then fork workers that share it (like gunicorn)."""
    try:
        region = make(kind, base_dir)
        if kind == "pickled":
            region.set("warm", faultkit.make_value("warm", 0, 0, 10))
        else:
            region.set("warm", io.BytesIO(b"warm"))
        faultkit.read_raw(region.get("warm")) if kind == "raw" else region.get("warm")
        mutex = region.backend.get_mutex("warm")
        mutex.acquire()
        mutex.release()
        problem_files = []
        pids = []
        for worker in range(workers):
            problem_file = f"{log_path}.problems-{worker}"
            problem_files.append(problem_file)

            def body(worker=worker, problem_file=problem_file) -> None:
                signal.alarm(CHILD_ALARM)
                problems = _worker_threads(kind, region, worker, threads, log_path)
                if problems:
                    with open(problem_file, "w") as handle:
                        handle.write("\n".join(problems))
                    raise AssertionError("problems")

            pids.append(faultkit.fork_child(body))
        statuses = [faultkit.reap(pid, WAIT) for pid in pids]
        problems = [faultkit.read_text(path) for path in problem_files if os.path.exists(path)]
        results.put({"statuses": statuses, "problems": problems})
    except Exception:
        results.put({"statuses": [], "problems": [traceback.format_exc()]})


@pytest.mark.parametrize("kind", ["pickled", "raw"])
def test_prefork_workers_create_each_value_exactly_once(tmp_path, kind):
    base_dir = str(tmp_path / "cache")
    log_path = str(tmp_path / "creations")
    outcome = _run_in_spawned(prefork_master, kind, base_dir, log_path, 4, 4)
    assert outcome["problems"] == []
    assert outcome["statuses"] == [0] * 4
    with open(log_path) as handle:
        created = handle.read().split()
    assert sorted(created) == sorted(KEYS)  # 4 processes x 4 threads, one creator per key
    region = make(kind, base_dir)
    for key in KEYS:
        assert _check(kind, key, region.get(key)) is None


# -- fork while other threads are inside the cache -------------------------------------


def _hammer(region, stop: threading.Event, errors: list, thread: int) -> None:
    rnd = random.Random(thread)
    seq = 0
    while not stop.is_set():
        key = rnd.choice(KEYS)
        seq += 1
        try:
            draw = rnd.random()
            if draw < 0.4:
                region.set(key, faultkit.make_value(key, thread, seq, rnd.randrange(100, 3000)))
            elif draw < 0.7:
                value = region.get(key)
                if value is not NO_VALUE and faultkit.check_value(key, value):
                    errors.append(faultkit.check_value(key, value))
            elif draw < 0.85:
                region.get_or_create(key, lambda k=key, s=seq: faultkit.make_value(k, 50, s, 100))
            elif draw < 0.97:
                region.delete(key)
            else:
                region.backend.prune()
        except Exception:
            errors.append(traceback.format_exc())


def _child_after_fork(region) -> None:
    """What a freshly forked worker does first: every kind of operation, locks included."""
    signal.alarm(CHILD_ALARM)  # a deadlock ends in SIGALRM, which the parent reports
    for number, key in enumerate(KEYS[:6]):
        region.set(key, faultkit.make_value(key, 99, number, 200))
        value = region.get(key)
        assert value is NO_VALUE or faultkit.check_value(key, value) is None
        created = region.get_or_create(
            f"child-{key}", lambda k=key: faultkit.make_value(f"child-{k}", 98, 0, 1)
        )
        assert faultkit.check_value(f"child-{key}", created) is None
        mutex = region.backend.get_mutex(key)
        assert mutex.acquire(wait=True)
        mutex.release()
        region.delete(key)
    region.backend.prune()
    region.backend.verify()


def fork_under_threads_master(base_dir, forks, results) -> None:
    try:
        region = make("pickled", base_dir, cache_size=64 * 1024, reconcile_interval=0.05)
        stop = threading.Event()
        errors: list[str] = []
        threads = [
            threading.Thread(target=_hammer, args=(region, stop, errors, t)) for t in range(4)
        ]
        for thread in threads:
            thread.start()
        statuses = []
        rnd = random.Random(0)
        try:
            for _ in range(forks):
                time.sleep(rnd.uniform(0, 0.01))  # fork at arbitrary moments of the threads
                pid = faultkit.fork_child(lambda: _child_after_fork(region))
                statuses.append(faultkit.reap(pid, WAIT))
        finally:
            stop.set()
            for thread in threads:
                thread.join(WAIT)
        results.put({"statuses": statuses, "errors": errors[:5]})
    except Exception:
        results.put({"statuses": [], "errors": [traceback.format_exc()]})


def test_fork_while_other_threads_use_the_cache(tmp_path):
    outcome = _run_in_spawned(fork_under_threads_master, str(tmp_path / "cache"), 25)
    assert outcome["errors"] == []
    assert outcome["statuses"] == [0] * 25, "a child failed or deadlocked (SIGALRM is 14)"


# -- locks across fork -----------------------------------------------------------------------


def test_child_waits_for_a_key_lock_the_parent_holds(tmp_path):
    region = make("pickled", str(tmp_path / "cache"))
    mutex = region.backend.get_mutex("key")
    assert mutex.acquire()
    to_parent_r, to_parent_w = os.pipe()

    def child() -> None:
        signal.alarm(CHILD_ALARM)
        child_mutex = region.backend.get_mutex("key")
        held_elsewhere = not child_mutex.acquire(wait=False) and child_mutex.locked()
        os.write(to_parent_w, b"T" if held_elsewhere else b"F")
        assert child_mutex.acquire(wait=True)  # returns once the parent releases
        child_mutex.release()

    pid = faultkit.fork_child(child)
    try:
        assert os.read(to_parent_r, 1) == b"T"  # the child saw the parent's lock
    finally:
        mutex.release()
        os.close(to_parent_r)
        os.close(to_parent_w)
    assert faultkit.reap(pid, WAIT) == 0


def test_without_distributed_lock_a_child_holds_none_of_its_parents_thread_mutexes(tmp_path):
    """distributed_lock=False: a key's mutex excludes one process's threads only, and a
    child has none of its parent's other threads: it takes a key's mutex that such a
    thread held at fork(), and one that was inside the mutexes' table then (its guard
    held) leaves the child no lock to wait for forever."""
    region = make("pickled", str(tmp_path / "cache"), distributed_lock=False)
    backend = region.backend

    @contextlib.contextmanager
    def held() -> Iterator[None]:
        mutex = backend.get_mutex("key")
        assert mutex.acquire()
        try:
            with backend._thread_mutexes._guard:
                yield
        finally:
            mutex.release()

    def child() -> None:
        signal.alarm(CHILD_ALARM)
        mutex = backend.get_mutex("key")
        assert mutex.acquire(wait=False)
        mutex.release()
        assert region.get_or_create("key", lambda: "created") == "created"

    status = _fork_while_held(held(), child)
    assert status == 0, "the child waited for a lock no thread of it held"


def _fork_while_held(lock: AbstractContextManager[Any], child: Callable[[], None]) -> int:
    """Fork while another thread is inside ``lock`` (a lock, or any context manager that
    takes some); the child's exit status."""
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            holding.set()
            done.wait(WAIT)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(WAIT)
        pid = faultkit.fork_child(child)
    finally:
        done.set()
        holder.join(WAIT)
    return faultkit.reap(pid, WAIT)


def test_a_child_resets_objects_in_the_order_they_were_made_and_keeps_none_alive():
    """forking.py resets what asked, in that order (so a reset may rely on an earlier
    one), and holds no object alive: a backend no longer used is collected."""
    from dogpile_fsbackend import forking

    read_end, write_end = os.pipe()

    class Probe:
        def __init__(self, name: bytes) -> None:
            self.name = name
            forking.reset_in_children(self)

        def _reset_after_fork(self) -> None:
            os.write(write_end, self.name)

    probes = [Probe(name) for name in (b"c", b"a", b"b")]
    gone = weakref.ref(Probe(b"x"))
    gc.collect()
    assert gone() is None
    try:
        status = faultkit.reap(faultkit.fork_child(lambda: None), WAIT)
    finally:
        os.close(write_end)
    with open(read_end, "rb") as reads:
        assert status == 0
        assert reads.read() == b"cab"
    del probes


def test_a_child_makes_its_s3_client_though_a_parent_thread_was_making_one(tmp_path):
    """The lock under which a process makes its S3 client is held by another thread at
    fork(): the child, which must make a client of its own, gets an unheld lock."""
    pytest.importorskip("boto3")
    from servers import S3_CREDENTIALS

    from dogpile_fsbackend import s3tier

    arguments = {"endpoint_url": "http://127.0.0.1:9", **S3_CREDENTIALS}
    bucket = s3tier.Bucket("test-bucket", "files/", arguments, s3tier.MIN_PART_SIZE, 1)

    def child() -> None:
        signal.alarm(CHILD_ALARM)
        assert bucket.client is not None

    assert _fork_while_held(s3tier._SESSION_LOCK, child) == 0, "the child hung (SIGALRM: 14)"


def test_a_child_notes_changes_though_a_parent_thread_was_noting_some(redis_url, tmp_path):
    """A tier's lock over the changes no message announced is held by another thread at
    fork(): the child notes its own without waiting for it."""
    import tieredkit

    backend = tieredkit.region(redis_url, str(tmp_path / "cache")).backend

    def child() -> None:
        signal.alarm(CHILD_ALARM)
        backend._note_unannounced(["key"])

    assert _fork_while_held(backend._unannounced_lock, child) == 0, "the child hung (SIGALRM: 14)"


def test_a_child_configures_a_backend_though_a_parent_thread_was_noting_unknown_arguments(
    tmp_path,
):
    """The guard over the unknown argument names a process has logged is held by another
    thread at fork(): the child configures a backend (and logs its own) without waiting."""
    from dogpile_fsbackend import config

    def child() -> None:
        signal.alarm(CHILD_ALARM)
        region = make("pickled", str(tmp_path / "cache"), not_an_argument_of_ours=1)
        region.set("key", "value")
        assert region.get("key") == "value"

    status = _fork_while_held(config._warned_unknown_guard, child)
    assert status == 0, "the child hung (SIGALRM: 14)"


def test_a_child_invalidates_though_a_parent_thread_was_looking_up_announcers(tmp_path):
    """The registry of the tiers that tell other hosts of an invalidation is held by
    another thread at fork(): the child's region.invalidate() does not wait for it."""
    from dogpile_fsbackend import invalidation

    base_dir = str(tmp_path / "cache")
    region = make_region().configure(
        "dogpile_fsbackend.pickled",
        arguments={"base_dir": base_dir},
        region_invalidator=invalidation.SharedInvalidation(base_dir),
    )
    region.set("key", "value")

    def child() -> None:
        signal.alarm(CHILD_ALARM)
        region.invalidate()
        assert region.get("key") is NO_VALUE

    status = _fork_while_held(invalidation._ANNOUNCERS_GUARD, child)
    assert status == 0, "the child hung (SIGALRM: 14)"
    assert region.get("key") is NO_VALUE  # the child's invalidation reached the parent


def test_child_write_waits_for_a_shard_lock_the_parent_holds(tmp_path):
    base_dir = str(tmp_path / "cache")
    region = make("pickled", base_dir)
    store = region.backend.store
    entry = faultkit.entry_path(region.backend, "key")
    shard = store.layout.shard_index(os.path.basename(entry))
    ready_r, ready_w = os.pipe()

    def child() -> None:
        signal.alarm(CHILD_ALARM)
        os.write(ready_w, b"x")
        region.set("key", faultkit.make_value("key", 1, 0, 10))

    with store.shard_locked(shard):
        pid = faultkit.fork_child(child)
        assert os.read(ready_r, 1) == b"x"
        time.sleep(0.2)  # give a broken lock the chance to let the child through
        assert not os.path.exists(entry)  # the child cannot publish while we hold it
    assert faultkit.reap(pid, WAIT) == 0
    assert region.get("key")["writer"] == 1
    os.close(ready_r)
    os.close(ready_w)


# -- many threads in one process ----------------------------------------------------------


@pytest.mark.parametrize("distributed_lock", [True, False])
def test_many_threads_create_each_value_once(tmp_path, distributed_lock):
    region = make("pickled", str(tmp_path / "cache"), distributed_lock=distributed_lock)
    created: dict[str, int] = {}
    guard = threading.Lock()
    problems: list[str] = []
    start = threading.Barrier(16)

    def creator_for(key, thread):
        def create():
            with guard:
                created[key] = created.get(key, 0) + 1
            time.sleep(0.005)
            return faultkit.make_value(key, thread, 0, 300)

        return create

    def run(thread: int) -> None:
        try:
            start.wait(WAIT)
            for key in random.Random(thread).sample(KEYS, len(KEYS)):
                problem = _check(
                    "pickled", key, region.get_or_create(key, creator_for(key, thread))
                )
                if problem:
                    problems.append(problem)
        except Exception:
            problems.append(traceback.format_exc())

    threads = [threading.Thread(target=run, args=(t,)) for t in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert problems == []
    assert created == dict.fromkeys(KEYS, 1)


def test_threads_exclude_each_other_through_one_key_mutex(tmp_path):
    """Only one of many threads holds a key's mutex at a time, within one process."""
    region = make("pickled", str(tmp_path / "cache"))
    inside = 0
    most = 0
    guard = threading.Lock()
    start = threading.Barrier(12)

    def run() -> None:
        nonlocal inside, most
        mutex = region.backend.get_mutex("shared")
        start.wait(WAIT)
        for _ in range(50):
            assert mutex.acquire(wait=True)
            with guard:
                inside += 1
                most = max(most, inside)
            time.sleep(0.0002)
            with guard:
                inside -= 1
            mutex.release()

    threads = [threading.Thread(target=run) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert most == 1
    mutex = region.backend.get_mutex("shared")
    assert mutex.acquire(wait=False)
    mutex.release()


# -- eviction across fork ------------------------------------------------------------------


def _evict_across_fork_master(base_dir, results) -> None:
    """Evict with a walk of the tree in progress (an open directory), fork while other
    threads evict too, and evict on in both processes."""
    try:
        from dogpile_fsbackend import eviction

        eviction.EXACT_MAX = 0  # the walk of a big cache, in a small one
        region = make("pickled", base_dir, cache_size=48 * 1024)
        errors: list[str] = []
        for i in range(200):
            region.set(f"before-{i}", faultkit.make_value(f"before-{i}", 0, i, 400))
        assert region.backend.evictor._walk is not None
        stop = threading.Event()
        threads = [
            threading.Thread(target=_hammer, args=(region, stop, errors, t)) for t in range(3)
        ]
        for thread in threads:
            thread.start()

        def child() -> None:
            signal.alarm(CHILD_ALARM)
            for i in range(300):
                region.set(f"child-{i}", faultkit.make_value(f"child-{i}", 1, i, 400))
            assert region.backend.stats()["bytes"] <= 48 * 1024 + 4 * 1024

        statuses = []
        try:
            for _ in range(10):
                statuses.append(faultkit.reap(faultkit.fork_child(child), WAIT))
                for i in range(50):
                    region.set(f"parent-{i}", faultkit.make_value(f"parent-{i}", 2, i, 400))
        finally:
            stop.set()
            for thread in threads:
                thread.join(WAIT)
        size, entries = faultkit.disk_usage(base_dir)
        stats = region.backend.stats()
        results.put(
            {
                "statuses": statuses,
                "errors": errors[:5],
                "counted": (stats["bytes"], stats["entries"]),
                "on_disk": (size, entries),
            }
        )
    except Exception:
        results.put({"statuses": [], "errors": [traceback.format_exc()]})


def test_eviction_goes_on_in_parent_and_children_after_fork(tmp_path):
    """A forked child starts its own walk (closing its copy of the parent's directory, or
    keeping it if a parent thread was inside it); both go on evicting, the limit holds."""
    outcome = _run_in_spawned(_evict_across_fork_master, str(tmp_path / "cache"))
    assert outcome["errors"] == []
    assert outcome["statuses"] == [0] * 10, "a child failed or deadlocked (SIGALRM is 14)"
    assert outcome["counted"] == outcome["on_disk"]
    assert outcome["on_disk"][0] <= 48 * 1024
