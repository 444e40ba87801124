"""The raw backend: file values in, exact bytes stored, new read-only files out."""

from __future__ import annotations

import io
import os
import tempfile
import threading
import time

import faultkit
import pytest
from dogpile.cache.api import NO_VALUE, CachedValue

from dogpile_fsbackend import CachedFile, CachedFileReader, layout

CONTENT = bytes(range(256)) * 64 + b"\x00tail"


def data_files(backend, key: str) -> list[str]:
    """Paths of the data files (``<digest>.<token>``) of a key."""
    entry = backend.store.layout.entry_path(layout.key_digest(layout.encode_key(key)))
    directory = os.path.dirname(entry)
    if not os.path.isdir(directory):
        return []
    return [
        os.path.join(directory, n)
        for n in os.listdir(directory)
        if n.startswith(os.path.basename(entry) + ".")
    ]


def read_cached(value) -> bytes:
    """All bytes of a cached raw value, from the start; closes it."""
    if isinstance(value, CachedValue):
        value = value.payload
    with value:
        value.seek(0)
        return value.read()


def write_file(path, content: bytes = CONTENT) -> str:
    with open(path, "wb") as handle:
        handle.write(content)
    return str(path)


# -- accepted values ----------------------------------------------------------------


def _open_rb(tmp_path, content):
    return open(write_file(tmp_path / "source", content), "rb")


def _io_open(tmp_path, content):
    return io.open(write_file(tmp_path / "source", content), "rb")  # noqa: UP020


def _fdopen(tmp_path, content):
    return os.fdopen(os.open(write_file(tmp_path / "source", content), os.O_RDONLY), "rb")


def _fdopen_read_write(tmp_path, content):
    handle = os.fdopen(os.open(tmp_path / "source", os.O_RDWR | os.O_CREAT), "w+b")
    handle.write(content)  # still in the buffer: the backend must flush it
    return handle


def _fdopen_pipe(tmp_path, content):
    read_end, write_end = os.pipe()

    def feed():
        with os.fdopen(write_end, "wb") as out:
            out.write(content)

    threading.Thread(target=feed, daemon=True).start()
    return os.fdopen(read_end, "rb")


def _named_temporary(delete: bool):
    def make(tmp_path, content):
        handle = tempfile.NamedTemporaryFile(dir=tmp_path, delete=delete)  # noqa: SIM115
        handle.write(content)
        handle.seek(0)
        return handle

    return make


def _bytes_io(tmp_path, content):
    return io.BytesIO(content)


def _buffered_reader_of_bytes_io(tmp_path, content):
    return io.BufferedReader(io.BytesIO(content))


class _FilenoWithoutTell:
    """A minimal wrapper of a regular file: read(), fileno() and close(), no tell()."""

    def __init__(self, handle):
        self._handle = handle

    def read(self, size=-1):
        return self._handle.read(size)

    def fileno(self):
        return self._handle.fileno()

    def close(self):
        self._handle.close()


def _fileno_without_tell(tmp_path, content):
    return _FilenoWithoutTell(_open_rb(tmp_path, content))


SOURCES = {
    "open_rb": _open_rb,
    "io_open": _io_open,
    "os_fdopen": _fdopen,
    "os_fdopen_unflushed_w+b": _fdopen_read_write,
    "os_fdopen_pipe": _fdopen_pipe,
    "named_temporary_delete_true": _named_temporary(True),
    "named_temporary_delete_false": _named_temporary(False),
    "bytes_io": _bytes_io,
    "buffered_reader": _buffered_reader_of_bytes_io,
    "fileno_without_tell": _fileno_without_tell,
}


@pytest.mark.parametrize("movable", [False, True], ids=["copy", "movable"])
@pytest.mark.parametrize("make_source", SOURCES.values(), ids=SOURCES.keys())
@pytest.mark.parametrize("content", [b"", CONTENT, os.urandom(3 << 20)], ids=["0B", "16K", "3M"])
def test_accepted_sources_store_exact_bytes(raw_region, tmp_path, make_source, movable, content):
    region = raw_region(file_movable=movable)
    source = make_source(tmp_path, content)
    try:
        region.set("key", source)
    finally:
        source.close()  # a self-deleting temporary file must close cleanly
    assert read_cached(region.get("key")) == content
    assert read_cached(region.backend.get("key")) == content


