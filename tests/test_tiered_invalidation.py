"""region.invalidate() across hosts: SharedInvalidation carried by the tiered backend.

Simulated hosts are separate processes with separate base_dirs on one real Redis
(tieredkit.Host); two processes with one base_dir are one host.
"""

from __future__ import annotations

import time

import pytest
import tieredkit
from dogpile.cache.api import NO_VALUE
from tieredkit import MISS

from dogpile_fsbackend import SharedInvalidation, pubsub
from dogpile_fsbackend.invalidation import InvalidationTimes


@pytest.fixture
def channel(tmp_path):
    """A channel of the test's own: what one invalidation reaches (and its Redis hash)."""
    return f"test-invalidation:{tmp_path.name}"


@pytest.fixture
def hosts(tmp_path, channel):
    """``hosts(url, name, **arguments)``: a simulated host whose region has a
    SharedInvalidation on its base_dir, on the test's channel."""
    with tieredkit.host_pool() as start:

        def start_host(url: str, name: str, **top) -> tieredkit.Host:
            top.setdefault("shared_invalidation", True)
            top.setdefault("expiration_time", 3600)  # soft invalidation needs one
            top.setdefault("channel", channel)
            return start(url, str(tmp_path / name), **top)

        yield start_host


@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
def test_an_invalidation_on_one_host_reaches_every_process_of_the_others(redis_url, hosts, hard):
    a = hosts(redis_url, "a")
    b = hosts(redis_url, "b")
    b_too = hosts(redis_url, "b")  # a second process of host b
    assert a("get_or_create", "k", "v1") == "v1"
    assert b("get_or_create", "k", "other") == "v1"  # copied into b's local tier
    assert b_too("get", "k") == "v1"
    a("invalidate", hard)
    assert a("get", "k") == MISS  # dogpile's own meaning, in the invalidating process
    b("poll", "k", MISS)
    b_too("poll", "k", MISS)
    # What was created after the invalidation is a hit everywhere.
    assert b("get_or_create", "k", "v2") == "v2"
    a("poll", "k", "v2")
    assert b_too("get", "k") == "v2"


def test_a_host_that_was_not_running_catches_up_when_it_starts(redis_url, hosts):
    a = hosts(redis_url, "a")
    b = hosts(redis_url, "b")
    assert a("get_or_create", "k", "v1") == "v1"
    assert b("get", "k") == "v1"  # b's local copy, created before the invalidation
    b.close()
    a("invalidate", True)
    late = hosts(redis_url, "b")  # host b again, with its old local tier
    assert late("get", "k") == MISS  # at once: it merged what it missed before serving


def test_a_host_without_shared_invalidation_is_left_alone(redis_url, hosts, tmp_path):
    """Only processes whose region uses a SharedInvalidation on the tier's base_dir
    merge; a region without one keeps dogpile's in-process meaning and gets no file."""
    a = hosts(redis_url, "a")
    plain = hosts(redis_url, "plain", shared_invalidation=False)
    assert a("get_or_create", "k", "v1") == "v1"
    assert plain("get", "k") == "v1"
    a("invalidate", True)
    witness = hosts(redis_url, "witness")
    assert witness("get", "k") == MISS  # the invalidation went out
    assert plain("get", "k") == "v1"
    assert not (tmp_path / "plain" / "invalidation").exists()


def test_an_invalidation_during_an_outage_goes_out_when_redis_answers(private_redis, hosts):
    a = hosts(private_redis.url, "a", remote_errors="degrade", **tieredkit.FAST_BACKOFF)
    b = hosts(private_redis.url, "b", remote_errors="degrade", **tieredkit.FAST_BACKOFF)
    assert a("get_or_create", "k", "v1") == "v1"
    assert b("get", "k") == "v1"
    with private_redis.paused():
        a("invalidate", True)  # Redis answers nothing: a honours it, logs, keeps it
        assert a("get", "k") == MISS
    # No subscription needs to drop: a's next read sends it once Redis answers.
    tieredkit.wait_until(lambda: _gone(a) and _gone(b), "the held-back invalidation reaches b")


def _gone(host: tieredkit.Host) -> bool:
    return host("get", "k") == MISS


