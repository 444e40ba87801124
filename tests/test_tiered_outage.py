"""Redis outages: a real redis-server killed, paused (hung) and restarted under the tiers.

* ``remote_errors="degrade"`` keeps serving and writing locally with local
  locks, leaves Redis alone during the back-off (connection attempts counted
  on the dead port), probes once per back-off period, and resumes when Redis
  is back;
* ``"raise"`` raises RemoteError naming the remote, never hides a password,
  and fails fast during the back-off;
* a hung Redis costs a bounded time (socket timeouts), never a hang;
* a creator that outlives the Redis lock's lock_timeout gets its value stored,
  with a warning, instead of an exception.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time

import pytest
import tieredkit
from conftest import SPAWN, WAIT
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE
from faultkit import fork_child, reap

from dogpile_fsbackend import RemoteError
from dogpile_fsbackend.remote import describe


def tier(server, tmp_path, name="a", **top):
    return tieredkit.region(server.url, str(tmp_path / name), **top)


def degrading_tier(server, tmp_path, backoff):
    """A degrading tier with a fixed back-off and no listener: only value calls reach Redis."""
    return tier(
        server,
        tmp_path,
        remote_errors="degrade",
        invalidation=None,
        local_expiration_time=60,
        remote_backoff=backoff,
        remote_backoff_max=backoff,
    )


def test_degrade_serves_and_writes_locally_while_redis_is_down(private_redis, tmp_path, caplog):
    region = tier(private_redis, tmp_path, remote_errors="degrade", **tieredkit.FAST_BACKOFF)
    region.set("cached", "before")
    private_redis.kill()
    with caplog.at_level(logging.WARNING, logger="dogpile_fsbackend.remote"):
        assert region.get("cached") == "before"  # the local copy, trusted or not
        region.set("written", "during")  # remote skipped, local written
        assert region.get("written") == "during"
        assert region.get("missing") is NO_VALUE
        assert region.get_or_create("made", lambda: "locally") == "locally"
        region.delete("cached")
        assert region.get("cached") is NO_VALUE
    outage_lines = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(outage_lines) == 1  # logged once, not per call
    assert "serving and writing locally" in outage_lines[0].getMessage()
    assert not region.backend.guard.healthy


def test_degrade_falls_back_to_the_local_lock(private_redis, tmp_path):
    region = tier(private_redis, tmp_path, remote_errors="degrade", **tieredkit.FAST_BACKOFF)
    private_redis.kill()
    mutex = region.backend.get_mutex("k")
    assert mutex.acquire()
    other = []
    thread = threading.Thread(target=lambda: other.append(mutex.acquire(False)))
    thread.start()
    thread.join(WAIT)
    assert other == [False]  # still exclusive: this host's kernel lock
    mutex.release()
    assert mutex.acquire(False)
    mutex.release()


def test_degraded_calls_leave_a_dead_redis_alone_during_the_backoff(private_redis, tmp_path):
    backoff = 30.0  # longer than the test: every call below falls in the first window
    region = degrading_tier(private_redis, tmp_path, backoff)
    region.set("cached", "v")
    guard = region.backend.guard
    private_redis.kill()
    calls = 0
    with tieredkit.watching(private_redis.port) as port:
        started = time.monotonic()
        for i in range(300):
            region.get(f"missing-{i}")  # a local miss: wants the remote
            region.set(f"new-{i}", i)
            assert region.get("cached") == "v"
            calls += 2
        elapsed = time.monotonic() - started
        connections = port.connections
    assert elapsed < backoff * 0.75  # the earliest a second probe is allowed
    assert guard.attempts - 1 <= 2  # the call that found Redis dead (and what was in flight)
    assert guard.skipped >= calls - 2
    assert connections <= 2 * 2, connections  # those calls, one immediate retry each
    print(f"{calls} calls during the outage: {connections} connection attempts in {elapsed:.2f} s")


def test_probes_come_once_per_backoff_period(private_redis, tmp_path):
    backoff = 0.2
    region = degrading_tier(private_redis, tmp_path, backoff)
    region.get("warm")
    guard = region.backend.guard
    private_redis.kill()
    region.get("first failure")
    attempts_before = guard.attempts
    with tieredkit.watching(private_redis.port) as port:
        started = time.monotonic()
        calls = 0
        while time.monotonic() - started < 1.5:
            region.get(f"k{calls}")
            calls += 1
        elapsed = time.monotonic() - started
        connections = port.connections
    probes = guard.attempts - attempts_before
    most = int(elapsed / (0.75 * backoff)) + 1  # jitter shortens a period by up to 25%
    assert 1 <= probes <= most, (probes, most)
    assert connections <= 2 * probes  # no retry storm: one retry per probe at most
    assert calls > 50 * probes  # the other calls never waited for Redis
    print(f"{calls} calls, {probes} probes, {connections} connections in {elapsed:.2f} s")


def test_redis_returning_resumes_the_tiers(private_redis, tmp_path):
    a = tier(private_redis, tmp_path, "a", remote_errors="degrade", **tieredkit.FAST_BACKOFF)
    b = tier(private_redis, tmp_path, "b", remote_errors="degrade", **tieredkit.FAST_BACKOFF)
    private_redis.kill()
    a.set("k", "written during the outage")  # local to host a only
    private_redis.start()  # the same port, empty (no persistence)
    tieredkit.wait_until(lambda: a.backend.listener.connected, "host a's listener reconnected")
    tieredkit.wait_until(lambda: b.backend.listener.connected, "host b's listener reconnected")
    # Redis is the shared truth again: a's outage-time copy predates its new subscription.
    tieredkit.wait_until(lambda: a.get("k") is NO_VALUE, "host a follows Redis again")
    a.set("k", "after")
    assert tieredkit.redis_client(private_redis.url).get("k") is not None
    tieredkit.wait_until(lambda: b.get("k") == "after", "host b reads host a's write")
    assert a.backend.guard.healthy and b.backend.guard.healthy


def test_raise_names_the_remote_and_fails_fast_during_the_backoff(private_redis, tmp_path):
    region = tier(private_redis, tmp_path, remote_backoff=30, remote_backoff_max=30)
    region.set("cached", "v")
    private_redis.kill()
    with pytest.raises(RemoteError, match=f"dogpile.cache.redis at {private_redis.url}") as info:
        region.get("missing")
    assert info.value.__cause__ is not None  # the redis-py error, chained
    with pytest.raises(RemoteError, match="next attempt in"):
        region.set("k", "v")  # during the back-off: no network call at all
    assert region.backend.local.get_serialized("k") is NO_VALUE  # nothing half-written
    with pytest.raises(RemoteError):
        region.get_or_create("k", lambda: "v")
    assert region.backend.guard.attempts == 3  # set, get before the kill; the failing get


def test_a_password_in_the_url_is_never_shown():
    name = describe("dogpile.cache.redis", {"url": "redis://app:s3cret@cache.example:6380/2"})
    assert "s3cret" not in name
    assert name == "dogpile.cache.redis at redis://app:***@cache.example:6380/2"


def _timed_get(url, base_dir, remote_errors, go, results) -> None:
    region = tieredkit.region(
        url, base_dir, remote_errors=remote_errors, invalidation=None, local_expiration_time=60
    )
    region.get("warm")
    results.put("ready")
    assert go.wait(WAIT)  # the server is paused now
    timings = []
    for _ in range(3):
        started = time.monotonic()
        try:
            outcome = "miss" if region.get("missing") is NO_VALUE else "hit"
        except RemoteError as exc:
            outcome = type(exc).__name__
        timings.append((outcome, time.monotonic() - started))
    results.put(timings)


@pytest.mark.parametrize("remote_errors", ["degrade", "raise"])
def test_a_hung_redis_costs_a_bounded_time(private_redis, tmp_path, remote_errors):
    go, results = SPAWN.Event(), SPAWN.Queue()
    worker = SPAWN.Process(
        target=_timed_get,
        args=(private_redis.url, str(tmp_path / "a"), remote_errors, go, results),
    )
    worker.start()
    try:
        assert results.get(timeout=WAIT) == "ready"
        with private_redis.paused():  # accepts nothing, answers nothing
            go.set()
            (first, first_took), *rest = results.get(timeout=2 * WAIT)
    finally:
        worker.join(WAIT)
    expected = "miss" if remote_errors == "degrade" else "RemoteError"
    assert first == expected
    # Bounded by the tier's socket timeout (1 s) and one retry: never a hang.
    assert first_took < 2 * 1.0 + WAIT / 6
    for outcome, took in rest:  # during the back-off: no network wait at all
        assert outcome == expected
        assert took < first_took


def test_a_creator_outliving_lock_timeout_stores_its_value_with_a_warning(
    private_redis, tmp_path, caplog
):
    region = tieredkit.region(private_redis.url, str(tmp_path / "a"), remote={"lock_timeout": 0.3})

    def slow_creator():
        time.sleep(0.6)  # the Redis lock expires meanwhile
        return "slow value"

    with caplog.at_level(logging.WARNING, logger="dogpile_fsbackend.tierlock"):
        assert region.get_or_create("k", slow_creator) == "slow value"
    assert "ran longer than the remote's lock_timeout" in caplog.text
    assert region.get("k") == "slow value"


def _busy_host(url, base_dir, remote_errors, ops, failed, stop, results) -> None:
    """A host serving get_or_create and set in a loop; counts what succeeded and failed."""
    region = tieredkit.region(url, base_dir, remote_errors=remote_errors, **tieredkit.FAST_BACKOFF)
    errors: dict[str, int] = {}
    i = 0
    while not stop.is_set():
        i += 1
        try:
            key = f"k{i % 20}"
            value = region.get_or_create(key, lambda i=i: f"made {i}")
            assert isinstance(value, str) and value.startswith("made ")
            if i % 5 == 0:
                region.set(f"w{i % 7}", i)
        except Exception as exc:
            name = "RemoteError" if isinstance(exc, RemoteError) else repr(exc)
            errors[name] = errors.get(name, 0) + 1
            with failed.get_lock():
                failed.value += 1
        else:
            with ops.get_lock():
                ops.value += 1
        time.sleep(0.001)
    results.put(errors)


@pytest.mark.parametrize("remote_errors", ["degrade", "raise"])
def test_redis_killed_and_restarted_under_busy_hosts(private_redis, tmp_path, remote_errors):
    stop, results = SPAWN.Event(), SPAWN.Queue()
    counters = [SPAWN.Value("q", 0) for _ in range(2)]
    failures = [SPAWN.Value("q", 0) for _ in range(2)]
    workers = [
        SPAWN.Process(
            target=_busy_host,
            args=(
                private_redis.url,
                str(tmp_path / f"host{h}"),
                remote_errors,
                counters[h],
                failures[h],
                stop,
                results,
            ),
        )
        for h in range(2)
    ]
    for worker in workers:
        worker.start()

    def all_grew_by(amount):
        marks = [c.value for c in counters]

        def grew() -> bool:
            assert all(w.is_alive() for w in workers), "a host died"
            return all(c.value >= m + amount for c, m in zip(counters, marks, strict=True))

        return grew

    try:
        tieredkit.wait_until(all_grew_by(50), "both hosts are serving")
        private_redis.kill()
        if remote_errors == "degrade":  # they keep serving, locally
            tieredkit.wait_until(all_grew_by(200), "both hosts serve while Redis is down")
        else:  # they raise RemoteError
            tieredkit.wait_until(lambda: all(f.value for f in failures), "both hosts raise")
        private_redis.start()
        tieredkit.wait_until(all_grew_by(200), "both hosts serve after Redis returned")
    finally:
        stop.set()
        outcomes = [results.get(timeout=WAIT) for _ in workers]
        for worker in workers:
            worker.join(WAIT)
    if remote_errors == "degrade":
        assert outcomes == [{}, {}]  # not one call failed
    else:
        for errors in outcomes:
            assert set(errors) <= {"RemoteError"}, errors  # a clear error, nothing else


@pytest.mark.parametrize("remote_errors", ["degrade", "raise"])
def test_a_lock_taken_before_an_outage_is_released_during_the_backoff(
    private_redis, tmp_path, remote_errors
):
    """A failure elsewhere (here a read from a hung Redis) must not keep the Redis lock a
    creator took before it: skipped during the back-off, its release left the key locked
    on every host until lock_timeout (forever without one)."""
    region = tier(
        private_redis,
        tmp_path,
        remote_errors=remote_errors,
        invalidation=None,
        local_expiration_time=60,
        remote_backoff=30,
        remote_backoff_max=30,
    )
    mutex = region.backend.get_mutex("k")
    assert mutex.acquire()
    client = tieredkit.redis_client(private_redis.url)
    assert client.exists("_lockk") == 1
    # The creator's host sees Redis fail meanwhile (raise: RemoteError; degrade: a miss).
    with private_redis.paused(), contextlib.suppress(RemoteError):
        region.get("other")
    assert not region.backend.guard.healthy  # Redis answers again; the back-off lasts 30 s
    mutex.release()
    assert client.exists("_lockk") == 0
    other_host = tier(private_redis, tmp_path, "b", invalidation=None, local_expiration_time=60)
    other = other_host.backend.get_mutex("k")
    assert other.acquire(False)  # at once, not after lock_timeout
    other.release()


def test_a_value_written_only_locally_is_dropped_when_redis_takes_writes_again(
    private_redis, tmp_path
):
    """Redis out of memory (maxmemory, noeviction) refuses writes but keeps the pub/sub
    channel: host a's set is local only, and its listener never drops.  When Redis
    takes writes again, Redis is the shared truth: no process of host a may keep
    serving the local-only value."""
    degrade = {"remote_errors": "degrade", **tieredkit.FAST_BACKOFF}
    a = tier(private_redis, tmp_path, "a", **degrade)
    same_host = tieredkit.Host(private_redis.url, str(tmp_path / "a"), **degrade)
    try:
        a.set("k", "v1")
        assert same_host("get", "k") == "v1"
        admin = tieredkit.redis_client(private_redis.url)
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        a.set("k", "v2")  # refused: OOM
        assert not a.backend.guard.healthy
        assert a.get("k") == "v2"  # meanwhile host a is a single-host cache
        assert a.backend.listener.connected
        admin.config_set("maxmemory", 0)
        tieredkit.wait_until(lambda: a.get("k") == "v1", "host a follows Redis again")
        assert same_host("poll", "k", "v1") < WAIT
    finally:
        same_host.close()


@pytest.mark.parametrize("change", ["set", "delete"])
def test_a_change_whose_message_was_refused_is_announced_when_redis_answers(
    private_redis, tmp_path, change
):
    """The write reaches Redis but its message does not (here an ACL refuses PUBLISH):
    the other host keeps its older copy, trusted, until the writer announces the key
    once Redis answers it again."""
    admin = tieredkit.redis_client(private_redis.url)
    admin.acl_setuser(
        "tier", enabled=True, passwords=["+secret"], keys=["*"], channels=["*"], commands=["+@all"]
    )
    writer_url = f"redis://tier:secret@127.0.0.1:{private_redis.port}/0"
    degrade = {"remote_errors": "degrade", **tieredkit.FAST_BACKOFF}
    a = tieredkit.region(writer_url, str(tmp_path / "a"), **degrade)
    b = tier(private_redis, tmp_path, "b", **degrade)
    a.set("k", "v1")
    assert b.get("k") == "v1"
    admin.acl_setuser("tier", commands=["-publish"])
    if change == "set":
        a.set("k", "v2")
    else:
        a.delete("k")
    assert (admin.get("k") is None) == (change == "delete")  # Redis has the change
    assert not a.backend.guard.healthy  # the message was refused
    admin.acl_setuser("tier", commands=["+publish"])
    expected = "v2" if change == "set" else NO_VALUE
    tieredkit.wait_until(
        lambda: a.get("other") is NO_VALUE and b.get("k") == expected,
        "host b got host a's change",
    )


def test_a_lock_wait_is_not_the_probe_that_the_other_calls_wait_for(private_redis, tmp_path):
    """Redis is back; the first call after the back-off, the probe, is a blocking acquire
    of a lock another host holds.  The probe must not last as long as that wait: every
    other call of the process stays degraded (local only) until the probe returns."""
    holder = tieredkit.Host(private_redis.url, str(tmp_path / "b"), remote={"lock_timeout": 300})
    try:
        region = tier(
            private_redis,
            tmp_path,
            remote_errors="degrade",
            invalidation=None,
            local_expiration_time=60,
            remote_backoff=0.2,
            remote_backoff_max=0.2,
        )
        assert holder("hold", "k") is True
        guard = region.backend.guard
        with private_redis.paused():
            region.get("x")  # times out: the back-off begins
        tieredkit.wait_until(lambda: time.monotonic() > guard._retry_at, "the back-off ended")
        mutex = region.backend.get_mutex("k")
        waiter = threading.Thread(target=mutex.acquire)
        attempts = guard.attempts
        waiter.start()  # the probe: waits for host b's lock
        tieredkit.wait_until(lambda: guard.attempts > attempts, "the waiter probes Redis")
        tieredkit.wait_until(
            lambda: region.get("y") is NO_VALUE and guard.healthy,
            "the process uses Redis again",
            timeout=10,
        )
        assert waiter.is_alive()  # still waiting for host b's lock
        tieredkit.redis_client(private_redis.url).delete("_lockk")  # as if b released it
        waiter.join(WAIT)
        assert not waiter.is_alive()
        mutex.release()
    finally:
        holder.close()


def test_a_hung_redis_cluster_degrades_in_a_bounded_time(redis_cluster, tmp_path):
    """dogpile's cluster backend hands redis-py only its connection_kwargs, so the tier's
    timeouts must go there; and the cluster client's own errors ("cannot be connected")
    mean an outage as much as a timeout does."""
    region = make_region().configure(
        "dogpile_fsbackend.tiered",
        arguments={
            "local": {"base_dir": str(tmp_path / "a")},
            "remote_backend": "dogpile.cache.redis_cluster",
            "remote": {"url": redis_cluster.url, "distributed_lock": True, "lock_timeout": 30},
            "local_expiration_time": 60,
            "remote_errors": "degrade",
        },
    )
    region.set("warm", "v")
    node = region.backend.remote.writer_client.get_default_node()
    assert node.redis_connection.connection_pool.connection_kwargs["socket_timeout"] == 1.0
    outcome = []

    def read() -> None:
        started = time.monotonic()
        try:
            outcome.append(region.get("missing"))
        except Exception as exc:
            outcome.append(repr(exc))
        outcome.append(time.monotonic() - started)

    with redis_cluster.paused():  # accepts nothing, answers nothing
        reader = threading.Thread(target=read)
        reader.start()
        reader.join(WAIT)
        hung = reader.is_alive()
    reader.join(WAIT)
    assert not hung, "a call to a hung cluster node never returned"
    got, took = outcome
    assert got is NO_VALUE  # degraded: a miss
    assert took < 2 * 1.0 + WAIT / 6  # the tier's socket timeout and one retry


def _fork_during_a_probe(url, base_dir, redis_pid, results) -> None:
    """A pre-fork master (gunicorn --preload) forks while one of its threads probes a
    hung Redis: the child has no such thread, so nothing ends that probe there."""
    try:
        region = tieredkit.region(
            url,
            base_dir,
            remote_errors="degrade",
            invalidation=None,
            local_expiration_time=60,
            remote_backoff=0.2,
            remote_backoff_max=0.2,
        )
        guard = region.backend.guard
        os.kill(redis_pid, signal.SIGSTOP)
        try:
            region.get("x")  # times out: the back-off begins
            tieredkit.wait_until(lambda: time.monotonic() > guard._retry_at, "back-off over")
            prober = threading.Thread(target=region.get, args=("y",))
            prober.start()  # the probe: waits for the hung Redis
            tieredkit.wait_until(lambda: guard._probing, "a thread probes")
            child = fork_child(
                lambda: tieredkit.wait_until(
                    lambda: region.get("z") is NO_VALUE and guard.healthy,
                    "the child uses Redis again",
                    timeout=10,
                )
            )
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        prober.join(WAIT)
        results.put(os.waitstatus_to_exitcode(reap(child)))
    except BaseException as exc:
        results.put(repr(exc))
        raise


def test_a_child_forked_during_a_probe_probes_again(private_redis, tmp_path):
    results = SPAWN.Queue()
    master = SPAWN.Process(
        target=_fork_during_a_probe,
        args=(private_redis.url, str(tmp_path / "a"), private_redis.process.pid, results),
    )
    master.start()
    try:
        assert results.get(timeout=2 * WAIT) == 0
    finally:
        master.join(WAIT)


def test_lock_remote_keeps_one_holder_when_redis_fails_while_it_is_held(private_redis, tmp_path):
    """lock="remote": a thread holds the Redis lock when Redis dies; another thread of
    the process, falling back to this host's lock, must not get the key too (dogpile
    shares one mutex object per key between a region's threads)."""
    region = tier(
        private_redis,
        tmp_path,
        lock="remote",
        remote_errors="degrade",
        invalidation=None,
        local_expiration_time=60,
        **tieredkit.FAST_BACKOFF,
    )
    mutex = region.backend.get_mutex("k")
    assert mutex.acquire()  # the Redis lock
    private_redis.kill()
    other = []
    thread = threading.Thread(target=lambda: other.append(mutex.acquire(False)))
    thread.start()
    thread.join(WAIT)
    assert other == [False]  # the first holder still has the key
    mutex.release()
    assert mutex.acquire(False)  # now this host's lock, Redis being out
    mutex.release()
