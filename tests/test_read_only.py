"""Read-only caches (``read_only=True``): prepared elsewhere, served without changing a byte.

The main test prepares a cache, takes the state of its whole tree (names, owners, modes,
sizes, inodes, mtimes, ctimes, atimes where the filesystem keeps them, and every file's
content, bookkeeping files included), lets several spawned processes read everything
at once, runs the read-only CLI commands, and takes the state again: it must not have
changed.  It does so on a plain writable directory, on a directory that another user
owns (the readers run as ``nobody``, with read permission only) and on a real read-only
bind mount.  Mounts and other users need root; those cases skip cleanly elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator

import faultkit
import pytest
from conftest import SPAWN, WAIT
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE

from dogpile_fsbackend import (
    ConfigError,
    FSBackendError,
    PickleFSBackend,
    RawFSBackend,
    ReadOnlyError,
    cli,
    layout,
    records,
)

ROOT = os.geteuid() == 0
READERS = 3
EXPIRATION = 1800  # the readers' expiration_time; the planted "old" entry is two hours old
SHARED_MODES = {"file_mode": 0o644, "dir_mode": 0o755}  # readable by everyone


def _region(kind: str, base_dir: str, **arguments):
    return make_region().configure(
        f"dogpile_fsbackend.{kind}", arguments={"base_dir": base_dir, **arguments}
    )


def _values(kind: str) -> dict[str, object]:
    keys = [f"key {index}" for index in range(24)] + ["ключ ✓", "a\nkey with a line break"]
    if kind == "raw":
        return {key: f"{key}\n".encode() * 300 for key in keys}
    return {key: {"key": key, "payload": key * 20} for key in keys}


def _prepare(kind: str, base_dir: str) -> dict[str, object]:
    """A cache holding the values, a damaged entry and an expired one (for the readers)."""
    region = _region(kind, base_dir, **SHARED_MODES)
    values = _values(kind)
    for key, value in [*values.items(), ("damaged", values["key 0"]), ("old", values["key 1"])]:
        region.set(key, io.BytesIO(value) if kind == "raw" else value)
    backend = region.backend
    with open(faultkit.entry_path(backend, "damaged"), "r+b") as handle:
        handle.truncate(records.HEADER_SIZE + 3)
    _date_back(backend, "old", 7200)
    return values


def _date_back(backend, key: str, seconds: float) -> None:
    """Rewrite ``key``'s record as if it had been created ``seconds`` ago."""
    digest = layout.key_digest(layout.encode_key(key))
    record = backend.store.peek_record(digest)
    path = faultkit.entry_path(backend, key)
    data = records.encode(
        backend.store.kind,
        layout.encode_key(key),
        record.payload,
        time.time() - seconds,
        record.form,
    )
    with open(path + ".new", "wb") as handle:
        handle.write(data)
    os.chmod(path + ".new", 0o644)
    os.replace(path + ".new", path)


def _drop_to_nobody() -> None:
    # dogpile looks its backends up in the interpreter's files, which nobody may not read.
    with tempfile.TemporaryDirectory() as warm_up:
        for kind in ("pickled", "raw"):
            _region(kind, os.path.join(warm_up, kind))
    os.setgroups([])
    os.setgid(faultkit.NOBODY)
    os.setuid(faultkit.NOBODY)


