"""The tiered backend in one process: the interface, the two tiers, configuration, warnings.

Several tiered backends with separate ``base_dir``s stand for several hosts;
tests/test_tiered_hosts.py runs them in separate processes.
"""

from __future__ import annotations

import configparser
import copy
import logging
import pickle
import subprocess
import sys
import threading

import pytest
import tieredkit
from conftest import WAIT
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE
from dogpile.cache.proxy import ProxyBackend

from dogpile_fsbackend import (
    ConfigError,
    RemoteConfigWarning,
    TieredBackend,
    TieredProxy,
)
from dogpile_fsbackend.pubsub import Listener, value_digest


@pytest.fixture
def host(redis_url, tmp_path):
    """``host("a", **arguments)``: a tiered region with base_dir ``tmp_path/a``."""

    def make(name: str, remote: dict | None = None, **top):
        return tieredkit.region(redis_url, str(tmp_path / name), remote, **top)

    return make


def issue_arguments(url: str, base_dir: str) -> dict:
    """The arguments the issue shows a user writing, pointed at the test's Redis."""
    return {
        "local": {"base_dir": base_dir, "cache_size": "2GiB"},
        "remote_backend": "dogpile.cache.redis",
        "remote": {
            "url": url,
            "distributed_lock": True,
            "lock_timeout": 120,
            "redis_expiration_time": 86400,
        },
        "lock": "both",
        "local_expiration_time": 60,
        "invalidation": "pubsub",
        "remote_errors": "raise",
    }


# -- the interface the issue shows ----------------------------------------------------


def test_the_issues_example_works_without_a_warning(redis_url, tmp_path):
    # Warnings are errors in this suite: the documented configuration raises none.
    region = make_region().configure(
        "dogpile_fsbackend.tiered",
        expiration_time=3600,
        arguments=issue_arguments(redis_url, str(tmp_path / "cache")),
    )
    backend = region.backend
    assert isinstance(backend, TieredBackend)
    assert backend.lock_mode == "both" and backend.invalidation == "pubsub"
    assert backend.guard.mode == "raise"
    assert backend.local.settings.expiration_time == 60
    assert backend.local.settings.cache_size == 2 * 1024**3
    assert backend.remote.redis_expiration_time == 86400

    @region.cache_on_arguments()
    def square(x):
        return x * x

    assert square(12) == 144
    assert square(12) == 144
    key = region.function_key_generator(None, square)(12)
    assert 0 < redis_ttl(redis_url, key) <= 86400


def redis_ttl(url: str, key: str) -> int:
    import redis

    return redis.Redis.from_url(url).ttl(key)


def test_a_remote_hit_is_copied_into_the_local_tier_with_the_same_bytes(host, redis_url):
    a, b = host("a"), host("b")
    a.set("k", {"answer": 42})
    stored = redis_raw(redis_url, "k")
    assert b.backend.local.get_serialized("k") is NO_VALUE
    assert b.get("k") == {"answer": 42}
    assert b.backend.remote_hits == 1
    # The same serialized bytes in Redis and in both local tiers: dogpile's
    # metadata (creation time) included, so expiration means the same everywhere.
    assert a.backend.local.get_serialized("k") == stored
    assert b.backend.local.get_serialized("k") == stored
    assert b.get("k") == {"answer": 42}
    assert b.backend.local_hits == 1 and b.backend.remote_hits == 1


def redis_raw(url: str, key: str) -> bytes | None:
    import redis

    return redis.Redis.from_url(url).get(key)


def test_a_value_too_big_for_a_local_tier_is_served_from_redis(host, redis_url, tmp_path):
    a = host("a")
    small = tieredkit.arguments(redis_url, str(tmp_path / "b"))
    small["local"]["cache_size"] = 64 * 1024
    b = make_region().configure("dogpile_fsbackend.tiered", arguments=small)
    assert b.backend.listener.wait_connected(WAIT)
    big = "x" * 200_000
    a.set("big", big)
    for _ in range(2):  # no CacheSizeWarning on a read (warnings are errors here)
        assert b.get("big") == big
    assert b.backend.remote_hits == 2
    assert b.backend.local.get_serialized("big") is NO_VALUE


