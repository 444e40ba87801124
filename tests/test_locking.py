"""Key mutexes: dogpile's mutex contract, exclusion across threads and processes, shared
lock slots, fork safety, and the single lock file."""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import warnings

import faultkit
import pytest
from conftest import SPAWN, WAIT
from dogpile.cache import make_region
from dogpile.cache.api import CacheMutex

from dogpile_fsbackend import locking
from dogpile_fsbackend.config import Settings
from dogpile_fsbackend.locking import key_slot

SLOTS = Settings.lock_slots  # the default

FORK = multiprocessing.get_context("fork")


def raw_backend(base_dir: str, **arguments):
    return (
        make_region()
        .configure("dogpile_fsbackend.raw", arguments={"base_dir": base_dir, **arguments})
        .backend
    )


def start_forked(process) -> None:
    with warnings.catch_warnings():  # Python 3.12+ warns about forking with threads alive
        warnings.simplefilter("ignore", DeprecationWarning)
        process.start()


def wait_until_blocked(pid: int, lock_path: str, offset: int) -> bool:
    """Wait (bounded) until process ``pid`` is blocked waiting for byte ``offset``.

    /proc/locks lists a waiting request as ``N: -> POSIX ADVISORY WRITE pid
    maj:min:inode start end``, so exclusion is observed, not assumed after a sleep.
    """
    inode = str(os.stat(lock_path).st_ino)
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                if "->" not in fields:
                    continue
                fields = fields[fields.index("->") + 1 :]
                if (
                    int(fields[3]) == pid
                    and fields[4].rsplit(":", 1)[1] == inode
                    and int(fields[5]) == offset
                ):
                    return True
        time.sleep(0.002)
    return False


# -- dogpile's mutex contract, for the raw backend ----------------------------------------


def test_mutex_contract(cache_dir):
    backend = raw_backend(cache_dir)
    mutex = backend.get_mutex("foo")
    assert isinstance(mutex, CacheMutex)
    assert not mutex.locked()
    assert mutex.acquire()
    assert not mutex.acquire(False)
    assert mutex.locked()
    assert not backend.get_mutex("foo").acquire(False)  # another mutex object, same key
    mutex.release()
    assert not mutex.locked()
    assert mutex.acquire()
    mutex.release()


def test_release_of_an_unlocked_mutex_raises(cache_dir):
    mutex = raw_backend(cache_dir).get_mutex("foo")
    with pytest.raises(RuntimeError):
        mutex.release()
    assert mutex.acquire(False)
    mutex.release()


