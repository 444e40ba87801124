"""Listing keys (``backend.keys``) and deleting by prefix (``backend.delete_matching``).

A listing must change nothing (the whole tree is compared, atimes included) and must
not be fooled by what it finds; a delete must remove exactly the entries of matching
keys, keep a value rewritten while it runs, and leave the accounting exact, also with
other processes writing meanwhile.
"""

from __future__ import annotations

import os
import stat
import time
import tracemalloc

import faultkit
import pytest
from conftest import SPAWN, WAIT
from dogpile.cache import make_region
from faultkit import disk_usage, entry_path, get_bytes, set_bytes

from dogpile_fsbackend import layout, records

KINDS = ["pickled", "raw"]
ODD_KEYS = [
    "",
    "plain",
    "ключ ✓",
    "a\nline break",
    "tab\tand\rreturn",
    "lone \udc80 surrogate",
    "k" * 5000,  # longer than the first read of a record
    "user:1:profile",
    "user:1:orders",
    "user:10:profile",
    "user:2:profile",
]


def _region(kind: str, base_dir: str, **arguments):
    return make_region().configure(
        f"dogpile_fsbackend.{kind}", arguments={"base_dir": base_dir, **arguments}
    )


def _value(key: str) -> bytes:
    return key.encode("utf-8", "surrogatepass")[:100] * 3 + b"!"


def _filled(kind: str, base_dir: str, keys=ODD_KEYS, **arguments):
    backend = _region(kind, base_dir, **arguments).backend
    for key in keys:
        set_bytes(backend, kind, key, _value(key))
    return backend


def _digest(key: str) -> str:
    return layout.key_digest(layout.encode_key(key))


# -- keys() ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_keys_lists_every_stored_key_as_it_was_given(cache_dir, kind):
    backend = _filled(kind, cache_dir)
    listed = backend.keys()
    assert iter(listed) is listed  # an iterator, not a list
    assert sorted(listed) == sorted(ODD_KEYS)
    assert sorted(backend.keys("user:1")) == sorted(
        ["user:1:orders", "user:1:profile", "user:10:profile"]
    )
    assert sorted(backend.keys("user:1:")) == ["user:1:orders", "user:1:profile"]
    assert list(backend.keys("lone \udc80")) == ["lone \udc80 surrogate"]
    assert list(backend.keys("k" * 4999)) == ["k" * 5000]
    assert list(backend.keys("nothing")) == []
    assert sorted(backend.keys("")) == sorted(ODD_KEYS)


@pytest.mark.parametrize(("depth", "width"), [(1, 1), (3, 1), (4, 1), (1, 3), (2, 2), (3, 2)])
def test_keys_on_every_shard_layout(cache_dir, depth, width):
    backend = _filled("pickled", cache_dir, shard_depth=depth, shard_width=width)
    assert sorted(backend.keys()) == sorted(ODD_KEYS)
    assert backend.delete_matching("user:") == 4
    assert sorted(backend.keys()) == sorted(k for k in ODD_KEYS if not k.startswith("user:"))


@pytest.mark.parametrize("kind", KINDS)
def test_keys_changes_nothing_not_even_an_atime(cache_dir, kind):
    backend = _filled(kind, cache_dir)
    atimes = faultkit.keeps_atimes(os.path.dirname(cache_dir))
    before = faultkit.tree_state(cache_dir, atimes)
    for _ in range(3):
        assert len(list(backend.keys())) == len(ODD_KEYS)
    assert faultkit.tree_state(cache_dir, atimes) == before