def test_with_remote_errors_raise_an_outage_raises_and_the_host_still_honours_it(
    private_redis, hosts
):
    a = hosts(private_redis.url, "a", **tieredkit.FAST_BACKOFF)
    b = hosts(private_redis.url, "b", **tieredkit.FAST_BACKOFF)
    assert a("get_or_create", "k", "v1") == "v1"
    assert b("get", "k") == "v1"
    with private_redis.paused(), pytest.raises(AssertionError, match="RemoteError"):
        a("invalidate", True)
    assert a("get", "k") == MISS  # a honours its own invalidation
    # a's next reads send it once Redis answers (the first ones fall in the back-off).
    tieredkit.wait_until(lambda: _gone(a) and _gone(b), "the held-back invalidation reaches b")


def test_garbage_in_the_shared_hash_is_logged_and_replaced(redis_url, hosts, channel):
    client = tieredkit.redis_client(redis_url)
    key = f"{channel}:region-invalidation"
    client.hset(key, mapping={"soft": "not a time", "hard": "-5"})
    a = hosts(redis_url, "a")  # catches up with the garbage: ignored
    b = hosts(redis_url, "b")
    assert a("get_or_create", "k", "v1") == "v1"
    assert b("get", "k") == "v1"
    a("invalidate", True)
    b("poll", "k", MISS)
    assert int(client.hget(key, "hard")) > 0


def test_what_another_host_announces_reaches_this_hosts_file(redis_url, tmp_path, channel):
    """In one process, the two ways in: a message the listener hands on, and the hash
    read when a subscription is confirmed. Both land in the host's file, which every
    process of the host reads."""
    base_dir = str(tmp_path / "host")
    region = tieredkit.region(
        redis_url, base_dir, expiration_time=3600, shared_invalidation=True, channel=channel
    )
    link = region.backend.region_invalidation
    region.set("k", "v")
    assert region.get("k") == "v"
    hard = time.time_ns()
    link.received(0, hard)  # as the listener hands on another host's hard invalidation
    assert region.get("k") is NO_VALUE
    assert SharedInvalidation(base_dir).times().hard_ns == hard  # in the file: every process
    region.set("k", "v2")
    soft = time.time_ns()
    client = tieredkit.redis_client(redis_url)
    client.hset(f"{channel}:region-invalidation", "soft", str(soft))  # while we were away
    link.catch_up()
    assert SharedInvalidation(base_dir).times().soft_ns == soft
    assert region.get("k") is NO_VALUE  # soft: a get treats it as expired
    assert int(client.hget(f"{channel}:region-invalidation", "hard")) == hard  # ours went up
    region.invalidate(hard=True)  # this process's own: into the hash, and announced
    assert int(client.hget(f"{channel}:region-invalidation", "hard")) > hard
    assert not link.pending


JUNK = [
    b"not json",
    b"[]",
    b'{"o": 1, "p": "x", "k": []}',
    b'{"o": "a", "p": "x", "k": [[1, 2]]}',
    b'{"o": "a", "p": "x", "k": [[1, 2, 3]]}',
    b'{"p": "x", "i": [-1, 0]}',
    b'{"p": "x", "i": [true, 0]}',
    b'{"p": "x", "i": [0, 99999999999999999999]}',
    b'{"p": "x", "i": "ab"}',
    b'{"p": "x"}',
]


def test_foreign_messages_on_the_channel_are_ignored(redis_url, tmp_path, channel):
    """Anyone may publish on a Redis channel: what is not one of our messages changes
    nothing, and the listener goes on hearing the real ones."""
    base_dir = str(tmp_path / "host")
    region = tieredkit.region(
        redis_url, base_dir, expiration_time=3600, shared_invalidation=True, channel=channel
    )
    region.set("k", "v")
    client = tieredkit.redis_client(redis_url)
    for junk in JUNK:
        client.publish(channel, junk)
    client.publish(channel, pubsub.encode("another host", {"k": None}))  # heard after them
    local = region.backend.local
    tieredkit.wait_until(lambda: local.get_serialized("k") is NO_VALUE, "the real message")
    assert region.backend.listener.connected
    assert SharedInvalidation(base_dir).times() == InvalidationTimes()  # no junk merged