def test_a_wrapper_without_tell_is_a_stream_stored_from_where_it_is(raw_region, tmp_path):
    """What read() returns is the value: a wrapper that cannot tell() or seek() is a
    stream, so what is left of it is stored, and cached reads start at its beginning."""
    region = raw_region()
    handle = open(write_file(tmp_path / "source"), "rb")  # noqa: SIM115
    handle.read(100)
    region.set("key", _FilenoWithoutTell(handle))
    handle.close()
    with region.get("key") as cached:
        assert cached.tell() == 0
        assert cached.read() == CONTENT[100:]


def test_named_temporary_file_position_and_content_type(raw_region, tmp_path):
    region = raw_region()
    with tempfile.NamedTemporaryFile(dir=tmp_path, suffix=".json") as source:
        source.write(b'{"a": 1}')
        source.seek(2)
        region.set("key", source)
        assert source.tell() == 2  # the caller's file position is not disturbed
    with region.get("key") as cached:
        assert cached.tell() == 2
        assert cached.content_type == "application/json"
        assert cached.content_length == 8


# -- what a get returns ---------------------------------------------------------------


def _two_bytes_at_one(kind: str, tmp_path):
    def creator():
        if kind == "bytes_io":
            handle = io.BytesIO()
        elif kind == "named_temporary":
            handle = tempfile.NamedTemporaryFile(dir=tmp_path)  # noqa: SIM115
        else:
            handle = open(tmp_path / "made", "w+b")  # noqa: SIM115
        handle.write(b"ab")
        handle.seek(1)
        return handle

    return creator


@pytest.mark.parametrize("movable", [False, True], ids=["copy", "movable"])
@pytest.mark.parametrize("kind", ["bytes_io", "named_temporary", "open_w+b"])
def test_get_returns_a_new_read_only_file_at_the_creators_position(
    raw_region, tmp_path, kind, movable
):
    region = raw_region(file_movable=movable)
    first = region.get_or_create("key", _two_bytes_at_one(kind, tmp_path))
    assert first.tell() == 1  # the creator's own object, still where it was left
    assert first.read() == b"b"
    first.close()

    hits = [region.get_or_create("key", pytest.fail) for _ in range(3)]
    hits.append(region.get("key"))
    try:
        assert len({id(hit) for hit in hits}) == len(hits)  # a new object every time
        for hit in hits:
            assert isinstance(hit, CachedFileReader)
            assert not hit.closed
            assert hit.readable()
            assert not hit.writable()
            assert hit.mode == "rb"
            assert hit.tell() == 1
        with pytest.raises(io.UnsupportedOperation):
            hits[0].write(b"x")
        assert hits[0].read() == b"b"
        assert hits[1].tell() == 1  # reading one hit does not move another
        hits[1].seek(0)
        assert hits[1].read() == b"ab"
    finally:
        for hit in hits:
            hit.close()
    with region.get("key") as again:  # the cached bytes were not changed by any of it
        assert again.tell() == 1
        assert read_cached(again) == b"ab"


def test_backend_get_without_dogpile_metadata_returns_the_file(raw_region):
    backend = raw_region().backend
    source = io.BytesIO(b"abc")
    source.seek(3)
    backend.set("key", source)
    with backend.get("key") as cached:
        assert isinstance(cached, CachedFileReader)
        assert cached.tell() == 3
        assert cached.read() == b""
    assert backend.get("missing") is NO_VALUE
    missing, found = backend.get_multi(["missing", "key"])
    assert missing is NO_VALUE
    assert read_cached(found) == b"abc"