def _read_everything(base_dir, kind, as_nobody, values, barrier, results) -> None:
    """In a spawned process: every read a read-only user makes, and every refused change."""
    try:
        if as_nobody:
            _drop_to_nobody()
        region = _region(kind, base_dir, read_only=True, expiration_time=EXPIRATION)
        backend = region.backend
        barrier.wait(WAIT)  # every reader at once
        wrong = []
        for _ in range(3):
            for key, value in values.items():
                found = region.get(key)
                got = (
                    faultkit.read_raw(found) if kind == "raw" and found is not NO_VALUE else found
                )
                if got != value:
                    wrong.append(key)
        created = []

        def creator():
            created.append(1)
            return io.BytesIO(b"made here") if kind == "raw" else "made here"

        made = [region.get_or_create("not stored", creator) for _ in range(2)]
        mutex = backend.get_mutex("key 0")
        locked = (mutex.acquire(), mutex.locked())
        mutex.release()
        outcome = {
            "uid": os.geteuid(),
            "wrong": wrong,
            "damaged": region.get("damaged") is NO_VALUE,
            "expired": region.get("old") is NO_VALUE,
            "created": [m.getvalue() if kind == "raw" else m for m in made],
            "creator calls": len(created),
            "mutex": locked,
            "keys": sorted(backend.keys()),
            "keys with prefix": sorted(backend.keys("key 1")),
            "entries": backend.stats()["entries"],
        }
        refused = {}
        changes = {
            "set": lambda: region.set("key 0", io.BytesIO(b"new") if kind == "raw" else "new"),
            "delete": lambda: region.delete("key 0"),
            "delete_matching": lambda: backend.delete_matching("key"),
            "prune": backend.prune,
            "verify": backend.verify,
            "clear": backend.clear,
        }
        for name, change in changes.items():
            try:
                change()
            except ReadOnlyError as exc:
                refused[name] = errno.errorcode[exc.errno or 0]
        outcome["refused"] = refused
        results.put(outcome)
    except BaseException:
        results.put(traceback.format_exc())