def test_get_multi_mixes_local_hits_remote_hits_and_misses(host):
    a, b = host("a"), host("b")
    a.set_multi({"one": 1, "two": 2})
    b.set("three", 3)
    assert b.get_multi(["one", "two", "three", "four"]) == [1, 2, 3, NO_VALUE]
    assert b.backend.remote_hits == 2 and b.backend.local_hits == 1
    assert b.get_multi(["one", "two"]) == [1, 2]
    assert b.backend.local_hits == 3


class _Observer(ProxyBackend):
    """Sits on the real Redis backend and records what the local tier holds at each call."""

    tier: TieredProxy
    seen: list

    def set_serialized_multi(self, mapping):
        self.seen.append(("set", {k: self.tier.local.get_serialized(k) for k in mapping}))
        self.proxied.set_serialized_multi(mapping)

    def delete_multi(self, keys):
        self.seen.append(("delete", {k: self.tier.local.get_serialized(k) for k in keys}))
        self.proxied.delete_multi(keys)


def test_writes_and_deletes_reach_the_remote_before_the_local_tier(redis_url, tmp_path):
    observer = _Observer()
    observer.seen = []
    tier = TieredProxy(local={"base_dir": str(tmp_path / "a")}, lock="local")
    observer.tier = tier
    region = make_region().configure(
        "dogpile.cache.redis",
        arguments={"url": redis_url, "socket_timeout": 1, "connection_kwargs": {"retry": None}},
        wrap=[tier, observer],  # the last wraps first: tier -> observer -> redis
    )
    region.set("k", "old")
    old = tier.local.get_serialized("k")
    region.set("k", "new")
    region.delete("k")
    (_, first), (_, second), (_, third) = observer.seen
    assert first == {"k": NO_VALUE}  # nothing local yet when Redis got the first write
    assert second == {"k": old}  # the local tier still had the old value
    assert third["k"] not in (NO_VALUE, old)  # the new value, until the delete after Redis's
    assert tier.local.get_serialized("k") is NO_VALUE


def test_delete_drops_both_tiers_on_every_host(host, redis_url):
    a, b = host("a"), host("b")
    a.set("k", "v")
    assert b.get("k") == "v"
    a.delete("k")
    assert redis_raw(redis_url, "k") is None
    tieredkit.wait_until(lambda: b.get("k") is NO_VALUE, "host b saw the delete")
    assert a.backend.local.get_serialized("k") is NO_VALUE


# -- configuration --------------------------------------------------------------------


def test_configure_from_config_with_nested_tier_keys(redis_url, tmp_path):
    base_dir = tmp_path / "ini"
    parser = configparser.ConfigParser()
    parser.read_string(
        f"""
[cache]
backend = dogpile_fsbackend.tiered
expiration_time = 3600
arguments.local.base_dir = {base_dir}
arguments.local.cache_size = 64MiB
arguments.local.file_mode = 640
arguments.local.dir_mode = 750
arguments.local.fsync = false
arguments.remote_backend = dogpile.cache.redis
arguments.remote.url = {redis_url}
arguments.remote.distributed_lock = true
arguments.remote.lock_timeout = 120
arguments.remote.lock_sleep = 0.02
arguments.remote.redis_expiration_time = 86400
arguments.lock = both
arguments.local_expiration_time = 60
arguments.invalidation = pubsub
arguments.remote_errors = degrade
arguments.remote_backoff = 0.5
"""
    )
    config = {f"cache.{key}": value for key, value in parser["cache"].items()}
    region = make_region().configure_from_config(config, "cache.")
    backend = region.backend
    local = backend.local.settings
    assert local.cache_size == 64 * 1024**2
    assert local.file_mode == 0o640 and local.dir_mode == 0o750  # octal, not the int 640
    assert local.fsync is False and local.expiration_time == 60
    assert backend.remote.lock_timeout == 120 and backend.remote.distributed_lock is True
    assert backend.remote.lock_sleep == 0.02
    assert backend.guard.mode == "degrade" and backend.guard.backoff == 0.5
    assert backend.invalidation == "pubsub"
    region.set("k", "v")
    assert region.get("k") == "v"
    entries = [p for p in (base_dir / "data").rglob("*") if p.is_file()]
    assert entries and all(p.stat().st_mode & 0o777 == 0o640 for p in entries)