def test_multi_calls(raw_region):
    region = raw_region()
    region.set_multi({"b": io.BytesIO(b"B"), "a": io.BytesIO(b"A")})
    found = region.get_multi(["a", "missing", "b"])
    assert found[1] is NO_VALUE
    assert [read_cached(found[0]), read_cached(found[2])] == [b"A", b"B"]
    region.delete_multi(["a", "b"])
    assert region.get_multi(["a", "b"]) == [NO_VALUE, NO_VALUE]
    assert data_files(region.backend, "a") == data_files(region.backend, "b") == []


def test_cached_file_metadata(raw_region):
    region = raw_region()
    region.set("key", CachedFile(io.BytesIO(b"<p>hi</p>"), filename="page.html"))
    with region.get("key") as first:
        assert first.filename == "page.html"
        assert first.content_type == "text/html"
        assert first.content_length == 9
        assert abs(first.last_modified - time.time()) < 3600
        etag = first.etag
    region.set("key", CachedFile(io.BytesIO(b"<p>hi</p>"), filename="page.html"))
    with region.get("key") as second:
        assert second.etag != etag  # every write of the key changes the etag


def test_rewrite_keeps_an_open_reader_whole(raw_region):
    region = raw_region()
    region.set("key", io.BytesIO(b"old" * 1000))
    with region.get("key") as old:
        region.set("key", io.BytesIO(b"new"))
        assert old.read() == b"old" * 1000
    assert read_cached(region.get("key")) == b"new"
    assert len(data_files(region.backend, "key")) == 1  # the old bytes were removed


# -- file_movable ---------------------------------------------------------------------


def _cached_inode(backend, key: str) -> int:
    (path,) = data_files(backend, key)
    return os.stat(path).st_ino


@pytest.mark.parametrize("opener", ["open_rb", "named_temporary_delete_false", "fdopen"])
def test_file_movable_moves_a_named_file_on_the_same_filesystem(raw_region, tmp_path, opener):
    region = raw_region(file_movable=True)
    path = tmp_path / "source"
    if opener == "named_temporary_delete_false":
        source = tempfile.NamedTemporaryFile(dir=tmp_path, delete=False)  # noqa: SIM115
        path = source.name
        source.write(CONTENT)
        source.flush()
    elif opener == "fdopen":
        write_file(path)
        source = os.fdopen(os.open(path, os.O_RDONLY), "rb")
    else:
        write_file(path)
        source = open(path, "rb")  # noqa: SIM115
    inode = os.stat(path).st_ino
    with source:
        region.set("key", source)
    if opener == "fdopen":  # os.fdopen(fd) has no name to move: it is copied
        assert os.path.exists(path)
        assert _cached_inode(region.backend, "key") != inode
    else:
        assert not os.path.exists(path)  # moved, not copied
        assert _cached_inode(region.backend, "key") == inode
    assert read_cached(region.get("key")) == CONTENT


def test_file_movable_with_self_deleting_named_temporary_file(raw_region, tmp_path):
    region = raw_region(file_movable=True)
    source = tempfile.NamedTemporaryFile(dir=tmp_path)  # noqa: SIM115
    source.write(CONTENT)
    source.seek(5)
    inode = os.fstat(source.fileno()).st_ino
    region.set("key", source)
    source.close()  # deletes its own name; must not fail
    assert not os.path.exists(source.name)
    assert _cached_inode(region.backend, "key") == inode
    with region.get("key") as cached:
        assert cached.tell() == 5
        assert read_cached(cached) == CONTENT


def test_file_movable_through_get_or_create_with_named_temporary_file(raw_region, tmp_path):
    region = raw_region(file_movable=True)

    def creator():
        handle = tempfile.NamedTemporaryFile(dir=tmp_path)  # noqa: SIM115
        handle.write(b"created")
        handle.seek(0)
        return handle

    with region.get_or_create("key", creator) as first:
        assert first.read() == b"created"
    assert read_cached(region.get_or_create("key", pytest.fail)) == b"created"
    assert os.listdir(tmp_path) == ["cache"]  # the temporary file's name is gone


