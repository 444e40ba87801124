"""Several simulated hosts on one real Redis: separate ``base_dir``s in separate processes.

* get_or_create runs each creator once across every host (lock "both" and
  "remote"), once per host with lock "local";
* a write and a delete on one host reach another within a bounded wait with
  pub/sub (the latency is printed; benchmarks/ measures it), and within
  ``local_expiration_time`` without;
* a lock holder SIGKILLed frees the key on every host (after lock_timeout);
* a dropped pub/sub connection, a new process, a forked child: local copies
  from before their subscription are not trusted.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import threading
import time

import pytest
import tieredkit
from conftest import SPAWN, WAIT
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE
from dogpile.cache.proxy import ProxyBackend
from faultkit import fork_child, reap

HOSTS = 3
PROCESSES_PER_HOST = 2
KEYS = [f"shared-{i}" for i in range(12)]
CREATOR_SECONDS = 0.05


@pytest.fixture
def hosts(redis_url, tmp_path):
    """``hosts(name, **arguments)`` starts a simulated host; all are stopped afterwards."""
    with tieredkit.host_pool() as start:
        yield lambda name, **top: start(redis_url, str(tmp_path / name), **top)


# -- one creator across hosts ---------------------------------------------------------


def _creating_worker(url, base_dir, host, lock, log_path, barrier, results) -> None:
    """One process of one host: get_or_create every key, in its own random order."""
    try:
        region = tieredkit.region(url, base_dir, lock=lock, expiration_time=3600)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)

        def creator_for(key):
            def creator():
                value = f"{host}/{os.getpid()}/{key}"
                os.write(log_fd, (json.dumps([key, value]) + "\n").encode())
                time.sleep(CREATOR_SECONDS)
                return value

            return creator

        order = random.sample(KEYS, len(KEYS))
        barrier.wait(WAIT)
        got = {key: region.get_or_create(key, creator_for(key)) for key in order}
        results.put((host, got, None))
    except BaseException as exc:
        results.put((host, {}, repr(exc)))
        raise


@pytest.mark.parametrize("lock", ["both", "remote", "local"])
def test_get_or_create_runs_each_creator_once_across_hosts(redis_url, tmp_path, lock):
    log_path = str(tmp_path / "creations.log")
    open(log_path, "w").close()
    barrier = SPAWN.Barrier(HOSTS * PROCESSES_PER_HOST)
    results = SPAWN.Queue()
    workers = [
        SPAWN.Process(
            target=_creating_worker,
            args=(redis_url, str(tmp_path / f"host{h}"), h, lock, log_path, barrier, results),
        )
        for h in range(HOSTS)
        for _ in range(PROCESSES_PER_HOST)
    ]
    for worker in workers:
        worker.start()
    try:
        outcomes = [results.get(timeout=3 * WAIT) for _ in workers]
    finally:
        for worker in workers:
            worker.join(WAIT)
            if worker.is_alive():
                worker.kill()
    assert [error for *_, error in outcomes if error] == []
    with open(log_path) as log:
        creations = [json.loads(line) for line in log]
    per_key = collections.Counter(key for key, _ in creations)
    if lock == "local":  # one creator per host at most: a host may find another's value
        per_host = collections.Counter((value.split("/")[0], key) for key, value in creations)
        assert set(per_key) == set(KEYS)
        assert max(per_host.values()) == 1, per_host
    else:
        assert per_key == dict.fromkeys(KEYS, 1), per_key
        created = dict(creations)
        for _, got, _ in outcomes:  # every process of every host got the one value
            assert got == created


# -- coherence --------------------------------------------------------------------------


def test_a_write_and_a_delete_reach_another_host_with_pubsub(hosts):
    a, b = hosts("a"), hosts("b")
    a("set", "k", "v1")
    # Once b has heard of the write: a copy b reads before that is dropped when the
    # message comes (it may be older), and b's next read would not be a local hit.
    tieredkit.wait_until(lambda: b("stats")["invalidations"] >= 1, "b heard of a's write")
    assert b("get", "k") == "v1"
    before = b("stats")["local_hits"]
    assert b("get", "k") == "v1"
    assert b("stats")["local_hits"] == before + 1  # b serves its local copy
    a("set", "k", "v2")
    seen_write = b("poll", "k", "v2")
    a("delete", "k")
    seen_delete = b("poll", "k", tieredkit.MISS)
    print(f"write seen after {seen_write * 1e3:.1f} ms, delete after {seen_delete * 1e3:.1f} ms")
    assert b("stats")["invalidations"] >= 2


def test_without_pubsub_a_change_arrives_within_local_expiration_time(hosts):
    limit = 1.0
    a = hosts("a", invalidation=None, local_expiration_time=limit)
    b = hosts("b", invalidation=None, local_expiration_time=limit)
    a("set", "k", "v1")
    before = time.time()
    assert b("get", "k") == "v1"  # b's local copy is written between `before` and `after`
    after = time.time()
    a("set", "k", "v2")
    stale = b("get", "k")
    if time.time() - before < limit:  # the copy cannot have expired yet: b serves it
        assert stale == "v1"
    time.sleep(max(0.0, after + limit + 0.05 - time.time()))
    assert b("get", "k") == "v2"  # the copy has expired: read from the remote
    a("delete", "k")
    deleted = time.time()
    b("poll", "k", tieredkit.MISS)
    assert time.time() - deleted < limit + WAIT


class _AfterRedisWrite(ProxyBackend):
    """Sits on a tier's real Redis backend: runs ``then()`` right after each write."""

    def __init__(self, then) -> None:
        self.then = then

    def set_serialized_multi(self, mapping) -> None:
        self.proxied.set_serialized_multi(mapping)
        self.then()