def test_configure_from_config_with_invalidation_none(redis_url, tmp_path):
    config = {
        "cache.backend": "dogpile_fsbackend.tiered",
        "cache.arguments.local.base_dir": str(tmp_path / "ini"),
        "cache.arguments.remote_backend": "dogpile.cache.redis",
        "cache.arguments.remote.url": redis_url,
        "cache.arguments.remote.distributed_lock": "true",
        "cache.arguments.remote.lock_timeout": "30",
        "cache.arguments.invalidation": "None",
        "cache.arguments.local_expiration_time": "5",
        "cache.arguments.lock": "local",
    }
    backend = make_region().configure_from_config(config, "cache.").backend
    assert backend.invalidation is None and backend.listener is None
    assert backend.lock_mode == "local"
    assert backend.local.settings.expiration_time == 5


def test_arguments_are_never_modified(redis_url, tmp_path):
    given = issue_arguments(redis_url, str(tmp_path / "cache"))
    given["remote"]["connection_kwargs"] = {"client_name": "tests"}
    snapshot = copy.deepcopy(given)
    make_region().configure("dogpile_fsbackend.tiered", arguments=given)
    assert given == snapshot


@pytest.mark.parametrize(
    ("change", "argument", "allowed"),
    [
        ({"lock": "sometimes"}, "lock", "'both', 'remote', 'local'"),
        ({"remote_errors": "ignore"}, "remote_errors", "'raise', 'degrade'"),
        ({"invalidation": "gossip"}, "invalidation", "'pubsub', None"),
        ({"local_expiration_time": -1}, "local_expiration_time", "positive duration"),
        ({"remote_backoff": "soon"}, "remote_backoff", "positive duration"),
        ({"remote_backend": "dogpile.cache.nonesuch"}, "remote_backend", "installed"),
        ({"local": "/var/cache"}, "local", "dict"),
        ({"local": {"cache_size": "lots"}}, "local.base_dir", "base_dir"),
        ({"local": {"base_dir": "{tmp}/x", "cache_size": "lots"}}, "local.cache_size", "GiB"),
        ({"local": {"base_dir": "{tmp}/x", "read_only": "yes"}}, "local.read_only", "copy"),
    ],
)
def test_a_bad_argument_is_named(redis_url, tmp_path, change, argument, allowed):
    given = issue_arguments(redis_url, str(tmp_path / "cache"))
    for name, value in change.items():
        if isinstance(value, dict) and "base_dir" in value:
            value = {**value, "base_dir": value["base_dir"].format(tmp=tmp_path)}
        given[name] = value
    with pytest.raises(ConfigError) as info:
        make_region().configure("dogpile_fsbackend.tiered", arguments=given)
    assert info.value.argument == argument
    assert allowed in str(info.value)


@pytest.mark.parametrize("missing", ["local", "remote_backend"])
def test_required_arguments(redis_url, tmp_path, missing):
    given = issue_arguments(redis_url, str(tmp_path / "cache"))
    del given[missing]
    with pytest.raises(ConfigError) as info:
        make_region().configure("dogpile_fsbackend.tiered", arguments=given)
    assert info.value.argument == missing