@pytest.mark.parametrize("movable", [False, True], ids=["not_movable", "movable_but_bytes_io"])
def test_otherwise_the_file_is_copied(raw_region, tmp_path, movable):
    region = raw_region(file_movable=movable)
    path = tmp_path / "source"
    write_file(path)
    inode = os.stat(path).st_ino
    if movable:
        with open(path, "rb") as handle:
            source = io.BytesIO(handle.read())
    else:
        source = open(path, "rb")  # noqa: SIM115
    with source:
        region.set("key", source)
    with open(path, "rb") as handle:
        assert handle.read() == CONTENT  # the original is untouched
    assert os.stat(path).st_ino == inode
    assert _cached_inode(region.backend, "key") != inode
    assert read_cached(region.get("key")) == CONTENT


def test_file_movable_on_another_filesystem_copies(raw_region, tmp_path):
    other = "/dev/shm"
    if not os.path.isdir(other) or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem available")
    region = raw_region(file_movable=True)
    try:
        with tempfile.NamedTemporaryFile(dir=other, delete=False) as source:
            source.write(CONTENT)
            source.seek(0)
            region.set("key", source)
        assert os.path.exists(source.name)
        with open(source.name, "rb") as handle:
            assert handle.read() == CONTENT
    finally:
        os.unlink(source.name)
    assert read_cached(region.get("key")) == CONTENT


def test_file_movable_after_the_name_was_reused_copies(raw_region, tmp_path):
    """If the name now refers to another file, the open file's bytes are stored (copied)."""
    region = raw_region(file_movable=True)
    path = tmp_path / "source"
    write_file(path, b"the open file")
    with open(path, "rb") as source:
        os.unlink(path)
        write_file(path, b"another file under the same name")
        region.set("key", source)
    assert read_cached(region.get("key")) == b"the open file"
    with open(path, "rb") as handle:
        assert handle.read() == b"another file under the same name"


# -- rejected values ------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_value",
    [
        lambda path: "a string",
        lambda path: b"some bytes",
        lambda path: bytearray(b"some bytes"),
        lambda path: memoryview(b"some bytes"),
        lambda path: 42,
        lambda path: None,
        lambda path: ["a", "list"],
        lambda path: io.StringIO("text"),
        lambda path: open(write_file(path), encoding="latin-1"),  # noqa: SIM115
        lambda path: open(path, "wb"),  # noqa: SIM115
    ],
    ids=[
        "str",
        "bytes",
        "bytearray",
        "memoryview",
        "int",
        "None",
        "list",
        "StringIO",
        "text_mode_file",
        "write_only_file",
    ],
)
def test_non_file_values_raise_type_error_saying_what_is_accepted(
    raw_region, tmp_path, make_value
):
    region = raw_region()
    value = make_value(tmp_path / "file")
    try:
        with pytest.raises(TypeError, match="readable binary file-like object"):
            region.set("key", value)
        with pytest.raises(TypeError, match=r"open\(path, 'rb'\)"):
            region.backend.set("key", value)
        with pytest.raises(TypeError, match="raw backend"):
            region.get_or_create("other", lambda: value)
    finally:
        if hasattr(value, "close"):
            value.close()
    assert region.get("key") is NO_VALUE
    assert region.get("other") is NO_VALUE
    leftovers = [n for _, _, names in os.walk(region.backend.settings.base_dir) for n in names]
    assert not [n for n in leftovers if n.startswith(".tmp-")]


def test_closed_file_is_rejected(raw_region, tmp_path):
    region = raw_region()
    with open(write_file(tmp_path / "file"), "rb") as source:
        pass
    with pytest.raises(ValueError, match="closed"):
        region.set("key", source)


# -- dogpile metadata and expiration ---------------------------------------------------


def test_dogpile_metadata_is_kept(raw_region):
    region = raw_region()
    region.set("key", io.BytesIO(b"value"))
    stored = region.backend.get("key")
    try:
        assert isinstance(stored, CachedValue)
        assert set(stored.metadata) >= {"ct", "v"}
        assert abs(stored.metadata["ct"] - time.time()) < 3600
    finally:
        stored.payload.close()


