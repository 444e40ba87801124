"""Hostile cache directories: permissions, planted symlinks and files, forged entries.

* Everything the cache creates is private by default (0o600 files, 0o700
  directories), also under a permissive umask; ``file_mode``/``dir_mode``
  choose other bits.
* A symlink planted anywhere inside ``base_dir`` -- in place of an entry, a
  raw data file, any shard directory level, ``data/`` itself, the lock,
  accounting or marker files -- is never followed out of the directory for a
  write or a delete: everything outside stays byte-for-byte the same.
* A FIFO, a directory or a hard link planted in an entry's place, and a raw
  record whose data-file token tries to climb out of the directory, are
  misses, never a hang or another file's content.
* Unpickling what others can write is code execution: shown here, together
  with the signing and JSON serializers the guarantees document recommends.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import io
import json
import os
import pickle
import shutil
import stat

import faultkit
import pytest
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE, CantDeserializeException

from dogpile_fsbackend import BookkeepingError, beneath, layout, records

KINDS = ["pickled", "raw"]


def make(kind, base_dir, **arguments):
    return make_region().configure(
        f"dogpile_fsbackend.{kind}", arguments={"base_dir": str(base_dir), **arguments}
    )


def put(region, kind, key, writer=0, size=200):
    if kind == "pickled":
        region.set(key, faultkit.make_value(key, writer, 0, size))
    else:
        region.set(key, io.BytesIO(faultkit.make_blob(key, writer, 0, size)))


def writer_of(region, kind, key):
    found = region.get(key)
    if found is NO_VALUE:
        return None
    if kind == "pickled":
        assert faultkit.check_value(key, found) is None
        return found["writer"]
    blob = faultkit.read_raw(found)
    assert faultkit.check_blob(key, blob) is None
    return json.loads(blob.partition(b"\n")[0])[1]


def vacate(region, key):
    """Remove a key's files and return the path of its entry, free for something planted."""
    entry = faultkit.entry_path(region.backend, key)
    for data in faultkit.data_paths(region.backend, key):
        os.unlink(data)
    os.unlink(entry)
    return entry


def modes(base_dir):
    """{relative path: permission bits} of everything in the cache directory."""
    found = {".": stat.S_IMODE(os.lstat(base_dir).st_mode)}
    for directory, dirnames, names in os.walk(base_dir):
        for name in dirnames + names:
            path = os.path.join(directory, name)
            found[os.path.relpath(path, base_dir)] = stat.S_IMODE(os.lstat(path).st_mode)
    return found


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# -- permissions ------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o000], ids=["umask-022", "umask-000"])
@pytest.mark.parametrize("kind", KINDS)
def test_everything_is_private_by_default(tmp_path, kind, mask):
    base_dir = tmp_path / "cache"
    with umask(mask):
        region = make(kind, base_dir)
        for number in range(20):
            put(region, kind, f"key-{number}")
    found = modes(base_dir)
    for path, bits in found.items():
        if os.path.isdir(base_dir / path):
            assert bits == 0o700, (path, oct(bits))
        else:
            assert bits == 0o600, (path, oct(bits))
    assert len(found) > 20


@pytest.mark.parametrize("kind", KINDS)
def test_configured_modes_are_applied(tmp_path, kind):
    base_dir = tmp_path / "cache"
    region = make(kind, base_dir, file_mode=0o640, dir_mode=0o750)
    put(region, kind, "key")
    entry = faultkit.entry_path(region.backend, "key")
    assert stat.S_IMODE(os.stat(entry).st_mode) == 0o640
    for data in faultkit.data_paths(region.backend, "key"):
        assert stat.S_IMODE(os.stat(data).st_mode) == 0o640
    directory = os.path.dirname(entry)
    while directory != str(base_dir):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o750, directory
        directory = os.path.dirname(directory)


@pytest.mark.parametrize("kind", KINDS)
def test_entry_file_mode_wins_over_a_restrictive_umask(tmp_path, kind):
    with umask(0o077):
        region = make(kind, tmp_path / "cache", file_mode=0o640)
        put(region, kind, "key")
    assert stat.S_IMODE(os.stat(faultkit.entry_path(region.backend, "key")).st_mode) == 0o640


def test_group_shared_modes_survive_the_usual_umask(tmp_path):
    base_dir = tmp_path / "cache"
    with umask(0o022):
        region = make("pickled", base_dir, file_mode=0o660, dir_mode=0o770)
        put(region, "pickled", "key")
    for path, bits in modes(base_dir).items():
        expected = 0o770 if os.path.isdir(base_dir / path) else 0o660
        assert bits == expected, (path, oct(bits))