def _cli_in_process(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = cli.main(list(args))
    return status, out.getvalue()


def _cli_as_nobody(*args: str) -> tuple[int, str]:
    return faultkit.in_child_as_nobody(_cli_in_process, *args)


def _cli_subprocess(*args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "dogpile_fsbackend", *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


@contextlib.contextmanager
def _cache_at(where: str, tmp_path) -> Iterator[tuple[str, str, bool, bool]]:
    """(where to build the cache, where readers open it, readers are nobody, atimes kept)."""
    if where == "plain":
        base_dir = str(tmp_path / "cache")
        yield base_dir, base_dir, False, faultkit.keeps_atimes(str(tmp_path))
    elif where == "other-user":
        if not ROOT:
            pytest.skip("needs root to run the readers as another user")
        top = tempfile.mkdtemp(prefix="dogpile-fsbackend-ro-")
        os.chmod(top, 0o755)
        try:
            base_dir = os.path.join(top, "cache")
            # A reader that does not own the files cannot open them with O_NOATIME, so
            # the kernel (relatime) updates their atimes as for any reader: not compared.
            yield base_dir, base_dir, True, False
        finally:
            shutil.rmtree(top, ignore_errors=True)
    else:
        source, mount_point = tmp_path / "source", tmp_path / "ro"
        source.mkdir()
        mount_point.mkdir()
        with faultkit.mounted("--bind", str(source), target=str(mount_point)):
            problem = faultkit.try_mount("-o", "remount,bind,ro", str(mount_point))
            if problem:
                pytest.skip(problem)
            yield str(source / "cache"), str(mount_point / "cache"), False, True


@pytest.mark.parametrize("kind", ["pickled", "raw"])
@pytest.mark.parametrize("where", ["plain", "other-user", "read-only-mount"])
def test_gets_in_several_processes_change_nothing(tmp_path, where, kind):
    """Hits, misses that still compute, listings, stats and the read-only CLI commands,
    in several processes at once, leave every file and directory as it was; every change
    is refused with ReadOnlyError (EROFS), damaged and expired entries stay."""
    with _cache_at(where, tmp_path) as (build_dir, base_dir, as_nobody, atimes):
        values = _prepare(kind, build_dir)
        before = faultkit.tree_state(build_dir, atimes)
        barrier, results = SPAWN.Barrier(READERS), SPAWN.Queue()
        readers = [
            SPAWN.Process(
                target=_read_everything,
                args=(base_dir, kind, as_nobody, values, barrier, results),
            )
            for _ in range(READERS)
        ]
        outcomes = faultkit.run_processes(readers, results)
        run_cli = _cli_as_nobody if as_nobody else _cli_subprocess
        listed = run_cli("keys", "--json", "--expiration-time", str(EXPIRATION), base_dir)
        dry_run = run_cli("delete", base_dir, "--prefix", "key 1", "--dry-run", "--json")
        after = faultkit.tree_state(build_dir, atimes)

    stored = sorted([*values, "damaged", "old"])
    for outcome in outcomes:
        assert isinstance(outcome, dict), outcome  # else the reader's traceback
        assert outcome == {
            "uid": faultkit.NOBODY if as_nobody else 0,
            "wrong": [],
            "damaged": True,
            "expired": True,
            "created": [b"made here" if kind == "raw" else "made here"] * 2,
            "creator calls": 2,  # a miss computes every time: nothing can be stored
            "mutex": (True, True),
            "keys": sorted(values),
            "keys with prefix": sorted(key for key in values if key.startswith("key 1")),
            "entries": len(stored),  # the counters as the cache's writer left them
            "refused": dict.fromkeys(
                ("set", "delete", "delete_matching", "prune", "verify", "clear"), "EROFS"
            ),
        }
    assert [reader.exitcode for reader in readers] == [0] * READERS
    assert listed[0] == 0, listed
    assert sorted(json.loads(line) for line in listed[1].splitlines()) == sorted(values)
    assert dry_run[0] == 0, dry_run
    matching = [key for key in stored if key.startswith("key 1")]
    assert json.loads(dry_run[1])["entries"] == len(matching)
    assert after == before


@pytest.mark.skipif(not ROOT, reason="needs root for the bind mount")
def test_the_cli_on_a_read_only_mount_refuses_changes_and_serves_reads(tmp_path):
    with _cache_at("read-only-mount", tmp_path) as (build_dir, base_dir, _, atimes):
        _prepare("pickled", build_dir)
        before = faultkit.tree_state(build_dir, atimes)
        outcomes = {
            command: _cli_subprocess(command, base_dir, *extra)
            for command, *extra in (
                ("stats", "--json"),
                ("prune",),
                ("verify",),
                ("clear", "--yes"),
                ("delete", "--prefix", "key"),
            )
        }
        after = faultkit.tree_state(build_dir, atimes)
    assert outcomes["stats"][0] == 0
    assert json.loads(outcomes["stats"][1])["entries"] == len(_values("pickled")) + 2
    for command in ("prune", "verify", "clear", "delete"):
        status, output = outcomes[command]
        assert status == cli.EXIT_ERROR, output
        assert f"cannot {command}" in output
        assert "its filesystem is mounted read-only" in output
        assert base_dir in output
    assert after == before


@pytest.mark.parametrize("backend_class", [PickleFSBackend, RawFSBackend])
def test_a_directory_that_is_not_a_cache_is_refused_and_nothing_is_created(
    tmp_path, backend_class
):
    (tmp_path / "empty").mkdir()
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "notes.txt").write_text("not a cache")
    (tmp_path / "files" / layout.DATA_DIR).mkdir()
    (tmp_path / "a file").write_text("x")
    before = faultkit.tree_state(str(tmp_path))
    for name, allowed in (
        ("missing", "an existing cache directory when read_only=True"),
        ("missing/deeper", "an existing cache directory when read_only=True"),
        ("a file", "an existing cache directory when read_only=True"),
        ("empty", f"its marker {tmp_path / 'empty' / layout.MARKER_NAME} is missing"),
        ("files", f"its marker {tmp_path / 'files' / layout.MARKER_NAME} is missing"),
    ):
        base_dir = str(tmp_path / name)
        with pytest.raises(ConfigError) as info:
            backend_class({"base_dir": base_dir, "read_only": True})
        assert info.value.argument == "base_dir"
        assert allowed in str(info.value)
        assert base_dir in str(info.value)
    assert faultkit.tree_state(str(tmp_path)) == before


def test_a_cache_of_the_other_kind_or_layout_is_refused(tmp_path):
    base_dir = str(tmp_path / "cache")
    _region("pickled", base_dir).set("k", 1)
    before = faultkit.tree_state(base_dir)
    with pytest.raises(ConfigError) as info:
        RawFSBackend({"base_dir": base_dir, "read_only": True})
    assert info.value.argument == "base_dir"
    with pytest.raises(ConfigError) as info:
        PickleFSBackend({"base_dir": base_dir, "read_only": True, "shard_depth": 3})
    assert info.value.argument == "shard_depth"
    assert faultkit.tree_state(base_dir) == before


@pytest.mark.parametrize("kind", ["pickled", "raw"])
def test_every_change_raises_read_only_error_naming_the_key_and_the_directory(tmp_path, kind):
    base_dir = str(tmp_path / "cache")
    _prepare(kind, base_dir)
    region = _region(kind, base_dir, read_only=True)
    backend = region.backend
    value = io.BytesIO(b"new") if kind == "raw" else "new"
    changes = {
        "store key 'key 0'": lambda: region.set("key 0", value),
        "store key 'key 2'": lambda: region.set_multi({"key 2": value}),
        "delete key 'key 3'": lambda: region.delete("key 3"),
        "delete key 'key 4'": lambda: region.delete_multi(["key 4"]),
        "delete the keys starting with 'key'": lambda: backend.delete_matching("key"),
        "prune": backend.prune,
        "verify": backend.verify,
        "clear": backend.clear,
    }
    before = faultkit.tree_state(base_dir)
    for action, change in changes.items():
        with pytest.raises(ReadOnlyError) as info:
            change()
        error = info.value
        assert isinstance(error, FSBackendError) and isinstance(error, OSError)
        assert error.errno == errno.EROFS
        assert error.filename == base_dir
        assert f"cannot {action}: the cache is read-only (read_only=True)" in str(error)
    assert faultkit.tree_state(base_dir) == before
    assert backend.stats()["write_errors"] == 0


def test_write_errors_log_logs_and_counts_a_set_deletes_still_raise(tmp_path, caplog):
    base_dir = str(tmp_path / "cache")
    _prepare("pickled", base_dir)
    region = _region("pickled", base_dir, read_only=True, write_errors="log")
    region.set("key 0", "new")
    assert region.get("key 0") == _values("pickled")["key 0"]
    assert region.backend.stats()["write_errors"] == 1
    assert "cannot store key 'key 0'" in caplog.text
    with pytest.raises(ReadOnlyError):
        region.delete("key 0")


@pytest.mark.parametrize("kind", ["pickled", "raw"])
def test_get_or_create_returns_what_it_created_without_storing_it(tmp_path, kind):
    """dogpile's creation paths (get_or_create, cache_on_arguments, the multi variants,
    the regeneration of an expired value) return what they created, uncached."""
    base_dir = str(tmp_path / "cache")
    values = _prepare(kind, base_dir)
    region = _region(kind, base_dir, read_only=True)
    before = faultkit.tree_state(base_dir)
    calls = []

    def make(name):
        calls.append(name)
        return io.BytesIO(name.encode()) if kind == "raw" else name

    def content(value):
        return value.getvalue().decode() if kind == "raw" else value

    @region.cache_on_arguments()
    def compute(name):
        return make(name)

    @region.cache_multi_on_arguments()
    def compute_many(*names):
        return [make(name) for name in names]

    assert [content(compute("x")) for _ in range(2)] == ["x", "x"]
    assert [content(v) for v in compute_many("y", "z")] == ["y", "z"]
    assert [content(v) for v in compute_many("y", "z")] == ["y", "z"]
    fresh = region.get_or_create("key 5", lambda: make("fresh"), expiration_time=1e-9)
    assert content(fresh) == "fresh"
    assert calls == ["x", "x", "y", "z", "y", "z", "fresh"]  # nothing was stored
    assert set(region.backend.keys()) == {*values, "old"}  # (no expiration_time here)
    assert faultkit.tree_state(base_dir) == before


def test_the_mutex_excludes_this_processs_threads_only(tmp_path):
    base_dir = str(tmp_path / "cache")
    _prepare("pickled", base_dir)
    before = faultkit.tree_state(base_dir)
    backend = _region("pickled", base_dir, read_only=True).backend
    mutex = backend.get_mutex("key 0")
    assert mutex.acquire()
    other_thread = []
    thread = threading.Thread(target=lambda: other_thread.append(mutex.acquire(False)))
    thread.start()
    thread.join(WAIT)
    assert other_thread == [False]
    assert mutex.locked()
    # Another process takes the same key's mutex meanwhile: nothing is shared on disk.
    assert faultkit.in_child(_take_mutex, base_dir, "key 0") is True
    mutex.release()
    assert not mutex.locked()
    assert faultkit.tree_state(base_dir) == before


def _take_mutex(base_dir: str, key: str) -> bool:
    mutex = _region("pickled", base_dir, read_only=True).backend.get_mutex(key)
    acquired = mutex.acquire(False)
    mutex.release()
    return acquired


def _writer_mutex_free(base_dir: str, key: str) -> bool:
    mutex = _region("pickled", base_dir).backend.get_mutex(key)
    acquired = mutex.acquire(False)
    if acquired:
        mutex.release()
    return acquired


@pytest.mark.parametrize("first", ["read-only", "writable"])
def test_a_read_only_backend_beside_a_writable_one_in_one_process(tmp_path, first):
    """Either order: the writable backend's mutexes still exclude other processes, the
    read-only one sees its writes, and never stamps what it reads."""
    base_dir = str(tmp_path / "cache")
    _region("pickled", base_dir).set("seed", 1)
    made = {}
    for name in (first, "writable" if first == "read-only" else "read-only"):
        made[name] = _region("pickled", base_dir, read_only=name == "read-only").backend
    writable, read_only = made["writable"], made["read-only"]
    mutex = writable.get_mutex("shared key")
    assert mutex.acquire()
    try:
        assert faultkit.in_child(_writer_mutex_free, base_dir, "shared key") is False
    finally:
        mutex.release()
    assert faultkit.in_child(_writer_mutex_free, base_dir, "shared key") is True
    writable.set_serialized("written", b"by the writer")
    entry = faultkit.entry_path(writable, "written")
    stamped = os.stat(entry).st_mtime_ns
    assert read_only.get_serialized("written") == b"by the writer"
    assert os.stat(entry).st_mtime_ns == stamped
    assert sorted(read_only.keys()) == ["seed", "written"]


def _open_read_only(base_dir: str) -> str:
    try:
        PickleFSBackend({"base_dir": base_dir, "read_only": True})
    except ConfigError as exc:
        return str(exc)
    return "opened"


@pytest.mark.skipif(not ROOT, reason="needs root to run the reader as another user")
def test_a_private_cache_of_another_user_says_who_owns_it():
    top = tempfile.mkdtemp(prefix="dogpile-fsbackend-ro-")
    try:
        os.chmod(top, 0o755)
        base_dir = os.path.join(top, "cache")
        _region("pickled", base_dir).set("k", 1)  # private: 0o700 / 0o600, as by default
        message = faultkit.in_child_as_nobody(_open_read_only, base_dir)
        assert f"can read; {base_dir} is not accessible: it belongs to uid 0" in message
        assert "read access (dir_mode=0o755, file_mode=0o644" in message
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize("kind", ["pickled", "raw"])
def test_a_cache_without_its_accounting_file_is_served(tmp_path, kind):
    """A cache shipped without its accounting file (a copy that left it out): gets,
    keys and stats work, the counters read zero, and nothing is created."""
    base_dir = str(tmp_path / "cache")
    _region(kind, base_dir).set("kept", io.BytesIO(b"value") if kind == "raw" else b"value")
    os.unlink(os.path.join(base_dir, layout.ACCOUNTING_NAME))
    before = faultkit.tree_state(base_dir)
    region = _region(kind, base_dir, read_only=True)
    found = region.get("kept")
    assert (found.read() if kind == "raw" else found) == b"value"
    assert list(region.backend.keys()) == ["kept"]
    assert (region.backend.stats()["entries"], region.backend.stats()["bytes"]) == (0, 0)
    assert faultkit.tree_state(base_dir) == before
