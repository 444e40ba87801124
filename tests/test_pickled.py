"""Entry points and the pickled backend's dogpile API: single and _multi calls, serializers."""

from __future__ import annotations

import io
import json
import os
import pickle
import queue
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib

import pytest
from conftest import WAIT
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE
from dogpile.cache.region import value_version

from dogpile_fsbackend import PickleFSBackend, RawFSBackend, layout, records

# -- entry points -------------------------------------------------------------------

_ENTRY_POINT_SCRIPT = textwrap.dedent(
    """
    import io, sys
    from dogpile.cache import make_region

    assert not any(m.startswith("dogpile_fsbackend") for m in sys.modules), "imported early"
    pickled = make_region().configure(
        "dogpile_fsbackend.pickled", arguments={"base_dir": sys.argv[1]}
    )
    pickled.set("key", {"answer": 42})
    assert pickled.get("key") == {"answer": 42}
    raw = make_region().configure("dogpile_fsbackend.raw", arguments={"base_dir": sys.argv[2]})
    raw.set("key", io.BytesIO(b"raw bytes"))
    with raw.get("key") as cached:
        assert cached.read() == b"raw bytes"
    for backend in (pickled.backend, raw.backend):
        print(type(backend).__module__, type(backend).__name__)
    """
)


def test_entry_points_work_in_a_fresh_interpreter(tmp_path):
    """Configuring by name loads the package through the dogpile.cache entry points."""
    result = subprocess.run(
        [
            sys.executable,
            "-I",  # no cwd on sys.path: the package must come from the installation
            "-c",
            _ENTRY_POINT_SCRIPT,
            str(tmp_path / "pickled"),
            str(tmp_path / "raw"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == [
        "dogpile_fsbackend.backends PickleFSBackend",
        "dogpile_fsbackend.backends RawFSBackend",
    ]


def test_region_backends_are_ours(pickled_region, tmp_path):
    assert isinstance(pickled_region().backend, PickleFSBackend)
    raw = make_region().configure(
        "dogpile_fsbackend.raw", arguments={"base_dir": str(tmp_path / "raw")}
    )
    assert isinstance(raw.backend, RawFSBackend)


# -- single-key API -----------------------------------------------------------------


def test_get_set_delete_through_the_region(pickled_region):
    region = pickled_region()
    assert region.get("missing") is NO_VALUE
    value = {"list": [1, 2, 3], "tuple": (4, 5), "bytes": b"\x00\xff", "none": None}
    region.set("key", value)
    assert region.get("key") == value
    region.set("key", "replaced")
    assert region.get("key") == "replaced"
    region.delete("key")
    assert region.get("key") is NO_VALUE
    region.delete("key")  # deleting a missing key is not an error


def test_backend_get_set_delete(pickled_region):
    backend = pickled_region().backend
    assert backend.get_serialized("k") is NO_VALUE
    backend.set_serialized("k", b"serialized \x00 bytes")
    assert backend.get_serialized("k") == b"serialized \x00 bytes"
    backend.set_serialized("k", b"")
    assert backend.get_serialized("k") == b""  # an empty value is a value, not a miss
    backend.delete("k")
    assert backend.get_serialized("k") is NO_VALUE


def test_get_or_create_creates_once(pickled_region):
    region = pickled_region()
    calls = []

    def creator():
        calls.append(1)
        return ["created", len(calls)]

    assert region.get_or_create("k", creator) == ["created", 1]
    assert region.get_or_create("k", creator) == ["created", 1]
    assert len(calls) == 1


def test_two_instances_on_one_directory_share_entries(pickled_region):
    first, second = pickled_region(), pickled_region()
    first.set("shared", 1)
    assert second.get("shared") == 1
    second.delete("shared")
    assert first.get("shared") is NO_VALUE


# -- _multi API ---------------------------------------------------------------------


def test_multi_calls_keep_key_order_and_report_misses(pickled_region):
    region = pickled_region()
    region.set_multi({"b": 2, "d": 4, "a": 1})
    keys = ["d", "missing-1", "a", "b", "missing-2"]
    assert region.get_multi(keys) == [4, NO_VALUE, 1, 2, NO_VALUE]
    region.delete_multi(["a", "d", "never-set"])
    assert region.get_multi(keys) == [NO_VALUE, NO_VALUE, NO_VALUE, 2, NO_VALUE]


def test_backend_multi_calls(pickled_region):
    backend = pickled_region().backend
    backend.set_serialized_multi({"z": b"26", "y": b"25", "x": b"24"})
    assert backend.get_serialized_multi(["x", "nope", "z", "y"]) == [b"24", NO_VALUE, b"26", b"25"]
    backend.delete_multi(["x", "z"])
    assert backend.get_serialized_multi(["x", "y", "z"]) == [NO_VALUE, b"25", NO_VALUE]


def test_get_or_create_multi(pickled_region):
    region = pickled_region()
    region.set("b", "cached b")
    created = []

    def creator(*keys):
        created.extend(keys)
        return [f"new {key}" for key in keys]

    assert region.get_or_create_multi(["a", "b", "c"], creator) == ["new a", "cached b", "new c"]
    assert sorted(created) == ["a", "c"]
    assert region.get_multi(["c", "a"]) == ["new c", "new a"]


# -- serializers --------------------------------------------------------------------


def _entry_bytes(backend: PickleFSBackend, key: str) -> bytes:
    from dogpile_fsbackend import layout

    path = backend.store.layout.entry_path(layout.key_digest(layout.encode_key(key)))
    with open(path, "rb") as handle:
        return handle.read()


def test_region_serializer_and_deserializer_are_used(cache_dir):
    region = make_region(
        serializer=lambda value: json.dumps(value, sort_keys=True).encode(),
        deserializer=lambda data: json.loads(data),
    ).configure("dogpile_fsbackend.pickled", arguments={"base_dir": cache_dir})
    region.set("key", {"numbers": [1, 2, 3], "text": "héllo"})
    assert region.get("key") == {"numbers": [1, 2, 3], "text": "héllo"}
    # The entry holds the JSON text, not a pickle.
    assert b'{"numbers": [1, 2, 3], "text": "h\\u00e9llo"}' in _entry_bytes(region.backend, "key")
    assert region.get_multi(["key", "missing"])[1] is NO_VALUE


def test_default_serializer_is_pickle(pickled_region):
    """Without a region serializer, dogpile hands over the CachedValue: the entry holds
    the value and its metadata pickled together, with no JSON step."""
    region = pickled_region()
    region.set("key", {"a": frozenset({1})})  # not JSON-serializable
    assert region.get("key") == {"a": frozenset({1})}
    record = records.decode(_entry_bytes(region.backend, "key"), records.KIND_PICKLED, b"key")
    assert record.form == records.FORM_VALUE
    value, metadata = pickle.loads(record.payload)
    assert value == {"a": frozenset({1})}
    assert metadata["v"] == value_version and abs(metadata["ct"] - time.time()) < 60


def _version_1_entry(key: bytes, payload: bytes, created: float) -> bytes:
    """An entry as releases before format version 2 wrote it (dogpile's bytes only)."""
    fields = struct.pack(
        "<4sBBHdIQ", b"DFSB", 1, records.KIND_PICKLED, 0, created, len(key), len(payload)
    )
    crc = zlib.crc32(payload, zlib.crc32(key, zlib.crc32(fields)))
    return fields + crc.to_bytes(4, "little") + key + payload


def test_an_entry_of_the_old_format_is_a_miss_and_is_replaced(pickled_region):
    region = pickled_region()
    region.set("key", "current")
    path = region.backend.store.layout.entry_path(layout.digest_of("key"))
    old_payload = b'{"ct": %f, "v": 2}|' % time.time() + pickle.dumps("old format")
    with open(path, "wb") as handle:
        handle.write(_version_1_entry(b"key", old_payload, time.time()))
    assert region.get("key") is NO_VALUE  # never an error, never the old bytes
    assert not os.path.exists(path)  # removed, and the accounting with it
    assert region.get_or_create("key", lambda: "regenerated") == "regenerated"
    record = records.decode(_entry_bytes(region.backend, "key"), records.KIND_PICKLED, b"key")
    assert record.form == records.FORM_VALUE
    assert region.backend.stats()["entries"] == 1
    # The same through get_serialized (a tier above, or a region with a serializer).
    with open(path, "wb") as handle:
        handle.write(_version_1_entry(b"key", old_payload, time.time()))
    assert region.backend.get_serialized("key") is NO_VALUE
    region.backend.set_serialized("key", old_payload)
    assert region.get("key") == "old format"  # dogpile's bytes, read by the default region


def test_bytes_and_cached_values_never_stand_in_for_each_other(pickled_region, cache_dir):
    """A region with a serializer reads only what a serializer wrote; one without reads
    both (the bytes with dogpile's default, pickle)."""
    plain = pickled_region()
    json_region = make_region(
        serializer=lambda value: json.dumps(value).encode(), deserializer=json.loads
    ).configure("dogpile_fsbackend.pickled", arguments={"base_dir": cache_dir})
    plain.set("pickled", [1, 2])
    assert json_region.get("pickled") is NO_VALUE
    json_region.set("json", [3, 4])
    assert plain.get("json") is NO_VALUE  # JSON bytes are no pickle: a miss, not an error
    assert json_region.get("json") == [3, 4]


@pytest.mark.parametrize("count", [1, 50])
def test_stats_count_entries_and_bytes(pickled_region, count):
    region = pickled_region()
    for index in range(count):
        region.set(f"key-{index}", "x" * 100)
    stats = region.backend.stats()
    data_dir = os.path.join(region.backend.settings.base_dir, "data")
    on_disk = sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(data_dir)
        for name in names
    )
    assert stats["entries"] == count
    assert stats["bytes"] == on_disk


# -- hits and misses ----------------------------------------------------------------

_COUNTED = pytest.mark.parametrize(
    ("backend", "distributed_lock"),
    [(b, lock) for b in ("pickled", "raw") for lock in (True, False)],
    ids=lambda v: str(v),
)


def _counting_region(backend: str, base_dir: str, distributed_lock: bool):
    return make_region().configure(
        f"dogpile_fsbackend.{backend}",
        arguments={"base_dir": base_dir, "distributed_lock": distributed_lock},
    )


def _value_of(backend: str, text: str):
    return io.BytesIO(text.encode()) if backend == "raw" else text


def _lookups(region) -> tuple[int, int]:
    stats = region.backend.stats()
    return stats["misses"], stats["hits"]


def _drop(value) -> None:
    if hasattr(value, "close"):
        value.close()


@_COUNTED
def test_get_or_create_counts_one_miss_when_it_creates_and_one_hit_when_it_reads(
    backend, distributed_lock, cache_dir
):
    region = _counting_region(backend, cache_dir, distributed_lock)

    @region.cache_on_arguments()
    def report(day):
        return _value_of(backend, f"report {day}")

    for day, expected in ((1, (1, 0)), (1, (1, 1)), (2, (2, 1)), (1, (2, 2)), (2, (2, 3))):
        _drop(report(day))
        assert _lookups(region) == expected, day
    _drop(region.get_or_create("plain", lambda: _value_of(backend, "plain")))
    assert _lookups(region) == (3, 3)


@_COUNTED
def test_every_plain_get_counts(backend, distributed_lock, cache_dir):
    region = _counting_region(backend, cache_dir, distributed_lock)
    assert region.get("absent") is NO_VALUE
    assert region.get("absent") is NO_VALUE
    region.set("present", _value_of(backend, "v"))
    _drop(region.get("present"))
    assert region.get_multi(["absent", "present", "other"])[0] is NO_VALUE
    assert _lookups(region) == (4, 2)


@_COUNTED
def test_get_or_create_multi_counts_one_miss_per_created_key(backend, distributed_lock, cache_dir):
    region = _counting_region(backend, cache_dir, distributed_lock)
    region.set("b", _value_of(backend, "b"))

    def create(*keys):
        return [_value_of(backend, key) for key in keys]

    for value in region.get_or_create_multi(["a", "b", "c"], create):
        _drop(value)
    assert _lookups(region) == (2, 1)
    assert region.get("absent") is NO_VALUE  # nothing is left marked as a re-check
    assert _lookups(region) == (3, 1)


@_COUNTED
def test_a_caller_that_waits_for_another_creator_counts_a_hit(
    backend, distributed_lock, cache_dir
):
    """The waiter's first look misses; dogpile looks again once it holds the lock and
    finds the other thread's value: one hit for it, one miss for the creator."""
    region = _counting_region(backend, cache_dir, distributed_lock)
    waiter_looked = threading.Event()
    results = queue.Queue()

    def slow_creator():
        deadline = time.monotonic() + WAIT
        while _lookups(region)[0] < 2 and time.monotonic() < deadline:
            time.sleep(0.001)  # until the waiter's first look has missed (bounded)
        waiter_looked.set()
        return _value_of(backend, "created once")

    def call(creator):
        results.put(region.get_or_create("key", creator))

    creator_thread = threading.Thread(target=call, args=(slow_creator,))
    creator_thread.start()
    deadline = time.monotonic() + WAIT
    while not region.key_is_locked("key") and time.monotonic() < deadline:
        time.sleep(0.001)  # the creator holds the key's lock
    waiter = threading.Thread(target=call, args=(lambda: _value_of(backend, "created twice"),))
    waiter.start()
    assert waiter_looked.wait(WAIT)
    creator_thread.join(WAIT)
    waiter.join(WAIT)
    assert [_text(results.get(timeout=WAIT)) for _ in range(2)] == ["created once"] * 2
    assert _lookups(region) == (1, 1)


def _text(value) -> str:
    if isinstance(value, str):
        return value
    with value:
        value.seek(0)
        return value.read().decode()


def test_a_region_with_only_a_deserializer_hits_what_it_stored(cache_dir):
    """dogpile documents a ``deserializer=`` alone (one that raises CantDeserializeException
    for a value it cannot load, say): such a region reads serialized bytes while its
    writes arrive as CachedValue objects; what it stores must still be a hit for it."""
    loaded = []

    def loads(data):
        loaded.append(data)
        return pickle.loads(data)

    region = make_region(deserializer=loads).configure(
        "dogpile_fsbackend.pickled", arguments={"base_dir": cache_dir}
    )
    region.set("early", "stored before the region first read")
    assert region.get("early") == "stored before the region first read"
    created = []

    def create():
        created.append(1)
        return {"n": frozenset({1})}

    for _ in range(3):
        assert region.get_or_create("key", create) == {"n": frozenset({1})}
    assert created == [1]
    assert loaded, "the region's own deserializer read the value"
    region.set("other", [1, 2])
    assert region.get("other") == [1, 2]
    # The bytes are dogpile's own: a region without a serializer reads them too.
    assert make_region().configure(
        "dogpile_fsbackend.pickled", arguments={"base_dir": cache_dir}
    ).get("other") == [1, 2]