def test_a_file_moved_in_takes_file_mode(tmp_path):
    """A caller's file renamed into the cache becomes an entry file like any other."""
    base_dir = tmp_path / "cache"
    region = make("raw", base_dir, file_movable=True, file_mode=0o640)
    source = base_dir / "made-by-the-app"
    source.write_bytes(b"payload")
    os.chmod(source, 0o600)
    with open(source, "rb") as handle:
        region.set("key", handle)
    assert not source.exists()  # moved, not copied
    for data in faultkit.data_paths(region.backend, "key"):
        assert stat.S_IMODE(os.stat(data).st_mode) == 0o640


# -- planted symlinks ----------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path):
    """A directory outside the cache, with files a followed symlink would hit."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "precious").write_bytes(b"must survive")
    return path


def assert_untouched(outside, before):
    assert faultkit.snapshot(str(outside)) == before


@pytest.mark.parametrize("kind", KINDS)
def test_symlink_planted_as_an_entry_is_never_followed(tmp_path, kind, outside):
    base_dir = tmp_path / "cache"
    region = make(kind, base_dir)
    put(region, kind, "key")
    entry = faultkit.entry_path(region.backend, "key")
    before = faultkit.snapshot(str(outside))
    for operation in ("get", "set", "delete"):
        for data in faultkit.data_paths(region.backend, "key"):
            os.unlink(data)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry)
        os.symlink(outside / "precious", entry)
        if operation == "get":
            assert region.get("key") is NO_VALUE
            assert not os.path.lexists(entry)
        elif operation == "set":
            put(region, kind, "key", writer=1)
            assert not os.path.islink(entry)
            assert writer_of(region, kind, "key") == 1
        else:
            region.delete("key")
            assert not os.path.lexists(entry)
        assert_untouched(outside, before)
    region.backend.verify()
    assert_untouched(outside, before)


def test_symlink_planted_as_a_raw_data_file_is_a_miss(tmp_path, outside):
    region = make("raw", tmp_path / "cache")
    put(region, "raw", "key")
    (data,) = faultkit.data_paths(region.backend, "key")
    size = os.path.getsize(data)
    (outside / "same-size").write_bytes(b"s" * size)
    before = faultkit.snapshot(str(outside))
    os.unlink(data)
    os.symlink(outside / "same-size", data)
    assert region.get("key") is NO_VALUE
    assert not os.path.lexists(data)
    assert_untouched(outside, before)


@pytest.fixture(params=["openat2", "path-check"])
def creation(request, monkeypatch):
    """How the store creates its temp files: openat2 refusing symlinks on the way, or
    (where openat2 is missing) an open by path after checking the directory."""
    if request.param == "openat2" and not beneath.available():
        pytest.skip("openat2 is not available here")
    if request.param == "path-check":
        monkeypatch.setattr(beneath, "available", lambda: False)
    return request.param


@pytest.mark.parametrize("warm", [False, True], ids=["fresh-instance", "warm-instance"])
@pytest.mark.parametrize("level", [0, 1, 2], ids=["data", "shard-level-1", "shard-level-2"])
@pytest.mark.parametrize("kind", KINDS)
def test_symlinked_directory_is_never_written_or_deleted_through(
    tmp_path, kind, level, warm, outside, creation
):
    """A directory of the cache replaced by a symlink to an outside tree.

    The outside tree mirrors the cache's layout and holds a file where the
    key's entry would be, so a followed symlink would read, overwrite or
    delete it.  ``warm``: the instance had already used the real directory.
    """
    base_dir = tmp_path / "cache"
    region = make(kind, base_dir)
    assert (region.backend.store._creator is not None) == (creation == "openat2")
    digest = layout.key_digest(layout.encode_key("key"))
    entry = faultkit.entry_path(region.backend, "key")
    chain = [os.path.dirname(entry)]
    while os.path.dirname(chain[-1]) != str(base_dir):
        chain.append(os.path.dirname(chain[-1]))
    chain.reverse()  # data, level 1, level 2
    planted = chain[level]
    mirror = outside / "mirror"
    target = mirror / os.path.relpath(os.path.dirname(entry), planted)
    target.mkdir(parents=True)
    (target / digest).write_bytes(b"precious entry-named file")
    (target / f"{digest}.0123456789abcdef").write_bytes(b"precious data-named file")
    if warm:
        put(region, kind, "key")
        put(region, kind, "other")
    before = faultkit.snapshot(str(outside))
    shutil.rmtree(planted, ignore_errors=True)
    os.makedirs(os.path.dirname(planted), exist_ok=True)
    os.symlink(mirror, planted)
    if not warm:
        region = make(kind, base_dir)

    assert region.get("key") is NO_VALUE  # the outside file is not an entry of ours
    assert_untouched(outside, before)
    region.delete("key")
    assert_untouched(outside, before)
    put(region, kind, "key", writer=1)
    assert_untouched(outside, before)
    assert not os.path.islink(planted)  # replaced by a real directory
    assert writer_of(region, kind, "key") == 1
    region.delete("key")
    put(region, kind, "key", writer=2)
    region.backend.prune()
    region.backend.verify()
    assert writer_of(region, kind, "key") == 2
    region.backend.clear()
    assert region.get("key") is NO_VALUE
    assert_untouched(outside, before)


def test_symlinked_directory_planted_after_scans_began_is_not_scanned(tmp_path, outside):
    """prune/verify/clear never descend into a symlinked shard directory."""
    base_dir = tmp_path / "cache"
    region = make("pickled", base_dir)
    for number in range(30):
        put(region, "pickled", f"key-{number}")
    shard = os.path.dirname(os.path.dirname(faultkit.entry_path(region.backend, "key-0")))
    (outside / "deep").mkdir()
    (outside / "deep" / ("a" * 64)).write_bytes(b"looks like an entry name")
    (outside / "deep" / ".tmp-1-abc").write_bytes(b"looks like a temp file")
    before = faultkit.snapshot(str(outside))
    os.symlink(outside, os.path.join(shard, "f"))
    for scan in (region.backend.prune, region.backend.verify, region.backend.clear):
        scan()
        assert_untouched(outside, before)


def test_symlinks_planted_for_the_cache_files_are_never_followed(tmp_path, outside):
    before = faultkit.snapshot(str(outside))
    names = (
        layout.MAINTENANCE_LOCK_NAME,
        layout.ACCOUNTING_NAME,
        layout.LOCK_NAME,
        layout.MARKER_NAME,
    )
    for name in names:
        base_dir = tmp_path / f"cache-{name}"
        base_dir.mkdir()
        os.symlink(outside / "precious", base_dir / name)
        with pytest.raises(BookkeepingError) as info:
            make("pickled", base_dir)
        assert info.value.errno == errno.ELOOP
        assert str(base_dir / name) in str(info.value)  # names the file ...
        assert "remove it" in str(info.value)  # ... and what to do
        assert_untouched(outside, before)


def test_marker_temp_file_symlink_is_not_followed(tmp_path, outside):
    """The marker's temp name was predictable (it held the pid); now it is random and
    created exclusively, so a link planted at the old name is never written through."""
    base_dir = tmp_path / "cache"
    base_dir.mkdir()
    marker_temp = f"{layout.MARKER_NAME}{layout.TEMP_PREFIX}{os.getpid()}"
    os.symlink(outside / "precious", base_dir / marker_temp)
    before = faultkit.snapshot(str(outside))
    region = make("pickled", base_dir)
    region.set("key", 1)
    assert region.get("key") == 1
    assert_untouched(outside, before)


# -- other things planted in an entry's place ------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_fifo_planted_as_an_entry_is_a_miss_not_a_hang(tmp_path, kind):
    base_dir = tmp_path / "cache"
    region = make(kind, base_dir)
    put(region, kind, "key")
    entry = vacate(region, "key")
    os.mkfifo(entry)
    try:
        assert faultkit.run_bounded(region.get, "key") is NO_VALUE
    finally:
        with contextlib.suppress(OSError):  # unblock a hung reader, if any
            os.close(os.open(entry, os.O_WRONLY | os.O_NONBLOCK))
    region.backend.prune()
    assert not os.path.lexists(entry)  # scans remove what is not a regular file
    put(region, kind, "key", writer=1)
    assert writer_of(region, kind, "key") == 1


@pytest.mark.parametrize(
    ("kind", "what"), [("pickled", "entry"), ("raw", "entry"), ("raw", "data file")]
)
def test_socket_planted_as_an_entry_is_a_miss_not_an_error(tmp_path, kind, what):
    """open() of a Unix socket fails with ENXIO, which used to escape get() as an OSError;
    a socket in place of an entry (or of a raw entry's data file) is a miss, and is gone
    after the next scan (or at once, with the record that names the data file)."""
    base_dir = tmp_path / "cache"
    region = make(kind, base_dir)
    put(region, kind, "key")
    if what == "entry":
        planted = vacate(region, "key")
    else:
        (planted,) = faultkit.data_paths(region.backend, "key")
        os.unlink(planted)
    with faultkit.plant_socket(planted):
        assert region.get("key") is NO_VALUE
        region.backend.prune()
        assert not os.path.lexists(planted)
    put(region, kind, "key", writer=1)
    assert writer_of(region, kind, "key") == 1


@pytest.mark.parametrize("kind", KINDS)
def test_directory_planted_as_an_entry(tmp_path, kind):
    """A get is a miss; a set of that key raises IsADirectoryError and leaves no temp file."""
    base_dir = tmp_path / "cache"
    region = make(kind, base_dir)
    put(region, kind, "key")
    put(region, kind, "other")
    entry = vacate(region, "key")
    os.mkdir(entry)
    assert region.get("key") is NO_VALUE
    with pytest.raises(IsADirectoryError):
        put(region, kind, "key", writer=1)
    assert faultkit.temp_files(str(base_dir)) == []
    assert writer_of(region, kind, "other") == 0
    os.rmdir(entry)
    put(region, kind, "key", writer=1)
    assert writer_of(region, kind, "key") == 1


@pytest.mark.parametrize("kind", KINDS)
def test_hard_link_planted_as_an_entry_never_changes_the_linked_file(tmp_path, kind, outside):
    base_dir = tmp_path / "cache"
    region = make(kind, base_dir)
    put(region, kind, "key")
    entry = vacate(region, "key")
    before = faultkit.snapshot(str(outside))
    os.link(outside / "precious", entry)
    assert region.get("key") is NO_VALUE
    os.link(outside / "precious", entry)
    put(region, kind, "key", writer=1)
    assert writer_of(region, kind, "key") == 1
    os.unlink(entry)
    os.link(outside / "precious", entry)
    region.delete("key")
    after = faultkit.snapshot(str(outside))
    # Only the link count (and so ctime) of the outside file may differ: never its bytes.
    assert {p: (v[0], v[1], v[4]) for p, v in after.items()} == {
        p: (v[0], v[1], v[4]) for p, v in before.items()
    }


def test_raw_record_whose_token_climbs_out_is_a_miss(tmp_path, outside):
    """The data file is named by a token from the record: a crafted one cannot name a path."""
    base_dir = tmp_path / "cache"
    region = make("raw", base_dir)
    put(region, "raw", "key")
    entry = faultkit.entry_path(region.backend, "key")
    secret = outside / "secret"
    secret.write_bytes(b"the application may read this; the cache must not serve it")
    os.mkdir(f"{entry}.x")  # makes "<digest>.x/../../.." resolvable
    climb = "/".join([".."] * (len(os.path.relpath(entry, tmp_path).split("/")) - 1))
    with open(entry, "rb") as handle:
        good = records.decode(handle.read(), records.KIND_RAW, b"key")
    meta = json.loads(good.payload)
    for token in (f"x/{climb}/outside/secret", "../../../outside/secret", "X", "", 5):
        forged = {**meta, "token": token, "size": secret.stat().st_size, "position": 0}
        payload = json.dumps(forged).encode()
        with open(entry, "wb") as handle:
            handle.write(records.encode(records.KIND_RAW, b"key", payload, good.created))
        assert region.get("key") is NO_VALUE, token
    assert secret.read_bytes().startswith(b"the application")


# -- forged pickles and the serializers the guarantees recommend -----------------------


class _Exploit:
    """Unpickling this runs code: it makes a directory named by the attacker."""

    def __init__(self, proof):
        self.proof = str(proof)

    def __reduce__(self):
        return (os.mkdir, (self.proof,))


def forge_entry(region, key, serialized_value: bytes) -> None:
    """Write, as an attacker with write access to base_dir would, a valid entry for ``key``."""
    path = faultkit.entry_path(region.backend, key)
    with open(path, "rb") as handle:
        record = records.decode(handle.read(), records.KIND_PICKLED, layout.encode_key(key))
    metadata = record.payload.partition(b"|")[0]
    payload = metadata + b"|" + serialized_value
    with open(path, "wb") as handle:
        handle.write(records.encode(records.KIND_PICKLED, layout.encode_key(key), payload, 1.7e9))


def test_default_pickle_runs_code_planted_by_whoever_can_write_base_dir(tmp_path):
    """Why base_dir must stay private: a planted entry executes code on the next get."""
    region = make("pickled", tmp_path / "cache")
    region.set("key", "legit")
    proof = tmp_path / "code-ran"
    forge_entry(region, "key", pickle.dumps(_Exploit(proof)))
    region.get("key")
    assert proof.exists()


# The serializers below are the ones shown in the guarantees document.
SECRET = b"from the application's settings, never stored in base_dir"


def signed_dumps(value) -> bytes:
    body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return hmac.new(SECRET, body, hashlib.sha256).digest() + body


def signed_loads(data: bytes):
    tag, body = data[:32], data[32:]
    if not hmac.compare_digest(tag, hmac.new(SECRET, body, hashlib.sha256).digest()):
        raise CantDeserializeException()  # dogpile treats it as a miss
    return pickle.loads(body)


def json_dumps(value) -> bytes:
    return json.dumps(value).encode()


def json_loads(data: bytes):
    try:
        return json.loads(data)
    except ValueError:
        raise CantDeserializeException() from None


@pytest.mark.parametrize(
    ("serializer", "deserializer"),
    [(signed_dumps, signed_loads), (json_dumps, json_loads)],
    ids=["hmac-signed-pickle", "json"],
)
def test_signing_or_json_serializer_turns_a_forged_entry_into_a_miss(
    tmp_path, serializer, deserializer
):
    region = make_region(serializer=serializer, deserializer=deserializer).configure(
        "dogpile_fsbackend.pickled", arguments={"base_dir": str(tmp_path / "cache")}
    )
    value = {"list": [1, 2, 3], "text": "ok"}
    region.set("key", value)
    assert region.get("key") == value
    proof = tmp_path / "code-ran"
    for forged in (
        pickle.dumps(_Exploit(proof)),
        signed_dumps(_Exploit(proof))[:32] + pickle.dumps(_Exploit(proof)),  # stolen tag
        b"\x00" * 40,
    ):
        forge_entry(region, "key", forged)
        assert region.get("key") is NO_VALUE
        assert region.get_or_create("key", lambda: value) == value
    assert not proof.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_symlink_loop_planted_as_a_shard_directory_is_a_miss_and_repaired(tmp_path, kind):
    """A loop makes every path through it fail with ELOOP: a miss, never an exception."""
    base_dir = tmp_path / "cache"
    region = make(kind, base_dir)
    put(region, kind, "key")
    shard = os.path.dirname(os.path.dirname(faultkit.entry_path(region.backend, "key")))
    shutil.rmtree(shard)
    os.symlink(os.path.basename(shard), shard)  # data/x -> x
    assert region.get("key") is NO_VALUE
    region.backend.prune()
    region.backend.verify()
    put(region, kind, "key")  # the write replaces the loop with a real directory
    assert not os.path.islink(shard)
    assert writer_of(region, kind, "key") == 0


def _hits_as_another_user(base_dir: str, arguments: dict) -> tuple:
    pickled_region = faultkit.pickled(os.path.join(base_dir, "pickled"), **arguments)
    raw_region = faultkit.raw(os.path.join(base_dir, "raw"), **arguments)
    with raw_region.get("key") as cached:
        raw_bytes = cached.read()
    return pickled_region.get("key"), raw_bytes, pickled_region.backend.stats()["hits"]


def test_another_users_hit_is_a_hit_though_the_kernel_refuses_it_o_noatime():
    """Hits open with O_NOATIME, which Linux grants the file's owner only (EPERM for
    anyone else): in a cache shared by group permissions another user's hit opens without
    it and is still a hit."""
    if not hasattr(os, "O_NOATIME") or os.geteuid() != 0:
        pytest.skip("needs Linux's O_NOATIME and root (to act as another user)")
    arguments = {"dir_mode": "0o777", "file_mode": "0o666"}
    with faultkit.nobody_dir("noatime") as top:
        base_dir = os.path.join(top, "cache")
        faultkit.pickled(os.path.join(base_dir, "pickled"), **arguments).set("key", "value")
        faultkit.raw(os.path.join(base_dir, "raw"), **arguments).set("key", io.BytesIO(b"bytes"))
        os.chmod(top, 0o777)
        assert faultkit.in_child_as_nobody(_hits_as_another_user, base_dir, arguments) == (
            "value",
            b"bytes",
            1,
        )