def test_unknown_arguments_are_logged_not_refused(redis_url, tmp_path, caplog):
    given = {**issue_arguments(redis_url, str(tmp_path / "cache")), "colour": "blue"}
    with caplog.at_level(logging.WARNING):
        make_region().configure("dogpile_fsbackend.tiered", arguments=given)
    assert "colour" in caplog.text


def test_pubsub_needs_a_redis_remote(tmp_path):
    with pytest.raises(ConfigError) as info:
        make_region().configure(
            "dogpile_fsbackend.tiered",
            arguments={
                "local": {"base_dir": str(tmp_path / "cache")},
                "remote_backend": "dogpile.cache.memory",
                "invalidation": "pubsub",
            },
        )
    assert info.value.argument == "invalidation"


def _on_a_memory_remote(tmp_path):
    """A tiered region whose remote is dogpile's memory backend (no server needed)."""
    return make_region().configure(
        "dogpile_fsbackend.tiered",
        arguments={
            "local": {"base_dir": str(tmp_path / "cache")},
            "remote_backend": "dogpile.cache.memory",
            "local_expiration_time": 60,
            "lock": "local",
        },
    )


def test_any_dogpile_backend_can_be_the_remote(tmp_path):
    # Not a shared remote, but any backend by name works (here, dogpile's memory backend).
    region = _on_a_memory_remote(tmp_path)
    assert region.backend.invalidation is None
    region.set("k", [1, 2])
    region.backend.local.delete("k")
    assert region.get("k") == [1, 2]  # from the remote tier, copied back
    assert region.backend.local.get_serialized("k") is not NO_VALUE


# -- warnings for known Redis pitfalls ----------------------------------------------------


@pytest.mark.parametrize(
    ("remote", "top", "match"),
    [
        ({"distributed_lock": False}, {}, "every host creates"),
        ({"lock_timeout": None}, {}, "no lock_timeout"),
        ({"lock_sleep": 0.1}, {"lock": "remote"}, "lock_sleep=0.1"),
        ({}, {"invalidation": None}, "local_expiration_time"),
        (
            {"socket_timeout": None, "connection_kwargs": {"socket_timeout": None}},
            {},
            "no socket_timeout",
        ),
    ],
)
def test_known_pitfalls_warn_and_log(redis_url, tmp_path, caplog, remote, top, match):
    given = tieredkit.arguments(redis_url, str(tmp_path / "cache"), remote, **top)
    with caplog.at_level(logging.WARNING), pytest.warns(RemoteConfigWarning, match=match):
        make_region().configure("dogpile_fsbackend.tiered", arguments=given)
    assert match in caplog.text


def test_sentinel_reading_from_replicas_warns(tmp_path):
    with pytest.warns(RemoteConfigWarning, match="replica"):
        make_region().configure(
            "dogpile_fsbackend.tiered",
            arguments={
                "local": {"base_dir": str(tmp_path / "cache")},
                "remote_backend": "dogpile.cache.redis_sentinel",
                "remote": {"sentinels": [["127.0.0.1", 1]], "lock_timeout": 30},
                "invalidation": None,
                "local_expiration_time": 5,
            },
        )


def test_a_wrapped_client_with_redis_pys_defaults_warns(redis_url, tmp_path):
    # redis-py 8 retries ten times with waits by default; redis-py 5 has no socket timeout.
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with pytest.warns(
        RemoteConfigWarning, match="retries a failed call 10 times|no socket_timeout"
    ):
        make_region().configure(
            "dogpile.cache.redis",
            arguments={"host": "127.0.0.1", "port": port},
            wrap=[TieredProxy(local={"base_dir": str(tmp_path / "cache")}, lock="local")],
        )


def test_has_lock_timeout_is_forwarded(host):
    assert host("a").backend.has_lock_timeout() is True  # the Redis lock expires (30 s)
    assert host("b", lock="local").backend.has_lock_timeout() is False
    with pytest.warns(RemoteConfigWarning):
        unbounded = host("c", remote={"lock_timeout": None})
    assert unbounded.backend.has_lock_timeout() is False


