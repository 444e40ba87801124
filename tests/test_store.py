"""The sharded store: key to path mapping, damaged and foreign files, temp files, publishing."""

from __future__ import annotations

import io
import os
import shutil
import time

import pytest
from conftest import SPAWN, WAIT
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE

from dogpile_fsbackend import layout, records

WEIRD_KEYS = [
    "",
    " ",
    "/",
    "//",
    ".",
    "..",
    "../../../../../../etc/passwd",
    "/absolute/path",
    "a/b/c",
    "\\..\\..\\windows",
    "\x00",
    "nul\x00inside",
    "\n\r\t",
    "\udcff",  # a lone surrogate, as os.fsdecode produces for undecodable bytes
    "\ud800",
    "\xff",  # must not collide with "\udcff"
    "🐍 ünïcödé",
    "x" * 100_000,
    "con",
    "~",
    ".tmp-1-abc",  # looks like our own temp file name
]


def pickled_backend(base_dir: str, **arguments):
    return (
        make_region()
        .configure("dogpile_fsbackend.pickled", arguments={"base_dir": base_dir, **arguments})
        .backend
    )


def raw_backend(base_dir: str, **arguments):
    return (
        make_region()
        .configure("dogpile_fsbackend.raw", arguments={"base_dir": base_dir, **arguments})
        .backend
    )


def entry_path(backend, key: str) -> str:
    return backend.store.layout.entry_path(layout.key_digest(layout.encode_key(key)))


def all_files(top: str) -> list[str]:
    return [os.path.join(root, name) for root, _, names in os.walk(top) for name in names]


# -- keys to paths ------------------------------------------------------------------


@pytest.mark.parametrize(("depth", "width"), [(2, 1), (2, 2), (1, 3), (4, 1)])
def test_any_key_maps_into_nested_shards_inside_base_dir(tmp_path, depth, width):
    base_dir = str(tmp_path / "cache")
    backend = pickled_backend(base_dir, shard_depth=depth, shard_width=width)
    for index, key in enumerate(WEIRD_KEYS):
        backend.set_serialized(key, b"value %d" % index)
    for index, key in enumerate(WEIRD_KEYS):
        assert backend.get_serialized(key) == b"value %d" % index, repr(key[:20])

    assert os.listdir(tmp_path) == ["cache"]  # nothing was written beside base_dir
    data_dir = os.path.join(base_dir, "data")
    entries = [path for path in all_files(base_dir) if path.startswith(data_dir + os.sep)]
    assert len(entries) == len(WEIRD_KEYS)
    for path in entries:
        assert os.path.realpath(path) == path
        parts = os.path.relpath(path, data_dir).split(os.sep)
        *shards, digest = parts
        assert len(digest) == 64 and set(digest) <= set("0123456789abcdef")
        assert shards == [digest[i * width : (i + 1) * width] for i in range(depth)]
    expected = {
        layout.key_digest(layout.encode_key(key)) for key in WEIRD_KEYS
    }  # distinct keys, distinct entries: "\udcff" and "\xff" do not collide
    assert {os.path.basename(path) for path in entries} == expected


def test_weird_keys_through_the_region_and_delete(tmp_path):
    region = make_region().configure(
        "dogpile_fsbackend.pickled", arguments={"base_dir": str(tmp_path / "cache")}
    )
    region.set_multi({key: index for index, key in enumerate(WEIRD_KEYS)})
    assert region.get_multi(WEIRD_KEYS) == list(range(len(WEIRD_KEYS)))
    region.delete_multi(WEIRD_KEYS)
    assert region.get_multi(WEIRD_KEYS) == [NO_VALUE] * len(WEIRD_KEYS)
    assert all_files(str(tmp_path / "cache" / "data")) == []


# -- foreign and damaged files --------------------------------------------------------


def test_foreign_record_of_another_key_is_a_miss_and_removed(cache_dir):
    backend = pickled_backend(cache_dir)
    backend.set_serialized("a", b"value of a")
    backend.set_serialized("b", b"value of b")
    shutil.copyfile(entry_path(backend, "a"), entry_path(backend, "b"))
    assert backend.get_serialized("b") is NO_VALUE
    assert not os.path.exists(entry_path(backend, "b"))
    assert backend.get_serialized("a") == b"value of a"