@pytest.mark.parametrize("change", ["set", "delete"])
def test_another_hosts_change_between_a_writers_redis_and_local_writes(
    hosts, redis_url, tmp_path, change
):
    """Host a writes Redis; host b changes the key and host a hears of it; only then
    does host a write its local copy.  That copy is older than Redis's value: it must
    not be served."""
    writer = tieredkit.region(redis_url, str(tmp_path / "a"))
    other = hosts("b")
    backend = writer.backend

    def other_host_changes_the_key() -> None:
        heard = backend.invalidations
        if change == "set":
            other("set", "k", "newer")
        else:
            other("delete", "k")
        tieredkit.wait_until(lambda: backend.invalidations > heard, "host a heard host b")

    backend.remote = _AfterRedisWrite(other_host_changes_the_key).wrap(backend.remote)
    writer.set("k", "older")
    expected = "newer" if change == "set" else NO_VALUE
    in_redis = tieredkit.redis_client(redis_url).get("k")
    assert (in_redis is None) == (change == "delete")  # Redis has host b's change
    assert writer.get("k") == expected
    assert other("get", "k") == (tieredkit.MISS if expected is NO_VALUE else expected)


def _raw_write(url: str, key: str, value) -> None:
    """A write that reaches Redis without a message (as if the message were lost)."""
    make_region().configure("dogpile.cache.redis", arguments={"url": url}).set(key, value)


def test_a_dropped_channel_stops_trust_in_older_copies(redis_url, tmp_path):
    b = tieredkit.region(redis_url, str(tmp_path / "b"))
    listener = b.backend.listener
    b.set("k", "v1")
    _raw_write(redis_url, "k", "v2")  # no message: b cannot know
    assert b.get("k") == "v1"  # b trusts its copy while its subscription lasts
    subscriptions = listener.subscriptions
    killed = tieredkit.redis_client(redis_url).client_kill_filter(_type="pubsub")
    assert killed >= 1
    tieredkit.wait_until(
        lambda: listener.subscriptions > subscriptions, "the listener resubscribed"
    )
    # The gap may have hidden a message: the copy from before it is not trusted.
    assert b.get("k") == "v2"
    assert b.backend.remote_hits >= 1


def test_a_read_begun_before_a_subscription_was_confirmed_is_not_copied_in(redis_url, tmp_path):
    """The listener reconnects and sends SUBSCRIBE; a reader notes the generation and
    reads Redis; another host's write is published before the server subscribed us
    (lost); then the subscription is confirmed and the reader copies its value in.
    That copy is written after the trusted-since time, but from a read the channel
    did not cover."""
    b = tieredkit.region(redis_url, str(tmp_path / "b"), channel="confirmation")
    listener = b.backend.listener
    _raw_write(redis_url, "k", "v1")
    listener._gap()  # what a reconnection does before it sends SUBSCRIBE
    generation = listener.generation  # b's reader: a local miss, then its Redis read
    old = b.backend.remote.get_serialized("k")
    _raw_write(redis_url, "k", "v2")  # its message was published before SUBSCRIBE
    listener._handle({"type": "subscribe", "channel": b"confirmation", "data": 1})
    assert listener.connected
    b.backend._copy_in({"k": old}, generation)
    assert b.get("k") == "v2"


def _fresh_process_reads(url, base_dir, results) -> None:
    region = tieredkit.region(url, base_dir)
    results.put(region.get("k"))


def test_a_new_process_does_not_trust_copies_from_before_it_subscribed(redis_url, tmp_path):
    base_dir = str(tmp_path / "a")
    a = tieredkit.region(redis_url, base_dir)
    a.set("k", "v1")
    _raw_write(redis_url, "k", "v2")
    assert a.get("k") == "v1"  # listening all along: no message came, the copy stands
    # A process started now on the same host (the same local tier) cannot know what
    # it missed before it subscribed: it reads the remote.
    results = SPAWN.Queue()
    process = SPAWN.Process(target=_fresh_process_reads, args=(redis_url, base_dir, results))
    process.start()
    try:
        assert results.get(timeout=WAIT) == "v2"
    finally:
        process.join(WAIT)


