"""The hot path's shortcuts keep every promise: hits without fstat, relatime-like stamps,
temp names and tokens without a syscall per write, unique after fork."""

from __future__ import annotations

import os
import time

import pytest
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE

from dogpile_fsbackend import layout, records, store


def _region(base_dir, **arguments):
    return make_region().configure(
        "dogpile_fsbackend.pickled", arguments={"base_dir": str(base_dir), **arguments}
    )


def _path(region, key: str) -> str:
    return region.backend.store.layout.entry_path(layout.digest_of(key))


def _age(region, key: str, seconds: float) -> float:
    """Rewrite ``key``'s entry as created ``seconds`` ago and last used then; its time."""
    path = _path(region, key)
    with open(path, "rb") as handle:
        record = records.decode(handle.read(), records.KIND_PICKLED, key.encode())
    created = time.time() - seconds
    with open(path, "wb") as handle:
        handle.write(
            records.encode(
                records.KIND_PICKLED, key.encode(), record.payload, created, record.form
            )
        )
    os.utime(path, (created, created))
    return created


# -- relatime-like stamps ----------------------------------------------------------------


def test_the_first_hit_stamps_and_a_repeated_one_within_the_granularity_does_not(tmp_path):
    region = _region(tmp_path / "cache")
    region.set("key", "value")
    created = _age(region, "key", 3600)
    path = _path(region, "key")
    assert region.get("key") == "value"
    first = os.stat(path)
    assert first.st_mtime > time.time() - 60, "the first hit did not stamp the entry"
    assert abs(first.st_atime - created) < 1e-3  # atime keeps the creation time
    marker_ns = first.st_mtime_ns - 5 * 10**9
    os.utime(path, ns=(first.st_atime_ns, marker_ns))
    # Stamped by this process a moment ago, 1/16 of an hour (capped at 60 s) not yet passed.
    assert region.get("key") == "value"
    again = os.stat(path)
    assert again.st_mtime_ns == marker_ns
    assert again.st_atime_ns == first.st_atime_ns  # the read left atime alone (O_NOATIME)


@pytest.mark.parametrize(
    ("age", "stamped_ago", "stamps"),
    [
        (3600.0, 10.0, False),  # 10 s < min(3600 / 16, 60 s)
        (3600.0, 61.0, True),  # never more than STAMP_INTERVAL_MAX stale
        (100.0, 10.0, True),  # 10 s > 100 / 16: a young entry is stamped more often
        (100.0, 5.0, False),
    ],
)
def test_a_hit_stamps_once_its_last_stamp_is_older_than_the_granularity(
    tmp_path, age, stamped_ago, stamps
):
    region = _region(tmp_path / "cache")
    region.set("key", "value")
    created = _age(region, "key", age)
    path = _path(region, "key")
    # This process's memory of its last stamp, set as if it had stamped then.
    region.backend.store._stamps[layout.digest_of("key")] = (created, time.time() - stamped_ago)
    marker = created + 1
    os.utime(path, (created, marker))
    assert region.get("key") == "value"
    assert (os.stat(path).st_mtime != marker) is stamps
    assert store.STAMP_FRACTION == 1 / 16 and store.STAMP_INTERVAL_MAX == 60.0


def test_a_stamp_remembered_from_before_the_clock_was_set_back_is_no_reason_to_skip(tmp_path):
    """A clock stepped back (NTP, a VM restored) leaves this process's last stamps in the
    future: they must not stop it stamping its hot entries until the clock catches up,
    or eviction would take them for unused."""
    region = _region(tmp_path / "cache")
    region.set("key", "value")
    created = _age(region, "key", 3600)
    path = _path(region, "key")
    region.backend.store._stamps[layout.digest_of("key")] = (created, time.time() + 3600)
    marker = created + 1
    os.utime(path, (created, marker))
    assert region.get("key") == "value"
    assert os.stat(path).st_mtime > time.time() - 60, "the hit was not stamped"


def test_an_entry_rewritten_since_this_process_stamped_it_is_stamped_on_its_next_hit(tmp_path):
    base_dir = tmp_path / "cache"
    reader, writer = _region(base_dir), _region(base_dir)
    writer.set("key", "old")
    _age(writer, "key", 3600)
    assert reader.get("key") == "old"  # stamped, and remembered by the reader
    writer.set("key", "new")  # another backend (as another process) rewrites it
    path = _path(writer, "key")
    info = os.stat(path)
    os.utime(path, ns=(info.st_atime_ns, info.st_atime_ns - 10**9))
    assert reader.get("key") == "new"
    assert os.stat(path).st_mtime_ns > info.st_atime_ns - 10**9


def test_a_new_file_older_than_this_processs_last_stamp_is_still_stamped(tmp_path):
    """A writer that waited for the shard lock publishes a file it wrote (and dated)
    before this process last stamped the entry: that stamp belongs to the old file and
    must not stand in for the new one's, whatever the two files' times."""
    region = _region(tmp_path / "cache")
    region.set("key", "old")
    _age(region, "key", 3600)
    assert region.get("key") == "old"  # stamped now, and remembered
    path = _path(region, "key")
    _age(region, "key", 1800)  # another file, created and last used before that stamp
    used_before = os.stat(path).st_mtime
    assert region.get("key") == "old"
    assert os.stat(path).st_mtime > used_before + 60, "the new file's hit was not stamped"


# -- hits without fstat ----------------------------------------------------------------------


@pytest.mark.parametrize("delta", [-1, 0, 1, 200_000])
def test_entries_around_the_first_read_are_whole_and_an_extended_one_is_a_miss(tmp_path, delta):
    """A hit reads FIRST_READ bytes, then what the header declares plus one: an entry of
    any length is read whole, and one byte more than declared is damage, removed."""
    backend = _region(tmp_path / "cache").backend
    key = "key"
    overhead = len(records.encode(records.KIND_PICKLED, key.encode(), b"", 0.0))
    value = b"v" * (store.FIRST_READ + delta - overhead)
    backend.set_serialized(key, value)
    path = backend.store.layout.entry_path(layout.digest_of(key))
    assert os.path.getsize(path) == store.FIRST_READ + delta
    assert backend.get_serialized(key) == value
    with open(path, "ab") as handle:
        handle.write(b"x")
    assert backend.get_serialized(key) is NO_VALUE
    assert not os.path.exists(path)


# -- names without a syscall per write, unique after fork ----------------------------------


def _names(backend) -> tuple[str, str, str]:
    fd, temp = backend.store.open_temp(layout.digest_of("key"))
    os.close(fd)
    os.unlink(temp)
    return os.path.basename(temp), layout.new_token(), layout.new_token()


def test_temp_names_and_tokens_after_fork_never_repeat_the_parents(tmp_path):
    backend = _region(tmp_path / "cache").backend
    before = _names(backend)  # the parent has a writer token and a token secret already
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next names, then leave at once
        try:
            os.write(write_end, " ".join(_names(backend)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        child = pipe.read().split()
    assert os.waitpid(pid, 0)[1] == 0
    parent = _names(backend)
    assert len(child) == 3
    assert not {*child} & {*parent, *before}
    assert layout.temp_writer(child[0]) != layout.temp_writer(parent[0])
    for token in (*child[1:], *parent[1:]):
        assert layout.is_token(token) and len(token) == layout.TOKEN_LEN