def test_foreign_record_in_place_of_a_missing_key(cache_dir):
    """Like a hash collision: a file at a key's path that was written for another key."""
    backend = pickled_backend(cache_dir)
    backend.set_serialized("a", b"value of a")
    target = entry_path(backend, "never set")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copyfile(entry_path(backend, "a"), target)
    assert backend.get_serialized("never set") is NO_VALUE
    assert not os.path.exists(target)


def test_raw_record_of_another_key_is_a_miss(cache_dir):
    backend = raw_backend(cache_dir)
    backend.set("a", io.BytesIO(b"bytes of a"))
    backend.set("b", io.BytesIO(b"bytes of b"))
    shutil.copyfile(entry_path(backend, "a"), entry_path(backend, "b"))
    assert backend.get("b") is NO_VALUE
    assert not os.path.exists(entry_path(backend, "b"))
    with backend.get("a") as cached:
        assert cached.read() == b"bytes of a"


def test_pickled_record_in_a_raw_cache_is_a_miss(tmp_path):
    pickled = pickled_backend(str(tmp_path / "pickled"))
    raw = raw_backend(str(tmp_path / "raw"))
    pickled.set_serialized("k", b"pickled")
    target = entry_path(raw, "k")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copyfile(entry_path(pickled, "k"), target)
    assert raw.get("k") is NO_VALUE
    assert not os.path.exists(target)


def _flip(offset: int):
    def damage(data: bytes) -> bytes:
        return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]

    return damage