def _plant_everything(backend, kind: str, base_dir: str, tmp_path) -> None:
    """Damage, strangers and traps for a listing; each leaves its key unlisted."""
    store = backend.store

    def path(key):
        return entry_path(backend, key)

    with open(path("truncated"), "r+b") as handle:
        handle.truncate(records.HEADER_SIZE + 2)
    with open(path("bit flipped"), "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 1]))
    directory = os.path.dirname(path("plain"))
    for name in ("not-an-entry", layout.TEMP_PREFIX + "abandoned", "0" * 64 + ".orphan"):
        with open(os.path.join(directory, name), "wb") as handle:
            handle.write(b"stranger")
    # An entry copied where a get would never look for it.
    elsewhere = store.layout.entry_dir("f" * 64)
    os.makedirs(elsewhere, exist_ok=True)
    with (
        open(path("plain"), "rb") as source,
        open(os.path.join(elsewhere, _digest("plain")), "wb") as copy,
    ):
        copy.write(source.read())
    # Another key's record under this key's name.
    with open(path("plain"), "rb") as source, open(path("impostor"), "wb") as target:
        target.write(source.read())
    # A symlink, a FIFO and a directory in entries' places.
    outside = tmp_path / "outside"
    with open(path("plain"), "rb") as source:
        outside.write_bytes(source.read())
    os.unlink(path("symlinked"))
    os.symlink(outside, path("symlinked"))
    os.unlink(path("fifo"))
    os.mkfifo(path("fifo"))
    os.unlink(path("directory"))
    os.mkdir(path("directory"))
    # A record whose key is not UTF-8 at all (never written by a str key).
    foreign_key = b"\xff\xfe not utf-8"
    foreign_path = store.layout.entry_path(layout.key_digest(foreign_key))
    os.makedirs(os.path.dirname(foreign_path), exist_ok=True)
    with open(foreign_path, "wb") as handle:
        handle.write(records.encode(store.kind, foreign_key, b"x", 1.0))
    if kind == "raw":
        for data_path in faultkit.data_paths(backend, "no data file"):
            os.unlink(data_path)
    # A whole shard directory replaced by a symlink to a copy of it.
    shard = os.path.dirname(path("under a symlinked shard"))
    copy = tmp_path / "shard copy"
    os.rename(shard, copy)
    os.symlink(copy, shard)


UNLISTED = [
    "truncated",
    "bit flipped",
    "impostor",
    "symlinked",
    "fifo",
    "directory",
    "no data file",
    "expired",
]


@pytest.mark.parametrize("kind", KINDS)
def test_keys_leaves_out_what_a_get_would_miss_and_removes_nothing(cache_dir, tmp_path, kind):
    keys = ["plain", *UNLISTED, "under a symlinked shard"]
    backend = _filled(kind, cache_dir, keys=keys, expiration_time=3600)
    _date_back(backend, "expired", 7200)
    _plant_everything(backend, kind, cache_dir, tmp_path)
    listed_shard = os.path.dirname(entry_path(backend, "under a symlinked shard"))
    neighbours = [k for k in keys if os.path.dirname(entry_path(backend, k)) == listed_shard]
    before = faultkit.tree_state(cache_dir)
    assert sorted(backend.keys()) == sorted(
        {"plain"} | ({"no data file"} if kind == "pickled" else set()) - set(neighbours)
    )
    assert faultkit.tree_state(cache_dir) == before  # nothing removed, nothing touched
    for key in set(UNLISTED) - set(neighbours) - {"no data file"}:
        assert get_bytes(backend, kind, key) is None, key  # what a get makes of them


def _date_back(backend, key: str, seconds: float) -> None:
    """Rewrite ``key``'s record in place as if it had been created ``seconds`` ago."""
    store = backend.store
    record = store.peek_record(_digest(key))
    data = records.encode(
        store.kind, layout.encode_key(key), record.payload, time.time() - seconds
    )
    with open(entry_path(backend, key), "r+b") as handle:
        handle.write(data)


def _list_as_nobody(base_dir: str) -> list[str]:
    return sorted(_region("pickled", base_dir).backend.keys())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory unreadable")
def test_keys_skips_a_directory_it_may_not_read():
    with faultkit.nobody_dir("keys") as top:
        base_dir = os.path.join(top, "cache")
        keys = [f"key {index}" for index in range(40)]
        faultkit.in_child_as_nobody(_fill_as_nobody, base_dir, keys)
        region = _region("pickled", base_dir, read_only=True)  # to find the directory
        hidden_dir = os.path.dirname(entry_path(region.backend, "key 0"))
        os.chown(hidden_dir, 0, 0)
        os.chmod(hidden_dir, 0o700)
        hidden = [k for k in keys if os.path.dirname(entry_path(region.backend, k)) == hidden_dir]
        assert faultkit.in_child_as_nobody(_list_as_nobody, base_dir) == sorted(
            set(keys) - set(hidden)
        )


def _fill_as_nobody(base_dir: str, keys: list[str]) -> None:
    backend = _region("pickled", base_dir).backend
    for key in keys:
        backend.set_serialized(key, b"v")


def test_keys_holds_one_directory_at_a_time(cache_dir):
    """20,000 keys of 200 characters would take megabytes as a list; the listing's peak
    stays far below that."""
    keys = [f"{index:06d}".ljust(200, "x") for index in range(20_000)]
    backend = _filled("pickled", cache_dir, keys=keys)
    tracemalloc.start()
    try:
        count = sum(1 for _ in backend.keys())  # noqa: SIM118 (not a dict)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == len(keys)
    assert peak < 256 * 1024, peak


@pytest.mark.parametrize("prefix", [b"user:", 42, ["user:"]], ids=repr)
def test_a_prefix_must_be_a_str(cache_dir, prefix):
    backend = _filled("pickled", cache_dir)
    with pytest.raises(TypeError, match="prefix must be str"):
        backend.keys(prefix)  # at the call, not at the first next()
    with pytest.raises(TypeError, match="prefix must be str"):
        backend.delete_matching(prefix)
    with pytest.raises(TypeError, match="prefix must be str"):
        backend.delete_matching(None)
    assert len(list(backend.keys())) == len(ODD_KEYS)


# -- delete_matching() ----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_delete_matching_removes_the_matching_entries_only(cache_dir, kind):
    backend = _filled(kind, cache_dir)
    user_1 = [entry_path(backend, k) for k in ("user:1:profile", "user:1:orders")]
    data_files = [
        p for k in ("user:1:profile", "user:1:orders") for p in faultkit.data_paths(backend, k)
    ]
    assert backend.delete_matching("user:1:") == 2
    assert not any(os.path.lexists(p) for p in user_1 + data_files)
    for key in ODD_KEYS:
        expected = None if key.startswith("user:1:") else _value(key)
        assert get_bytes(backend, kind, key) == expected, key
    assert backend.delete_matching("user:1:") == 0
    assert backend.delete_matching("lone \udc80") == 1
    assert (backend.stats()["bytes"], backend.stats()["entries"]) == disk_usage(cache_dir)
    report = backend.verify()
    assert (report.accounting_drift, report.damaged_removed, report.orphans_removed) == (0, 0, 0)


def test_delete_matching_refuses_an_empty_prefix(cache_dir):
    backend = _filled("pickled", cache_dir)
    with pytest.raises(ValueError, match=r"non-empty prefix.*use clear\(\)"):
        backend.delete_matching("")
    assert len(list(backend.keys())) == len(ODD_KEYS)


@pytest.mark.parametrize("kind", KINDS)
def test_delete_matching_also_removes_expired_and_damaged_entries_of_matching_keys(
    cache_dir, kind
):
    keys = ["gone:expired", "gone:truncated", "gone:fine", "kept:truncated", "kept:fine"]
    backend = _filled(kind, cache_dir, keys=keys, expiration_time=3600)
    _date_back(backend, "gone:expired", 7200)
    for key in ("gone:truncated", "kept:truncated"):
        with open(entry_path(backend, key), "r+b") as handle:
            handle.truncate(records.HEADER_SIZE + len(key) + 1)  # the key is still whole
    kept = entry_path(backend, "kept:truncated")
    assert backend.delete_matching("gone:") == 3
    assert not any(os.path.lexists(entry_path(backend, k)) for k in keys if k.startswith("gone"))
    assert os.path.exists(kept)  # damage of other keys is for reads and scans to remove
    assert list(backend.keys()) == ["kept:fine"]


def _rewrite_on_signal(base_dir: str, kind: str, key: str, go, done) -> None:
    go.wait(WAIT)
    backend = _region(kind, base_dir).backend
    set_bytes(backend, kind, key, b"rewritten meanwhile")
    done.set()


@pytest.mark.parametrize("kind", KINDS)
def test_delete_matching_keeps_an_entry_rewritten_after_it_was_judged(
    cache_dir, kind, monkeypatch
):
    """Another process rewrites a matching key between the listing's judgement and the
    removal (the worst moment): the new value is a new file, and it stays."""
    backend = _filled(kind, cache_dir)
    go, done = SPAWN.Event(), SPAWN.Event()
    writer = SPAWN.Process(
        target=_rewrite_on_signal, args=(cache_dir, kind, "user:1:profile", go, done)
    )
    writer.start()
    real_discard = backend.store.discard
    target = _digest("user:1:profile")

    def discard_after_a_rewrite(digest, inode=None, used_ns=None):
        if digest == target:
            go.set()
            assert done.wait(WAIT)
        return real_discard(digest, inode, used_ns)

    monkeypatch.setattr(backend.store, "discard", discard_after_a_rewrite)
    try:
        removed = backend.delete_matching("user:1:")
    finally:
        writer.join(WAIT)
    assert writer.exitcode == 0
    assert removed == 1  # only user:1:orders
    assert get_bytes(backend, kind, "user:1:profile") == b"rewritten meanwhile"
    assert get_bytes(backend, kind, "user:1:orders") is None
    assert (backend.stats()["bytes"], backend.stats()["entries"]) == disk_usage(cache_dir)


def _keep_writing(base_dir: str, writer: int, ready, stop, results) -> None:
    backend = _region("pickled", base_dir).backend
    for index in range(20):
        backend.set_serialized(f"stays:{writer}:{index}", f"{writer}:{index}".encode())
    ready.wait(WAIT)
    count = 0
    while not stop.is_set():
        backend.set_serialized(f"goes:{writer}:{count % 20}", f"{writer}:{count}".encode())
        count += 1
    results.put(count)


def test_delete_matching_while_other_processes_write(cache_dir):
    """Three processes rewrite 'goes:' keys as fast as they can while deletes run: the
    'stays:' keys all survive, values are whole, and the accounting stays exact."""
    backend = _region("pickled", cache_dir).backend
    ready, stop, results = SPAWN.Barrier(4), SPAWN.Event(), SPAWN.Queue()
    writers = [
        SPAWN.Process(target=_keep_writing, args=(cache_dir, w, ready, stop, results))
        for w in range(3)
    ]
    for writer in writers:
        writer.start()
    ready.wait(WAIT)
    removed = sum(backend.delete_matching("goes:") for _ in range(10))
    stop.set()
    writes = [results.get(timeout=WAIT) for _ in writers]
    for writer in writers:
        writer.join(WAIT)
    assert [w.exitcode for w in writers] == [0, 0, 0]
    assert removed > 0 and sum(writes) > 0
    stays = sorted(f"stays:{w}:{i}" for w in range(3) for i in range(20))
    assert sorted(backend.keys("stays:")) == stays
    for key in backend.keys():  # noqa: SIM118 (not a dict)
        writer = key.split(":")[1]
        value = backend.get_serialized(key)
        assert value.decode().startswith(f"{writer}:"), (key, value)
    assert (backend.stats()["bytes"], backend.stats()["entries"]) == disk_usage(cache_dir)
    left = len(list(backend.keys("goes:")))
    assert backend.delete_matching("goes:") == left
    assert list(backend.keys("goes:")) == []
    assert backend.verify().accounting_drift == 0


def test_a_region_key_mangler_and_cache_on_arguments(cache_dir):
    """The README's recipes: keys are stored as mangled, so a prefix is mangled the same
    way; cache_on_arguments keys start with '<module>:<function name>|'."""
    region = make_region(key_mangler=lambda key: "app1:" + key).configure(
        "dogpile_fsbackend.pickled", arguments={"base_dir": cache_dir}
    )

    @region.cache_on_arguments()
    def report(day):
        return f"report of {day}"

    @region.cache_on_arguments()
    def other(day):
        return day

    for day in ("mon", "tue"):
        report(day)
        other(day)
    backend = region.backend
    prefix = f"{report.__module__}:{report.__name__}|"
    assert sorted(backend.keys(region.key_mangler(prefix))) == [
        f"app1:{prefix}mon",
        f"app1:{prefix}tue",
    ]
    assert backend.delete_matching(region.key_mangler(prefix)) == 2
    assert sorted(backend.keys()) == [f"app1:{other.__module__}:other|{d}" for d in ("mon", "tue")]


def test_a_symlinked_data_directory_is_not_walked(cache_dir, tmp_path):
    backend = _filled("pickled", cache_dir)
    data_dir = backend.store.layout.data_dir
    moved = tmp_path / "data elsewhere"
    os.rename(data_dir, moved)
    os.symlink(moved, data_dir)
    assert list(backend.keys()) == []
    assert backend.delete_matching("user:") == 0
    assert stat.S_ISLNK(os.lstat(data_dir).st_mode)
    assert len(os.listdir(moved)) > 0