def test_mutex_threaded_exclusion(cache_dir):
    backend = raw_backend(cache_dir)
    start = threading.Barrier(5)
    inside = []
    overlaps = []
    acquisitions = []

    def worker():
        start.wait(WAIT)
        for _ in range(10):
            mutex = backend.get_mutex("foo")
            mutex.acquire()
            try:
                inside.append(1)
                overlaps.append(len(inside))
                time.sleep(0.001)  # widen the critical section
                inside.pop()
                acquisitions.append(1)
            finally:
                mutex.release()

    threads = [threading.Thread(target=worker) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert not any(thread.is_alive() for thread in threads)
    assert len(acquisitions) == 50
    assert set(overlaps) == {1}


def test_mutex_reentrant_across_keys(cache_dir):
    backend = raw_backend(cache_dir)
    for _ in range(3):
        m1 = backend.get_mutex("foo")
        m2 = backend.get_mutex("bar")
        try:
            m1.acquire()
            assert m2.acquire(False)
            assert not m2.acquire(False)
            m2.release()

            assert m2.acquire(False)
            assert not m2.acquire(False)
            m2.release()
        finally:
            m1.release()


def test_two_backends_in_one_process_share_the_locks(cache_dir):
    first, second = raw_backend(cache_dir), raw_backend(cache_dir)
    mutex = first.get_mutex("foo")
    mutex.acquire()
    try:
        assert second.get_mutex("foo").locked()
        assert not second.get_mutex("foo").acquire(False)
    finally:
        mutex.release()
    assert second.get_mutex("foo").acquire(False)
    second.get_mutex("foo").release()


# -- other processes ------------------------------------------------------------------


def _hold(base_dir, key, lock_slots, held, release) -> None:
    mutex = raw_backend(base_dir, lock_slots=lock_slots).get_mutex(key)
    if not mutex.acquire(False):
        raise AssertionError("the child could not take the free mutex")
    held.set()
    if not release.wait(WAIT):
        raise AssertionError("never told to release")
    mutex.release()


def _try_acquire(base_dir, key, lock_slots, results) -> None:
    mutex = raw_backend(base_dir, lock_slots=lock_slots).get_mutex(key)
    got = mutex.acquire(False)
    results.put(got)
    if got:
        mutex.release()


def try_in_another_process(base_dir, key, lock_slots=SLOTS) -> bool:
    results = SPAWN.Queue()
    child = SPAWN.Process(target=_try_acquire, args=(base_dir, key, lock_slots, results))
    child.start()
    try:
        return results.get(timeout=WAIT)
    finally:
        child.join(WAIT)
        assert child.exitcode == 0


def test_locked_is_true_while_another_process_holds_it(cache_dir):
    mutex = raw_backend(cache_dir).get_mutex("foo")
    held, release = SPAWN.Event(), SPAWN.Event()
    child = SPAWN.Process(target=_hold, args=(cache_dir, "foo", SLOTS, held, release))
    child.start()
    try:
        assert held.wait(WAIT)
        assert mutex.locked()
        assert not mutex.acquire(False)
        assert mutex.locked()  # a failed attempt leaves no local state behind
    finally:
        release.set()
        child.join(WAIT)
    assert child.exitcode == 0
    assert not mutex.locked()
    assert mutex.acquire(False)
    mutex.release()


def _acquire_blocking(base_dir, key, attempting, results) -> None:
    mutex = raw_backend(base_dir).get_mutex(key)
    attempting.set()
    mutex.acquire()
    results.put(time.monotonic())  # CLOCK_MONOTONIC is shared by every process
    mutex.release()


def test_mutex_excludes_a_second_process(cache_dir):
    backend = raw_backend(cache_dir)
    mutex = backend.get_mutex("foo")
    attempting, results = SPAWN.Event(), SPAWN.Queue()
    mutex.acquire()
    child = SPAWN.Process(target=_acquire_blocking, args=(cache_dir, "foo", attempting, results))
    child.start()
    try:
        assert attempting.wait(WAIT)
        lock_path = os.path.join(cache_dir, "lock")
        assert wait_until_blocked(child.pid, lock_path, key_slot(b"foo", SLOTS))
        assert results.empty()
        released_at = time.monotonic()
    finally:
        mutex.release()
    acquired_at = results.get(timeout=WAIT)
    child.join(WAIT)
    assert child.exitcode == 0
    assert acquired_at > released_at


def test_a_waiting_thread_is_woken_when_another_process_releases(cache_dir):
    mutex = raw_backend(cache_dir).get_mutex("foo")
    held, release = SPAWN.Event(), SPAWN.Event()
    child = SPAWN.Process(target=_hold, args=(cache_dir, "foo", SLOTS, held, release))
    child.start()
    assert held.wait(WAIT)
    acquired = threading.Event()

    def waiter():
        mutex.acquire()
        acquired.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        # The kernel reports the waiting thread under its process id.
        assert wait_until_blocked(
            os.getpid(), os.path.join(cache_dir, "lock"), key_slot(b"foo", SLOTS)
        )
        assert not acquired.is_set()
    finally:
        release.set()
    assert acquired.wait(WAIT)
    thread.join(WAIT)
    child.join(WAIT)
    mutex.release()


def _hold_until_killed(base_dir, key, held) -> None:
    mutex = raw_backend(base_dir).get_mutex(key)
    mutex.acquire()
    held.set()
    time.sleep(WAIT)  # killed long before this ends


def test_a_killed_holder_releases_the_mutex(cache_dir):
    mutex = raw_backend(cache_dir).get_mutex("foo")
    held = SPAWN.Event()
    child = SPAWN.Process(target=_hold_until_killed, args=(cache_dir, "foo", held))
    child.start()
    assert held.wait(WAIT)
    assert not mutex.acquire(False)
    os.kill(child.pid, signal.SIGKILL)
    child.join(WAIT)
    assert child.exitcode == -signal.SIGKILL
    assert mutex.acquire(False)
    mutex.release()


def test_keys_in_different_slots_do_not_exclude_each_other(cache_dir):
    assert key_slot(b"foo", SLOTS) != key_slot(b"bar", SLOTS)
    mutex = raw_backend(cache_dir).get_mutex("foo")
    mutex.acquire()
    try:
        assert try_in_another_process(cache_dir, "bar")
        assert not try_in_another_process(cache_dir, "foo")
    finally:
        mutex.release()
    assert try_in_another_process(cache_dir, "foo")


# -- shared lock slots ----------------------------------------------------------------


def test_keys_sharing_a_slot_do_not_deadlock_within_a_process(cache_dir):
    backend = raw_backend(cache_dir, lock_slots=1)
    first, second = backend.get_mutex("first"), backend.get_mutex("second")
    assert key_slot(b"first", 1) == key_slot(b"second", 1)
    assert first.acquire(False)
    assert second.acquire(False)  # same byte, already this process's: no self-deadlock
    assert not first.acquire(False)
    assert not second.acquire(False)  # still one holder per key
    first.release()
    assert second.locked()
    assert not try_in_another_process(cache_dir, "third", lock_slots=1)  # byte still held
    second.release()
    assert try_in_another_process(cache_dir, "third", lock_slots=1)  # byte released


def test_threads_on_keys_sharing_a_slot(cache_dir):
    backend = raw_backend(cache_dir, lock_slots=1)
    outcomes: queue.Queue = queue.Queue()
    first_held, release_first = threading.Event(), threading.Event()

    def hold_first():
        mutex = backend.get_mutex("first")
        mutex.acquire()
        first_held.set()
        release_first.wait(WAIT)
        mutex.release()

    holder = threading.Thread(target=hold_first)
    holder.start()
    assert first_held.wait(WAIT)

    def take_second():  # blocking acquire of another key on the same byte
        mutex = backend.get_mutex("second")
        outcomes.put(("second", mutex.acquire()))
        outcomes.put(("first while held", backend.get_mutex("first").acquire(False)))
        mutex.release()

    taker = threading.Thread(target=take_second)
    taker.start()
    assert outcomes.get(timeout=WAIT) == ("second", True)
    assert outcomes.get(timeout=WAIT) == ("first while held", False)
    taker.join(WAIT)
    assert not backend.get_mutex("first").acquire(False)
    release_first.set()
    holder.join(WAIT)
    assert backend.get_mutex("first").acquire(False)
    backend.get_mutex("first").release()


def test_threads_exclude_per_key_on_a_shared_slot(cache_dir):
    backend = raw_backend(cache_dir, lock_slots=1)
    keys = ["a", "b", "c"]
    inside = dict.fromkeys(keys, 0)
    worst = dict.fromkeys(keys, 0)
    guard = threading.Lock()
    start = threading.Barrier(6)

    def worker(key):
        start.wait(WAIT)
        for _ in range(20):
            mutex = backend.get_mutex(key)
            mutex.acquire()
            try:
                with guard:
                    inside[key] += 1
                    worst[key] = max(worst[key], inside[key])
                time.sleep(0.0005)
                with guard:
                    inside[key] -= 1
            finally:
                mutex.release()

    threads = [threading.Thread(target=worker, args=(key,)) for key in keys * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert not any(thread.is_alive() for thread in threads)
    assert worst == dict.fromkeys(keys, 1)
    assert try_in_another_process(cache_dir, "z", lock_slots=1)  # all bytes released


# -- fork -----------------------------------------------------------------------------


def _after_fork(backend, held_key, same_slot_key, other_slot_key, parent_released, results):
    lock_file = backend.store.lock_file
    results.put(("names", list(lock_file._names)))
    results.put(("bytes", {offset: b.holders for offset, b in lock_file._bytes.items()}))
    results.put(("held key locked()", backend.get_mutex(held_key).locked()))
    results.put(("held key", backend.get_mutex(held_key).acquire(False)))
    results.put(("same slot key", backend.get_mutex(same_slot_key).acquire(False)))
    other = backend.get_mutex(other_slot_key)
    results.put(("other slot key", other.acquire(False)))
    other.release()
    parent_released.wait(WAIT)
    mutex = backend.get_mutex(held_key)
    results.put(("held key after release", mutex.acquire()))  # hangs if state leaked
    mutex.release()


def test_fork_child_starts_with_clean_lock_state(cache_dir):
    backend = raw_backend(cache_dir, lock_slots=2)
    slots = {}
    for index in range(100):
        slots.setdefault(key_slot(f"key{index}".encode(), 2), []).append(f"key{index}")
    (held_key, same_slot_key, *_), (other_slot_key, *_) = slots.values()
    mutex = backend.get_mutex(held_key)
    mutex.acquire()
    parent_released, results = FORK.Event(), FORK.Queue()
    child = FORK.Process(
        target=_after_fork,
        args=(backend, held_key, same_slot_key, other_slot_key, parent_released, results),
    )
    start_forked(child)
    try:
        found = dict(results.get(timeout=WAIT) for _ in range(6))
    finally:
        mutex.release()
        parent_released.set()
    try:
        found.update([results.get(timeout=WAIT)])
    finally:
        child.join(WAIT)
        if child.is_alive():
            child.kill()
    assert found == {
        "names": [],  # nothing is "held by this process" in the child
        "bytes": {},
        "held key locked()": True,  # held by the parent, another process
        "held key": False,
        "same slot key": False,  # the inherited holder count would have let it through
        "other slot key": True,
        "held key after release": True,
    }
    assert child.exitcode == 0


# -- one lock file --------------------------------------------------------------------


def _lock_many(base_dir, keys) -> None:
    backend = raw_backend(base_dir)
    for key in keys:
        mutex = backend.get_mutex(key)
        mutex.acquire()
        mutex.release()


def test_only_one_lock_file_whatever_the_number_of_keys(cache_dir):
    import io

    region = make_region().configure("dogpile_fsbackend.raw", arguments={"base_dir": cache_dir})
    held = [region.backend.get_mutex(f"held {index}") for index in range(300)]
    for mutex in held:
        assert mutex.acquire(False)
    for index in range(30):
        with region.get_or_create(f"value {index}", lambda: io.BytesIO(b"x")):
            pass
    held_slots = {key_slot(f"held {index}".encode(), SLOTS) for index in range(300)}
    child_keys = [f"child {i}" for i in range(1000)]
    child_keys = [k for k in child_keys if key_slot(k.encode(), SLOTS) not in held_slots][:300]
    child = SPAWN.Process(target=_lock_many, args=(cache_dir, child_keys))
    child.start()
    child.join(WAIT)
    assert child.exitcode == 0
    for mutex in held:
        mutex.release()
    everything = [
        os.path.relpath(os.path.join(root, name), cache_dir)
        for root, _, names in os.walk(cache_dir)
        for name in names
    ]
    outside_data = sorted(path for path in everything if not path.startswith("data" + os.sep))
    assert outside_data == ["accounting", "fsbackend.json", "lock", "maintenance.lock"]
    assert len([path for path in everything if "lock" in os.path.basename(path)]) == 2
    assert len([p for p in everything if p.startswith("data" + os.sep)]) == 60  # record + data


def test_a_new_backend_on_the_same_directory_keeps_this_process_locks(cache_dir):
    """Opening the lock file again and closing that descriptor would drop every lockf lock."""
    mutex = raw_backend(cache_dir).get_mutex("foo")
    mutex.acquire()
    try:
        raw_backend(cache_dir)
        raw_backend(cache_dir, distributed_lock=False)
        assert not try_in_another_process(cache_dir, "foo")
    finally:
        mutex.release()
    assert try_in_another_process(cache_dir, "foo")


def test_backends_on_many_directories_leave_no_descriptor_open(tmp_path):
    """A process that makes backends on one directory after another (a test suite, a
    cache per tenant or per job) used to keep every directory's lock file open for good,
    until it ran out of descriptors.  A lock file is closed with the last backend or
    mutex that uses it; while one does, its locks hold."""
    import gc

    def use(base_dir: str) -> None:
        region = make_region().configure(
            "dogpile_fsbackend.pickled", arguments={"base_dir": base_dir}
        )
        region.set("key", "value")  # takes a shard lock and the writer byte
        assert region.get_or_create("other", lambda: "created") == "created"

    use(str(tmp_path / "warm-up"))
    gc.collect()
    descriptors = faultkit.fd_count()
    for index in range(200):
        use(str(tmp_path / f"cache{index}"))
    gc.collect()
    assert faultkit.fd_count() == descriptors
    held = raw_backend(str(tmp_path / "held")).get_mutex("foo")  # the backend is gone now
    held.acquire()
    try:
        gc.collect()
        assert not try_in_another_process(str(tmp_path / "held"), "foo")
    finally:
        held.release()


def test_any_thread_may_release_and_then_the_mutex_is_free_for_everyone(cache_dir):
    """dogpile's async_creation_runner releases the mutex in its own thread."""
    mutex = raw_backend(cache_dir).get_mutex("foo")
    mutex.acquire()
    releaser = threading.Thread(target=mutex.release)
    releaser.start()
    releaser.join(WAIT)
    assert not mutex.locked()
    assert try_in_another_process(cache_dir, "foo")
    assert mutex.acquire(False)
    mutex.release()
    assert not locking.LockFile.for_path(os.path.join(cache_dir, "lock"))._bytes  # forgotten


def _cross_holder(base_dir, holding_b, done) -> None:
    """Hold "b" in one thread while another waits for "a" (held by the parent)."""
    backend = raw_backend(base_dir)
    mutex_a, mutex_b = backend.get_mutex("a"), backend.get_mutex("b")
    mutex_b.acquire()
    holding_b.set()
    waiter = threading.Thread(target=mutex_a.acquire)
    waiter.start()
    waiter.join(WAIT)
    mutex_a.release()
    mutex_b.release()
    done.set()


def test_a_thread_induced_edeadlk_is_retried_never_raised(cache_dir):
    """The kernel sees processes: here it reports a cycle that threads make (we hold "a"
    and want "b"; the child holds "b" and waits for "a") though it clears once we release
    "a". The waiting thread must retry, not fail."""
    backend = raw_backend(cache_dir)
    mutex_a = backend.get_mutex("a")
    mutex_a.acquire()
    holding_b, done = SPAWN.Event(), SPAWN.Event()
    child = SPAWN.Process(target=_cross_holder, args=(cache_dir, holding_b, done))
    child.start()
    outcome = []
    try:
        assert holding_b.wait(WAIT)
        lock_path = os.path.join(cache_dir, "lock")
        assert wait_until_blocked(child.pid, lock_path, key_slot(b"a", SLOTS))

        def take_b() -> None:
            try:
                outcome.append(backend.get_mutex("b").acquire())
            except OSError as exc:  # EDEADLK surfacing is the failure under test
                outcome.append(exc)

        taker = threading.Thread(target=take_b)
        taker.start()
        taker.join(0.5)
        assert not outcome  # "b" is held by the child: nothing to report yet
    finally:
        mutex_a.release()
    taker.join(WAIT)
    assert outcome == [True]
    assert done.wait(WAIT)
    backend.get_mutex("b").release()
    child.join(WAIT)
    assert child.exitcode == 0


def test_a_thread_never_gets_a_half_taken_writer_token(tmp_path):
    """The first writer token of a process: a second thread that asks while the first
    is taking it gets the same token, never an empty one (a temp file named without its
    writer would not be known as alive to scans).

    The taking thread is held (a profiler hook on its own thread) at its call to
    ``format``, made while it holds the guard; the second thread asks meanwhile.
    """
    lock_file = locking.LockFile.for_path(str(tmp_path / "lock"))
    held, release = threading.Event(), threading.Event()
    tokens: dict[str, str] = {}

    def hold_at_format(frame, event, arg):
        if event == "c_call" and arg is format and not held.is_set():
            held.set()
            release.wait(WAIT)

    def first() -> None:
        sys.setprofile(hold_at_format)
        try:
            tokens["first"] = lock_file.writer_token()
        finally:
            sys.setprofile(None)

    def second() -> None:
        tokens["second"] = lock_file.writer_token()

    taker = threading.Thread(target=first)
    taker.start()
    assert held.wait(WAIT)
    asker = threading.Thread(target=second)
    asker.start()
    asker.join(0.5)  # it returns now (without waiting for the guard), or once released
    release.set()
    taker.join(WAIT)
    asker.join(WAIT)
    assert len(tokens["first"]) == locking.WRITER_TOKEN_LEN
    assert tokens["second"] == tokens["first"]