DAMAGE = {
    "empty": lambda data: b"",
    "header_only_half": lambda data: data[: records.HEADER_SIZE // 2],
    "header_only": lambda data: data[: records.HEADER_SIZE],
    "truncated_half": lambda data: data[: len(data) // 2],
    "truncated_one_byte": lambda data: data[:-1],
    "one_byte_appended": lambda data: data + b"\x00",
    "garbage": lambda data: os.urandom(len(data)),
    "garbage_after_magic": lambda data: data[:4] + os.urandom(len(data) - 4),
    "huge_lengths": lambda data: data[:16] + b"\xff" * 12 + data[28:],
    "text": lambda data: b"hello, I am not a cache entry\n",
    "magic_flipped": _flip(0),
    "key_flipped": _flip(records.HEADER_SIZE),
    "payload_flipped": _flip(-1),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_pickled_entry_is_a_miss_and_removed(cache_dir, damage):
    backend = pickled_backend(cache_dir)
    backend.set_serialized("key", b"some payload " * 100)
    backend.set_serialized("neighbour", b"unharmed")
    path = entry_path(backend, "key")
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(damage(data))
    assert backend.get_serialized("key") is NO_VALUE
    assert not os.path.exists(path)
    assert backend.get_serialized("neighbour") == b"unharmed"
    backend.set_serialized("key", b"rewritten")  # the key is usable again
    assert backend.get_serialized("key") == b"rewritten"


def test_every_single_bit_flip_is_a_miss(cache_dir):
    """No byte of an entry (header fields included) can change undetected."""
    backend = pickled_backend(cache_dir, expiration_time=3600)
    backend.set_serialized("key", b"payload")
    path = entry_path(backend, "key")
    with open(path, "rb") as handle:
        original = handle.read()
    undetected = []
    for offset in range(len(original)):
        for bit in (0x01, 0x80):
            with open(path, "wb") as handle:
                handle.write(
                    original[:offset] + bytes([original[offset] ^ bit]) + original[offset + 1 :]
                )
            if backend.get_serialized("key") is not NO_VALUE:
                undetected.append((offset, bit))
    assert not undetected, f"bit flips at (offset, bit) {undetected} were not detected"


@pytest.mark.parametrize("size", [0, 1, 100, 1 << 20])
def test_garbage_files_of_any_size_are_misses(cache_dir, size):
    backend = pickled_backend(cache_dir)
    path = entry_path(backend, "key")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(os.urandom(size))
    assert backend.get_serialized("key") is NO_VALUE
    assert not os.path.exists(path)


def test_symlink_at_an_entry_path_is_a_miss_and_never_followed(tmp_path):
    backend = pickled_backend(str(tmp_path / "cache"))
    backend.set_serialized("key", b"genuine")
    outside = tmp_path / "outside"
    shutil.copyfile(entry_path(backend, "key"), outside)  # a valid record for "key"
    os.unlink(entry_path(backend, "key"))
    os.symlink(outside, entry_path(backend, "key"))
    assert backend.get_serialized("key") is NO_VALUE
    assert not os.path.lexists(entry_path(backend, "key"))
    assert outside.exists()  # the target was not touched
    backend.set_serialized("key", b"new")
    assert backend.get_serialized("key") == b"new"


def test_directory_at_an_entry_path_is_a_miss(cache_dir):
    backend = pickled_backend(cache_dir)
    path = entry_path(backend, "key")
    os.makedirs(path)
    assert backend.get_serialized("key") is NO_VALUE


@pytest.mark.parametrize("damage", ["missing", "truncated", "extended", "record_truncated"])
def test_damaged_raw_entry_is_a_miss_and_removed(cache_dir, damage):
    backend = raw_backend(cache_dir)
    backend.set("key", io.BytesIO(b"raw content " * 100))
    record = entry_path(backend, "key")
    (data_path,) = [p for p in all_files(os.path.dirname(record)) if p.startswith(record + ".")]
    if damage == "missing":
        os.unlink(data_path)
    elif damage == "truncated":
        os.truncate(data_path, 10)
    elif damage == "extended":
        with open(data_path, "ab") as handle:
            handle.write(b"more")
    else:
        os.truncate(record, os.path.getsize(record) - 1)
    assert backend.get("key") is NO_VALUE
    assert not os.path.exists(record)
    assert not os.path.exists(data_path)


# -- temp files ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pickled", "raw"])
def test_prune_reclaims_temp_files_of_dead_writers_only(cache_dir, kind):
    """A temp file goes when no live writer holds its token's lock (whatever its age),
    an older release's pid-named one when older than temp_max_age, anything else at once."""
    if kind == "pickled":
        backend = pickled_backend(cache_dir, temp_max_age=600)
        backend.set_serialized("key", b"value")
    else:
        backend = raw_backend(cache_dir, temp_max_age=600)
        backend.set("key", io.BytesIO(b"value"))
    directory = os.path.dirname(entry_path(backend, "key"))
    elsewhere = os.path.dirname(entry_path(backend, "another key"))
    os.makedirs(elsewhere, exist_ok=True)
    ours = backend.store.lock_file.writer_token()
    nobody = format(int(ours, 16) ^ 1, "012x")  # a writer byte no process holds
    doomed = [
        os.path.join(directory, layout.temp_name(nobody, 1)),
        os.path.join(elsewhere, layout.temp_name(nobody, 2) + "-link"),
        os.path.join(directory, ".tmp-not-a-writer"),
        os.path.join(directory, f".tmp-{os.getpid()}-0123456789abcdef"),  # legacy, too old
    ]
    kept = [
        os.path.join(directory, layout.temp_name(ours, 10**6)),  # a live writer, however old
        os.path.join(elsewhere, f".tmp-{os.getppid()}-1111111111111111"),  # legacy, young
    ]
    for path in doomed + kept:
        with open(path, "wb") as handle:
            handle.write(b"half-written")
    an_hour_ago = time.time() - 3600
    for path in [*doomed[:2], doomed[3], kept[0]]:
        os.utime(path, (an_hour_ago, an_hour_ago))

    result = backend.prune()

    assert [p for p in doomed if os.path.exists(p)] == []
    assert [p for p in kept if os.path.exists(p)] == kept
    assert result.scan.temp_files_removed == len(doomed)
    assert result.removed == 0
    value = backend.get_serialized("key") if kind == "pickled" else backend.get("key")
    if kind == "raw":
        with value as cached:
            assert cached.read() == b"value"
    else:
        assert value == b"value"


def test_a_dead_writers_temp_file_dated_in_the_future_is_reclaimed(cache_dir):
    """A clock stepped back leaves temp files dated in the future: one whose writer is
    dead still goes (it used to count as written just now, and stay until the clock
    caught up); a live writer's stays whatever its date."""
    backend = pickled_backend(cache_dir)
    backend.set_serialized("key", b"value")
    directory = os.path.dirname(entry_path(backend, "key"))
    ours = backend.store.lock_file.writer_token()
    nobody = format(int(ours, 16) ^ 1, "012x")
    doomed = os.path.join(directory, layout.temp_name(nobody, 1))
    kept = os.path.join(directory, layout.temp_name(ours, 2))
    in_a_day = time.time() + 86400
    for path in (doomed, kept):
        with open(path, "wb") as handle:
            handle.write(b"half-written")
        os.utime(path, (in_a_day, in_a_day))

    assert backend.prune().scan.temp_files_removed == 1
    assert not os.path.exists(doomed) and os.path.exists(kept)


@pytest.mark.parametrize("scan", ["prune", "verify"])
def test_scans_reclaim_bookkeeping_temp_files_of_dead_writers_only(cache_dir, scan):
    """A process killed while it published a new accounting file or marker leaves
    ``accounting.tmp-...`` or ``fsbackend.json.tmp-...`` in base_dir: prune and verify
    remove those of dead writers (and an older release's random names once older than
    temp_max_age), never a live writer's."""
    backend = pickled_backend(cache_dir, temp_max_age=600)
    backend.set_serialized("key", b"value")
    ours = backend.store.lock_file.writer_token()
    nobody = format(int(ours, 16) ^ 1, "012x")
    doomed = [
        f"{layout.ACCOUNTING_NAME}{layout.temp_name(nobody, 1)}",
        f"{layout.MARKER_NAME}{layout.temp_name(nobody, 2)}",
        f"{layout.ACCOUNTING_NAME}{layout.TEMP_PREFIX}0123456789abcdef",  # older, an hour old
    ]
    kept = [
        f"{layout.ACCOUNTING_NAME}{layout.temp_name(ours, 3)}",  # a live writer, however old
        f"{layout.MARKER_NAME}{layout.TEMP_PREFIX}fedcba9876543210",  # older, young
    ]
    an_hour_ago = time.time() - 3600
    for name in doomed + kept:
        path = os.path.join(cache_dir, name)
        with open(path, "wb") as handle:
            handle.write(b"half-written")
        if name != kept[1]:
            os.utime(path, (an_hour_ago, an_hour_ago))

    report = backend.prune().scan if scan == "prune" else backend.verify()

    assert sorted(n for n in doomed + kept if os.path.exists(os.path.join(cache_dir, n))) == (
        sorted(kept)
    )
    assert report.temp_files_removed == len(doomed)
    assert backend.get_serialized("key") == b"value"


def _live_writer_after_the_lock_file_was_replaced(base_dir, directory, ready, done):
    """A writer that opened the cache after its lock file was replaced: it holds its
    writer byte on the new file and has a temp file in flight."""
    backend = pickled_backend(base_dir)
    path = os.path.join(directory, layout.temp_name(backend.store.lock_file.writer_token(), 1))
    with open(path, "wb") as handle:
        handle.write(b"being written")
    an_hour_ago = time.time() - 3600
    os.utime(path, (an_hour_ago, an_hour_ago))
    ready.put(path)
    assert done.wait(WAIT)


def test_clear_judges_temp_files_by_the_lock_file_in_use_now(cache_dir):
    """clear, run by a process that opened the cache before its lock file was replaced,
    first moves to the new lock file (as every scan does): a live writer's temp file,
    its byte held on the new file only, is not taken for a dead writer's."""
    backend = pickled_backend(cache_dir)
    backend.set_serialized("key", b"value")
    directory = os.path.dirname(entry_path(backend, "key"))
    os.unlink(os.path.join(cache_dir, layout.LOCK_NAME))
    ready, done = SPAWN.Queue(), SPAWN.Event()
    writer = SPAWN.Process(
        target=_live_writer_after_the_lock_file_was_replaced,
        args=(cache_dir, directory, ready, done),
    )
    writer.start()
    try:
        temp = ready.get(timeout=WAIT)
        backend.clear()
        assert os.path.exists(temp)
        assert backend.get_serialized("key") is NO_VALUE
    finally:
        done.set()
        writer.join(WAIT)
    assert writer.exitcode == 0


def test_writes_leave_no_temp_files(cache_dir):
    backend = pickled_backend(cache_dir)
    for index in range(20):
        backend.set_serialized("key", b"v" * index)
        backend.set_serialized(f"key-{index}", b"w")
    assert not [p for p in all_files(cache_dir) if ".tmp-" in os.path.basename(p)]


# -- atomic publish -----------------------------------------------------------------


def test_rewrite_replaces_the_file_instead_of_writing_into_it(cache_dir):
    backend = pickled_backend(cache_dir)
    backend.set_serialized("key", b"first value, the longer one")
    path = entry_path(backend, "key")
    old_inode = os.stat(path).st_ino
    with open(path, "rb") as old:
        backend.set_serialized("key", b"second")
        # The open file still holds the complete first record: a new inode was renamed in.
        old_record = records.decode(old.read(), records.KIND_PICKLED, b"key")
    assert old_record.payload == b"first value, the longer one"
    assert os.stat(path).st_ino != old_inode
    assert backend.get_serialized("key") == b"second"
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]


def _value(version: int) -> bytes:
    """A value whose every byte depends on its version, and whose length varies."""
    size = (1 << 18) + (version % 7) * 4099
    return version.to_bytes(8, "little") + bytes([version % 251]) * size


def _check(payload: bytes) -> int | None:
    """The version of an intact value; None if it is torn."""
    version = int.from_bytes(payload[:8], "little")
    return version if payload == _value(version) else None


def _poll_reader(kind, base_dir, key, ready, stop, distinct, results) -> None:
    backend = (pickled_backend if kind == "pickled" else raw_backend)(base_dir)
    hits = misses_after_hit = torn = 0
    seen = set()
    ready.set()
    while not stop.is_set():
        if kind == "pickled":
            payload = backend.get_serialized(key)
        else:
            cached = backend.get(key)
            payload = NO_VALUE
            if cached is not NO_VALUE:
                with cached:
                    payload = cached.read()
        if payload is NO_VALUE:
            misses_after_hit += bool(hits)
            continue
        hits += 1
        version = _check(payload)
        if version is None:
            torn += 1
        elif version not in seen:
            seen.add(version)
            distinct.value = len(seen)
    results.put((hits, misses_after_hit, torn, len(seen)))


@pytest.mark.parametrize("kind", ["pickled", "raw"])
def test_reader_in_another_process_never_sees_a_partial_value(cache_dir, kind):
    backend = (pickled_backend if kind == "pickled" else raw_backend)(cache_dir)

    def write(version: int) -> None:
        if kind == "pickled":
            backend.set_serialized("key", _value(version))
        else:
            backend.set("key", io.BytesIO(_value(version)))

    write(0)
    ready, stop = SPAWN.Event(), SPAWN.Event()
    distinct, results = SPAWN.Value("i", 0), SPAWN.Queue()
    reader = SPAWN.Process(
        target=_poll_reader, args=(kind, cache_dir, "key", ready, stop, distinct, results)
    )
    reader.start()
    try:
        assert ready.wait(WAIT)
        deadline = time.monotonic() + WAIT
        version = 0
        # Rewrite until the reader has demonstrably read many different versions.
        while (version < 100 or distinct.value < 20) and time.monotonic() < deadline:
            version += 1
            write(version)
        stop.set()
        hits, misses_after_hit, torn, seen = results.get(timeout=WAIT)
    finally:
        stop.set()
        reader.join(WAIT)
    assert reader.exitcode == 0
    assert hits > 0
    assert torn == 0
    assert seen >= 20, f"only {seen} versions read in {version} rewrites"
    if kind == "pickled":
        assert misses_after_hit == 0  # the entry is replaced, never absent
    assert not [p for p in all_files(cache_dir) if ".tmp-" in os.path.basename(p)]