def test_region_expiration_regenerates_after_expiry(raw_region):
    region = raw_region()
    region.expiration_time = 3600
    created = []

    def creator():
        created.append(time.time())
        return io.BytesIO(b"version %d" % len(created))

    with region.get_or_create("key", creator):
        pass
    assert read_cached(region.get_or_create("key", creator)) == b"version 1"
    assert len(created) == 1
    time.sleep(0.05)  # not a synchronisation: the entry must merely be older than 0.01 s
    assert read_cached(region.get_or_create("key", creator, expiration_time=0.01)) == b"version 2"
    assert len(created) == 2
    assert read_cached(region.get_or_create("key", creator)) == b"version 2"


def test_region_configured_expiration_time(cache_dir):
    from dogpile.cache import make_region

    region = make_region().configure(
        "dogpile_fsbackend.raw", expiration_time=0.2, arguments={"base_dir": cache_dir}
    )
    count = []

    def creator():
        count.append(1)
        return io.BytesIO(b"%d" % len(count))

    with region.get_or_create("key", creator):
        pass
    time.sleep(0.3)  # older than the region's expiration_time
    with region.get_or_create("key", creator) as value:
        assert value.read() == b"2"
    assert len(count) == 2


def test_dropped_reader_closes_quietly(raw_region, recwarn):
    """dogpile discards the file of an expired value; that must not leak or warn."""
    import gc

    region = raw_region()
    region.set("key", io.BytesIO(b"value"))
    reader = region.get("key")
    fd, path = reader.fileno(), os.path.realpath(reader.name)

    def open_as_fd() -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}") == path
        except FileNotFoundError:
            return False

    assert open_as_fd()
    del reader
    gc.collect()
    assert not open_as_fd()
    assert not [w for w in recwarn if issubclass(w.category, ResourceWarning)]


def test_a_cache_hit_stored_again_with_file_movable_is_copied_not_taken(raw_region):
    """A hit is named after another entry's data file: moving it would steal that entry."""
    region = raw_region(file_movable=True)
    region.set("one", io.BytesIO(b"payload"))
    with region.get("one") as hit:
        region.set("two", hit)
    for key in ("one", "two"):
        with region.get(key) as cached:
            assert cached.read() == b"payload"
    report = region.backend.verify()
    assert report.accounting_drift == 0
    assert region.backend.stats()["entries"] == 2


def test_a_file_with_other_names_is_copied_not_taken(raw_region, tmp_path):
    """A file with another hard link is copied even with file_movable: writing through that
    other name would change the cached bytes behind the record's back, and a link to
    another entry's data file (under a name of the user's) would make two entries share it."""
    region = raw_region(file_movable=True)
    path, other_name = tmp_path / "source", tmp_path / "other-name"
    path.write_bytes(b"original")
    os.link(path, other_name)
    with open(path, "rb") as source:
        region.set("key", source)
    with open(other_name, "r+b") as handle:  # the user's file, under its other name
        handle.write(b"CHANGED!")
    with region.get("key") as cached:
        assert cached.read() == b"original"
    region.set("one", io.BytesIO(b"payload"))
    (one_data,) = data_files(region.backend, "one")
    innocent = tmp_path / "innocent.bin"
    os.link(one_data, innocent)
    with open(innocent, "rb") as source:
        region.set("two", source)
    (two_data,) = data_files(region.backend, "two")
    assert os.stat(one_data).st_ino != os.stat(two_data).st_ino
    assert innocent.exists()