# -- the redis extra ----------------------------------------------------------------------


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT, check=False
    )


def test_importing_the_package_does_not_import_redis():
    result = run_python(
        "import sys, dogpile_fsbackend, dogpile_fsbackend.tiered\n"
        "print(sorted(m for m in sys.modules if m == 'redis' or m.startswith('redis.')))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_without_the_redis_extra_the_error_says_how_to_install_it(tmp_path):
    result = run_python(
        "import sys\n"
        "sys.modules['redis'] = None  # as if the redis client were not installed\n"
        "from dogpile.cache import make_region\n"
        f"local = make_region().configure('dogpile_fsbackend.pickled', "
        f"arguments={{'base_dir': {str(tmp_path / 'local')!r}}})\n"
        "local.set('k', 'v'); assert local.get('k') == 'v'\n"
        "from dogpile_fsbackend import MissingExtraError\n"
        "try:\n"
        "    make_region().configure('dogpile_fsbackend.tiered', arguments={\n"
        f"        'local': {{'base_dir': {str(tmp_path / 'tier')!r}}},\n"
        "        'remote_backend': 'dogpile.cache.redis',\n"
        "        'remote': {'url': 'redis://127.0.0.1:1/0', 'distributed_lock': True}})\n"
        "except MissingExtraError as exc:\n"
        "    assert isinstance(exc, ImportError)\n"
        "    print(exc)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "pip install dogpile_fsbackend[redis]" in result.stdout


# -- the ProxyBackend ---------------------------------------------------------------------


def test_proxy_puts_a_local_tier_in_front_of_a_backend_you_have(redis_url, tmp_path):
    def host_region(name):
        region = make_region().configure(
            "dogpile.cache.redis",
            arguments={
                "url": redis_url,
                "distributed_lock": True,
                "lock_timeout": 30,
                "thread_local_lock": False,
                "socket_timeout": 1,
                "connection_kwargs": {"retry": None},
            },
            wrap=[TieredProxy(local={"base_dir": str(tmp_path / name)}, local_expiration_time=60)],
        )
        assert region.backend.listener.wait_connected(WAIT)
        return region

    a, b = host_region("a"), host_region("b")
    calls = []
    assert a.get_or_create("k", lambda: calls.append("a") or "made") == "made"
    assert b.get_or_create("k", lambda: calls.append("b") or "again") == "made"
    assert calls == ["a"]
    assert b.backend.local.get_serialized("k") is not NO_VALUE  # copied in
    a.set("k", "changed")
    tieredkit.wait_until(lambda: b.get("k") == "changed", "host b saw host a's write")
    assert b.backend.get_mutex("k") is not None


def test_proxy_takes_a_dict_or_keywords_and_refuses_a_remote(tmp_path):
    TieredProxy({"local": {"base_dir": str(tmp_path / "a")}, "lock": "local"})
    with pytest.raises(ConfigError) as info:
        TieredProxy(local={"base_dir": str(tmp_path / "b")}, remote_backend="dogpile.cache.redis")
    assert info.value.argument == "remote_backend"


def test_proxy_refuses_a_region_that_does_not_serialize(tmp_path):
    region = make_region().configure(
        "dogpile.cache.memory",
        wrap=[TieredProxy(local={"base_dir": str(tmp_path / "a")}, local_expiration_time=5)],
    )
    with pytest.raises(TypeError, match="serialized bytes"):
        region.set("k", "v")


# -- coherence details --------------------------------------------------------------------


def _listener_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("dogpile_fsbackend listener")}


def test_one_listener_thread_per_process_and_server(host):
    # Compared with the threads before, not counted: listeners of earlier tests (other
    # channels, other servers) may still be running, or stopping.
    first = host("a")
    before = _listener_threads()
    assert first.backend.listener._thread in before
    others = [host(name) for name in "bcd"]
    assert {r.backend.listener for r in others} == {first.backend.listener}
    assert _listener_threads() <= before  # no new thread


def test_a_racing_reader_drops_the_copy_an_invalidation_outdated(host):
    a, b = host("a"), host("b")
    a.set("k", "v1")
    old = b.backend.remote.get_serialized("k")
    listener = b.backend.listener
    generation = listener.generation  # b starts a remote read of "k" here ...
    heard = b.backend.invalidations
    a.set("k", "v2")  # ... host a writes meanwhile ...
    tieredkit.wait_until(lambda: b.backend.invalidations > heard, "b heard of a's write")
    b.backend._copy_in({"k": old}, generation)  # ... and b's slow copy of v1 lands afterwards
    assert b.backend.local.get_serialized("k") is NO_VALUE
    assert b.get("k") == "v2"


def test_a_writer_does_not_handle_its_own_message(host):
    writer, other_host = host("a"), host("b")  # one process, one listener
    writer.set("k", "v")
    tieredkit.wait_until(lambda: other_host.backend.invalidations == 1, "b heard of the write")
    # The same message went past the writer's tier: it counted its write as it made it.
    assert writer.backend.invalidations == 0
    assert writer.backend.local.get_serialized("k") is not NO_VALUE


def test_another_process_of_this_host_keeps_the_writers_copy(host, redis_url, tmp_path):
    writer = tieredkit.Host(redis_url, str(tmp_path / "a"))  # the same local tier
    try:
        reader = host("a")
        heard = reader.backend.invalidations
        writer("set", "k", "fresh")
        tieredkit.wait_until(lambda: reader.backend.invalidations > heard, "the message arrived")
        assert reader.backend.local.get_serialized("k") is not NO_VALUE  # not dropped
        assert reader.get("k") == "fresh"
        assert reader.backend.local_hits == 1 and reader.backend.remote_hits == 0
    finally:
        writer.close()


def test_this_hosts_own_message_drops_an_older_copy(host):
    tier = host("a").backend
    new = pickle.dumps("new")
    tier.local.set_serialized("k", pickle.dumps("racing older copy"))
    tier.invalidated(tier.origin, [("k", value_digest(new))])
    assert tier.local.get_serialized("k") is NO_VALUE
    tier.local.set_serialized("k", new)
    tier.invalidated(tier.origin, [("k", value_digest(new))])
    assert tier.local.get_serialized("k") == new
    tier.invalidated("another host", [("k", value_digest(new))])
    assert tier.local.get_serialized("k") is NO_VALUE


def test_listener_stops_when_no_backend_uses_it(redis_server, tmp_path):
    import gc

    region = tieredkit.region(redis_server.url, str(tmp_path / "a"), channel="short-lived")
    listener = region.backend.listener
    assert isinstance(listener, Listener)
    thread = listener._thread
    del region
    gc.collect()
    thread.join(WAIT)
    assert not thread.is_alive()


# -- the local tier's figures ---------------------------------------------------------------


@pytest.mark.parametrize("lock", ["both", "remote", "local"])
def test_a_get_or_create_counts_one_lookup_in_the_local_figures(host, lock):
    # As for dogpile_fsbackend.pickled: one miss when the creator runs, one hit when a
    # call returns a cached value (dogpile's look again under the lock is the same call).
    region = host("a", lock=lock)
    assert region.get_or_create("k", lambda: "made") == "made"
    assert region.get_or_create("k", lambda: "again") == "made"
    figures = region.backend.stats()
    assert (figures["misses"], figures["hits"]) == (1, 1)


def test_a_waiter_on_this_hosts_creator_counts_one_hit(host):
    region = host("a")
    started, finish = threading.Event(), threading.Event()

    def slow_creator():
        started.set()
        assert finish.wait(WAIT)
        return "made"

    creator = threading.Thread(target=region.get_or_create, args=("k", slow_creator))
    creator.start()
    assert started.wait(WAIT)
    tier_misses = region.backend.misses  # the creator's look, and its look again
    waiter_got = []
    waiter = threading.Thread(
        target=lambda: waiter_got.append(region.get_or_create("k", lambda: "again"))
    )
    waiter.start()
    # The waiter missed in both tiers: it waits for the creator's lock now.
    tieredkit.wait_until(lambda: region.backend.misses > tier_misses, "the waiter missed")
    finish.set()
    creator.join(WAIT)
    waiter.join(WAIT)
    assert waiter_got == ["made"]
    figures = region.backend.stats()
    assert (figures["misses"], figures["hits"]) == (1, 1)


def test_invalidation_messages_are_not_counted_as_lookups(host, redis_url, tmp_path):
    writer = tieredkit.Host(redis_url, str(tmp_path / "a"))  # the same local tier
    try:
        reader = host("a")
        before = reader.backend.stats()
        heard = reader.backend.invalidations
        writer("set", "k", "fresh")  # its message makes the reader look at its copy
        tieredkit.wait_until(lambda: reader.backend.invalidations > heard, "the message came")
        after = reader.backend.stats()
        assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])
    finally:
        writer.close()