def _prefork_master(url, base_dir, results) -> None:
    """Use a region, then fork a worker (like gunicorn --preload) that keeps using it."""
    region = tieredkit.region(url, base_dir)
    writer = tieredkit.region(url, base_dir + "-writer")
    writer.set("k", "before fork")
    assert region.get("k") == "before fork"
    ready_read, ready_write = os.pipe()
    go_read, go_write = os.pipe()

    def child() -> None:
        listener = region.backend.listener
        assert not listener.connected and listener._thread is None  # reset by the fork
        assert region.get("k") == "before fork"  # read from Redis: not trusted yet
        assert listener.wait_connected(WAIT)
        os.write(ready_write, b"r")
        assert os.read(go_read, 1) == b"g"
        tieredkit.wait_until(lambda: region.get("k") == "after fork", "the child saw the write")

    pid = fork_child(child)
    try:
        assert os.read(ready_read, 1) == b"r"
        writer.set("k", "after fork")
        os.write(go_write, b"g")
        status = reap(pid)
        child_ok = os.waitstatus_to_exitcode(status) == 0
        # The child did not close the parent's pub/sub connection.
        parent_ok = region.backend.listener.connected
        writer.set("k", "parent")
        tieredkit.wait_until(lambda: region.get("k") == "parent", "the parent still hears")
        results.put((child_ok, parent_ok))
    except BaseException as exc:
        results.put(repr(exc))
        raise


def test_the_listener_restarts_in_a_forked_child(redis_url, tmp_path):
    results = SPAWN.Queue()
    master = SPAWN.Process(target=_prefork_master, args=(redis_url, str(tmp_path / "a"), results))
    master.start()
    try:
        assert results.get(timeout=3 * WAIT) == (True, True)
    finally:
        master.join(WAIT)


# -- locks --------------------------------------------------------------------------------


def test_a_sigkilled_lock_holder_frees_the_key_on_every_host(redis_url, tmp_path):
    lock_timeout = 2
    common = {"remote": {"lock_timeout": lock_timeout}}
    holder = tieredkit.Host(redis_url, str(tmp_path / "a"), **common)
    same_host = tieredkit.Host(redis_url, str(tmp_path / "a"), **common)
    other_host = tieredkit.Host(redis_url, str(tmp_path / "b"), **common)
    try:
        assert holder("hold", "k") is True
        assert other_host("try", "k") is False  # held across hosts (the Redis lock)
        assert same_host("try", "k") is False  # and on the holder's host (the kernel lock)
        killed_at = time.monotonic()
        os.kill(holder.pid, signal.SIGKILL)
        holder.process.join(WAIT)
        # The kernel drops the dead process's lockf lock at once; the Redis lock
        # lasts until lock_timeout: then both hosts get the key.
        results = {}
        waiters = [
            threading.Thread(target=lambda h=h, n=n: results.__setitem__(n, h("acquire", "k")))
            for n, h in (("same host", same_host), ("other host", other_host))
        ]
        for waiter in waiters:
            waiter.start()
        for waiter in waiters:
            waiter.join(2 * WAIT)
        assert set(results) == {"same host", "other host"}
        assert time.monotonic() - killed_at < lock_timeout + WAIT
    finally:
        for host in (holder, same_host, other_host):
            host.close()


def _queueing_worker(url, base_dir, waiters, barrier, results) -> None:
    region = tieredkit.region(url, base_dir)

    def creator():
        lock_file = os.path.join(base_dir, "lock")
        tieredkit.wait_until(
            lambda: tieredkit.blocked_lockf_waiters(lock_file) >= waiters,
            "the other processes wait in the kernel for this host's lock",
        )
        return f"made by {os.getpid()}"

    barrier.wait(WAIT)
    results.put(region.get_or_create("k", creator))


def test_processes_of_one_host_queue_on_the_kernel_lock_not_on_redis(redis_url, tmp_path):
    """lock="both": one process per host takes the Redis lock; the others wait in the
    kernel and, when the creator of their host is done, take its value without a
    Redis lock command (counted by Redis itself)."""
    processes = 4
    client = tieredkit.redis_client(redis_url)
    barrier, results = SPAWN.Barrier(processes + 1), SPAWN.Queue()
    workers = [
        SPAWN.Process(
            target=_queueing_worker,
            args=(redis_url, str(tmp_path / "a"), processes - 1, barrier, results),
        )
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        client.config_resetstat()
        barrier.wait(WAIT)
        values = {results.get(timeout=WAIT) for _ in workers}
        stats = client.info("commandstats")
    finally:
        for worker in workers:
            worker.join(WAIT)
    assert len(values) == 1  # one creator
    # One SET NX for the lock (its release is a script), one MSET for the value.
    assert stats["cmdstat_set"]["calls"] == 1, stats
    assert stats["cmdstat_mset"]["calls"] == 1, stats