@pytest.mark.parametrize("through", ["symlink_to_the_file", "symlinked_directory"])
def test_a_cache_file_reached_through_a_symlink_is_copied_not_taken(raw_region, tmp_path, through):
    """No realpath walk judges a movable file: a symlink to another entry's data file, or
    its own name reached through a symlinked directory, must still be copied."""
    region = raw_region(file_movable=True)
    region.set("one", io.BytesIO(b"payload"))
    (one_data,) = data_files(region.backend, "one")
    if through == "symlink_to_the_file":
        name = tmp_path / "innocent.bin"
        os.symlink(one_data, name)
    else:
        alias = tmp_path / "alias"
        os.symlink(os.path.dirname(one_data), alias)
        name = alias / os.path.basename(one_data)
    with open(name, "rb") as source:
        region.set("two", source)
    assert os.path.exists(one_data)
    for key in ("one", "two"):
        with region.get(key) as cached:
            assert cached.read() == b"payload"
    (two_data,) = data_files(region.backend, "two")
    assert os.stat(one_data).st_ino != os.stat(two_data).st_ino


@pytest.mark.parametrize(
    "name",
    [layout.ACCOUNTING_NAME, layout.LOCK_NAME, layout.MARKER_NAME, layout.MAINTENANCE_LOCK_NAME],
)
@pytest.mark.parametrize("through", ["its_path", "a_symlinked_directory"])
def test_the_caches_own_file_offered_with_file_movable_is_refused_not_moved(
    raw_region, tmp_path, name, through
):
    """The cache's bookkeeping files are named like no entry: a move would take the lock
    file (breaking every lock), the accounting file (whose pwrite()s would then change an
    entry's bytes), or the marker out of their places.  A ValueError names the value."""
    region = raw_region(file_movable=True)
    region.set("one", io.BytesIO(b"payload"))
    base_dir = region.backend.settings.base_dir
    own = os.path.join(base_dir, name)
    before = os.stat(own)
    if through == "its_path":
        path = own
    else:
        alias = tmp_path / "alias"
        os.symlink(base_dir, alias)
        path = str(alias / name)
    with open(path, "rb") as source, pytest.raises(ValueError, match="value") as raised:
        region.set("two", source)
    assert own in str(raised.value) or path in str(raised.value)
    after = os.stat(own)
    assert (after.st_ino, after.st_mode, after.st_mtime_ns) == (
        before.st_ino,
        before.st_mode,
        before.st_mtime_ns,
    )
    assert region.get("two") is NO_VALUE
    assert read_cached(region.get("one")) == b"payload"
    report = region.backend.verify()
    assert (report.entries, report.accounting_drift, report.orphans_removed) == (1, 0, 0)


@pytest.mark.parametrize("name", [layout.ACCOUNTING_NAME, layout.LOCK_NAME])
def test_a_users_file_named_like_a_caches_own_file_is_stored(raw_region, tmp_path, name):
    region = raw_region(file_movable=True)
    path = write_file(tmp_path / name)
    with open(path, "rb") as source:
        region.set("key", source)
    assert read_cached(region.get("key")) == CONTENT
    assert os.path.exists(os.path.join(region.backend.settings.base_dir, name))


def test_a_file_the_rename_refuses_is_copied_and_left_exactly_as_it_was(raw_region, tmp_path):
    """A bind mount of the cache's own filesystem has the same device, but a rename across
    it fails (EXDEV): the file is copied, and stays the caller's, with its own mode and
    mtime (not the cache's ``file_mode`` and a stamp of now)."""
    region = raw_region(file_movable=True, file_mode=0o600)
    outside, mount_point = tmp_path / "outside", tmp_path / "bound"
    outside.mkdir()
    mount_point.mkdir()
    path = write_file(outside / "report.bin")
    os.chmod(path, 0o644)
    os.utime(path, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    before = os.stat(path)
    with faultkit.mounted("--bind", str(outside), target=str(mount_point)):
        bound = str(mount_point / "report.bin")
        assert os.stat(bound).st_dev == region.backend.store.data_dev
        with open(bound, "rb") as source:
            region.set("key", source)
        assert os.path.exists(bound)
    after = os.stat(path)
    assert (after.st_ino, after.st_mode, after.st_mtime_ns) == (
        before.st_ino,
        before.st_mode,
        before.st_mtime_ns,
    )
    assert read_cached(region.get("key")) == CONTENT
    (data,) = data_files(region.backend, "key")
    assert os.stat(data).st_mode & 0o777 == 0o600