def test_keys_and_delete_matching_are_refused_with_what_to_do_instead(tmp_path):
    """The keys that count live in the remote, which cannot list them: a listing or a
    prefix delete of this host's copies alone would mislead, so both are refused with
    a NotImplementedError that names the remote and the alternatives."""
    region = _on_a_memory_remote(tmp_path)
    region.set("user:1", "v")
    with pytest.raises(NotImplementedError, match=r"keys\(\): cannot list .*dogpile.cache.memory"):
        region.backend.keys("user:")
    with pytest.raises(NotImplementedError, match=r"local.delete_matching\(prefix\)"):
        region.backend.delete_matching("user:")
    assert region.get("user:1") == "v"  # nothing was deleted
    assert list(region.backend.local.keys("user:")) == ["user:1"]
    proxy = TieredProxy(
        local={"base_dir": str(tmp_path / "proxied")}, lock="local", local_expiration_time=60
    )
    make_region().configure("dogpile.cache.memory", wrap=[proxy])
    with pytest.raises(NotImplementedError, match=r"region\.delete_multi"):
        proxy.delete_matching("user:")


def test_a_proxy_around_the_pickled_backend_serializes_for_it(tmp_path):
    """``dogpile_fsbackend.pickled`` pickles values itself, so its region has no serializer:
    a TieredProxy around it (a shared directory as the remote) pickles as dogpile's default
    serializer would, instead of refusing every call."""

    def host(name: str):
        return make_region().configure(
            "dogpile_fsbackend.pickled",
            arguments={"base_dir": str(tmp_path / "shared")},
            wrap=[
                TieredProxy(
                    local={"base_dir": str(tmp_path / name)},
                    lock="local",
                    local_expiration_time=60,
                )
            ],
        )

    a, b = host("a"), host("b")
    a.set("k", {"v": frozenset({1})})
    assert b.get("k") == {"v": frozenset({1})}
    assert b.backend.local.get_serialized("k") is not NO_VALUE  # copied into b's tier
    assert b.get_or_create("n", lambda: 5) == 5
    assert a.get("n") == 5
    a.set_multi({"x": 1, "y": 2})
    assert b.get_multi(["x", "y", "z"]) == [1, 2, NO_VALUE]
    assert b.get_or_create_multi(["x", "w"], lambda *keys: [f"made {k}" for k in keys]) == [
        1,
        "made w",
    ]
    plain = make_region().configure(
        "dogpile_fsbackend.pickled", arguments={"base_dir": str(tmp_path / "shared")}
    )
    assert plain.get("k") == {"v": frozenset({1})}  # the remote holds dogpile's own bytes
