"""Bookkeeping that cannot crash, hang or wedge (issue 10), tried with the real thing.

Each test names the item of the issue it backs.  Multi-process cases use
spawned processes synchronised with events and shared counters (bounded
waits, no bare sleeps that race); mounts (tmpfs, read-only binds), other
users and PID namespaces need root and skip cleanly elsewhere.
"""

from __future__ import annotations

import bz2
import contextlib
import errno
import gzip
import io
import logging
import lzma
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings

import faultkit
import pytest
from conftest import SPAWN, WAIT
from dogpile.cache.api import NO_VALUE
from faultkit import pickled, raw

from dogpile_fsbackend import (
    BookkeepingError,
    CacheSizeWarning,
    ConfigError,
    accounting,
    files,
    layout,
    maintenance,
    marker,
    records,
    store,
)

NOBODY = 65534
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (mounts, other users, namespaces)")
BOOKKEEPING = (layout.ACCOUNTING_NAME, layout.LOCK_NAME, layout.MARKER_NAME)


def python(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """A fresh interpreter run with ``args``, its output captured as text."""
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=WAIT, check=check
    )


def cli(*args: str) -> subprocess.CompletedProcess:
    return python("-m", "dogpile_fsbackend", *args)


def wait_for(condition, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def assert_accounting_exact(backend) -> None:
    stats = backend.stats()
    assert (stats["bytes"], stats["entries"]) == faultkit.disk_usage(backend.settings.base_dir)


# -- 1, 2: damaged, shortened, replaced or deleted bookkeeping files under running writers --

ENTRY = 400  # bytes of each value; entries are a little larger with the header and key
CHECK_INTERVAL = 0.2  # the writers' identity checks, shortened to keep the test short
LIMIT = 60 * 1024
WRITERS = 3


def _busy_writer(base_dir, worker, progress, stop, report):
    """Set and read keys until told to stop; report which files it ended up on."""
    files.CHECK_INTERVAL = CHECK_INTERVAL  # once a second in production
    region = pickled(base_dir, cache_size=LIMIT, reconcile_interval=3600)
    store = region.backend.store
    problems = []
    count = 0
    while not stop.is_set():
        key = f"w{worker}-{count % 150}"
        value = faultkit.make_value(key, worker, count, ENTRY)
        try:
            region.set(key, value)
            found = region.get(key)
            if found is not NO_VALUE and faultkit.check_value(key, found) is not None:
                problems.append(faultkit.check_value(key, found))
        except Exception as exc:
            problems.append(repr(exc))
        count += 1
        progress[worker] = count
    on_current = {
        "accounting": os.fstat(store.accounting._fd).st_ino
        == os.stat(store.layout.path(layout.ACCOUNTING_NAME)).st_ino,
        "lock": os.fstat(store.lock_file.fd).st_ino
        == os.stat(store.layout.path(layout.LOCK_NAME)).st_ino,
    }
    report.put((worker, problems[:5], on_current))


def _damage(path: str, how: str) -> None:
    if how == "truncate-empty":
        os.truncate(path, 0)
    elif how == "truncate-short":
        os.truncate(path, os.path.getsize(path) // 3)
    elif how == "garbage":
        with open(path, "r+b") as handle:
            handle.write(os.urandom(max(64, os.path.getsize(path))))
    elif how == "replace-empty":
        with open(path + ".new", "wb"):
            pass
        os.replace(path + ".new", path)
    elif how == "replace-copy":  # a restore from a backup: same content, another file
        shutil.copyfile(path, path + ".new")
        os.replace(path + ".new", path)
    elif how == "delete":
        os.unlink(path)
    else:
        raise AssertionError(how)


DAMAGE = {
    layout.ACCOUNTING_NAME: [
        "truncate-empty",
        "truncate-short",
        "garbage",
        "replace-empty",
        "replace-copy",
        "delete",
    ],
    layout.LOCK_NAME: ["truncate-empty", "garbage", "replace-empty", "delete"],
    layout.MARKER_NAME: ["replace-copy", "delete"],
    layout.MAINTENANCE_LOCK_NAME: ["truncate-empty", "garbage", "delete"],
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damaging_a_bookkeeping_file_under_running_writers_never_kills_one(tmp_path, name):
    """Items 1, 2, 12: shorten, overwrite, replace or delete ``name`` while 3 processes
    write.  None dies (a SIGBUS would be exit code -7), none raises, every one ends on the
    file now at the path (no split brain), and the limit and the counts hold."""
    base_dir = str(tmp_path / "cache")
    pickled(base_dir, cache_size=LIMIT).set("seed", 1)
    progress = SPAWN.Array("q", WRITERS)
    stop, report = SPAWN.Event(), SPAWN.Queue()
    procs = [
        SPAWN.Process(target=_busy_writer, args=(base_dir, w, progress, stop, report))
        for w in range(WRITERS)
    ]
    for proc in procs:
        proc.start()
    try:
        wait_for(lambda: min(progress) >= 50, "the writers to start")
        path = os.path.join(base_dir, name)
        for how in DAMAGE[name]:
            _damage(path, how)
            start = time.monotonic()
            # Everyone's identity check is due by now, so each set from here on checks...
            wait_for(lambda start=start: time.monotonic() - start > CHECK_INTERVAL, "time")
            before = list(progress)
            # ...and every writer makes 20 of them (a writer descheduled meanwhile is waited
            # for, rather than judged before it could look).
            wait_for(
                lambda before=before: all(
                    now > then + 20 for now, then in zip(progress, before, strict=True)
                ),
                f"the writers to go on after {how}",
            )
        # A replaced lock file broke exclusion until every writer had moved: the movers
        # marked a recount, which the writers' sets carry out; then 20 more sets each.
        checker = pickled(base_dir, cache_size=LIMIT)
        wait_for(lambda: not checker.backend.store.reconcile_due(), "the writers to recount")
        before = list(progress)
        wait_for(
            lambda: all(now > then + 20 for now, then in zip(progress, before, strict=True)),
            "the writers to go on after the recount",
        )
    finally:
        stop.set()
        outcomes = [report.get(timeout=WAIT) for _ in procs]
        for proc in procs:
            proc.join(WAIT)
    assert [proc.exitcode for proc in procs] == [0] * WRITERS  # -7 would be SIGBUS
    for worker, problems, on_current in outcomes:
        assert problems == [], (worker, problems)
        assert on_current == {"accounting": True, "lock": True}, (worker, on_current)
    for required in BOOKKEEPING:
        assert os.path.isfile(os.path.join(base_dir, required)), required
    slack = WRITERS * (ENTRY + 200)  # one unchecked entry per concurrent writer
    assert faultkit.disk_usage(base_dir)[0] <= LIMIT + slack
    checker.backend.verify()
    assert_accounting_exact(checker.backend)


def _shrinking_loop(base_dir: str, rounds: int) -> None:
    region = pickled(base_dir, cache_size=LIMIT)
    accounting = os.path.join(base_dir, layout.ACCOUNTING_NAME)
    for i in range(rounds):
        os.truncate(accounting, i % 3 * 1000)  # shorter each time, then grown by a repair
        region.set(f"k{i}", faultkit.make_value(f"k{i}", 0, i, ENTRY))
        region.backend.stats()


def test_the_repair_itself_never_shrinks_a_file_under_another_process(tmp_path):
    """Item 1: repairs used to ftruncate(0) the shared file under every mapped process.
    Now one process damages and repairs 200 times while another reads the counters."""
    base_dir = str(tmp_path / "cache")
    pickled(base_dir, cache_size=LIMIT).set("seed", 1)
    progress = SPAWN.Array("q", WRITERS)
    stop, report = SPAWN.Event(), SPAWN.Queue()
    reader = SPAWN.Process(target=_busy_writer, args=(base_dir, 0, progress, stop, report))
    reader.start()
    try:
        wait_for(lambda: progress[0] >= 10, "the other process to start")
        faultkit.in_child(_shrinking_loop, base_dir, 200)
        before = progress[0]
        wait_for(lambda: progress[0] > before + 20, "the other process to go on")
    finally:
        stop.set()
        _, problems, _ = report.get(timeout=WAIT)
        reader.join(WAIT)
    assert reader.exitcode == 0
    assert problems == []


def _sparse_accounting_on_a_full_disk(base_dir: str) -> dict:
    region = pickled(base_dir, cache_size=10**12)
    region.set("seed", 1)
    path = os.path.join(base_dir, layout.ACCOUNTING_NAME)
    with open(path, "rb") as handle:
        header = handle.read(accounting.HEADER_SIZE)
    sparse = path + ".sparse"
    with open(sparse, "wb") as handle:  # a valid header, every counter page a hole
        handle.write(header)
        handle.truncate(os.path.getsize(path))
    os.replace(sparse, path)
    filler = os.path.join(base_dir, "filler")
    with open(filler, "wb") as handle, contextlib.suppress(OSError):  # the disk is full now
        while True:
            handle.write(b"\0" * 65536)
            handle.flush()
    outcomes: dict[str, object] = {}
    time.sleep(1.1 * files.CHECK_INTERVAL)  # the once-a-second identity check is due now
    backend = region.backend
    for name, operation in (
        ("set", lambda: region.set("key", faultkit.make_value("key", 0, 0, 3000))),
        ("stats", backend.stats),
        ("prune", backend.prune),
        ("verify", backend.verify),
    ):
        try:
            operation()
            outcomes[name] = "ok"
        except OSError as exc:
            outcomes[name] = errno.errorcode.get(exc.errno or 0, str(exc))
    done = cli("prune", base_dir)
    outcomes["cli prune"] = done.returncode
    return outcomes


@needs_root
def test_a_sparse_accounting_file_on_a_full_tmpfs_is_an_error_not_a_signal(tmp_path):
    """Item 1: the first write into a hole of the accounting file on a full disk used to
    be SIGBUS; now it is ENOSPC (or nothing at all) for set, stats, prune, verify, CLI."""
    mount_point = str(tmp_path / "mnt")
    os.mkdir(mount_point)
    with faultkit.mounted("-t", "tmpfs", "-o", "size=2m", "tmpfs", target=mount_point):
        outcomes = faultkit.in_child(
            _sparse_accounting_on_a_full_disk, os.path.join(mount_point, "cache")
        )
    assert set(outcomes.values()) <= {"ok", "ENOSPC", 0, 1}, outcomes
    assert outcomes["stats"] == "ok"


# -- 3: FIFOs, devices, links and directories planted as bookkeeping files --------------


def _plant(path: str, what: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    if what == "fifo":
        os.mkfifo(path)
    elif what == "dev-zero-link":
        os.symlink("/dev/zero", path)
    elif what == "directory":
        os.mkdir(path)
    else:
        raise AssertionError(what)


_OPEN_IN_A_CHILD = textwrap.dedent(
    """
    import sys
    from dogpile.cache import make_region
    try:
        make_region().configure(
            "dogpile_fsbackend.pickled", arguments={"base_dir": sys.argv[1]}
        ).set("k", 1)
    except Exception as exc:
        print(type(exc).__name__, exc)
    else:
        print("opened")
    """
)


@pytest.mark.parametrize("what", ["fifo", "dev-zero-link", "directory"])
@pytest.mark.parametrize("name", [*BOOKKEEPING, layout.MAINTENANCE_LOCK_NAME])
def test_a_planted_bookkeeping_file_is_a_clear_error_not_a_hang(tmp_path, name, what):
    """Item 3: a FIFO, a link to /dev/zero or a directory in place of a bookkeeping file:
    a new process and the CLI fail at once with an error naming the file and what to do
    (never a hang, an endless read or a bare errno)."""
    base_dir = str(tmp_path / "cache")
    pickled(base_dir).set("seed", 1)
    if name == layout.MAINTENANCE_LOCK_NAME:  # only a first set-up opens it
        os.unlink(os.path.join(base_dir, layout.MARKER_NAME))
        shutil.rmtree(os.path.join(base_dir, layout.DATA_DIR))
    path = os.path.join(base_dir, name)
    _plant(path, what)
    done = python("-c", _OPEN_IN_A_CHILD, base_dir)
    assert done.stdout.startswith("BookkeepingError"), done
    assert path in done.stdout
    assert "remove it" in done.stdout or "delete it" in done.stdout
    if name != layout.MAINTENANCE_LOCK_NAME:
        for command in ("stats", "prune"):
            outcome = cli(command, base_dir)
            assert outcome.returncode in (1, 2), outcome
            assert path in outcome.stderr, outcome


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{not json", "is not JSON"),
        (b"[1, 2]", "is not a JSON object"),
        (b'{"format": "dogpile_fsbackend", "version": 1, "kind": "jpeg"}', "kind"),
        (b" " * (marker.MAX_SIZE + 10), "larger than"),
    ],
    ids=["not-json", "not-an-object", "unknown-kind", "huge"],
)
def test_a_damaged_marker_names_the_file_and_the_repair(tmp_path, content, problem):
    """Items 3, 15: a damaged marker is a BookkeepingError naming the file and how to
    repair it; deleting it, as the message says, lets the same kind re-create it from
    the entries, which are all kept."""
    base_dir = str(tmp_path / "cache")
    region = pickled(base_dir)
    region.set("key", "value")
    path = os.path.join(base_dir, layout.MARKER_NAME)
    with open(path, "wb") as handle:
        handle.write(content)
    with pytest.raises(BookkeepingError) as info:
        pickled(base_dir)
    message = str(info.value)
    assert path in message and problem in message and "delete it" in message
    os.unlink(path)
    assert pickled(base_dir).get("key") == "value"
    assert marker.read(base_dir) == marker.Marker(records.KIND_PICKLED, 2, 1, 2**32)


# -- 4: entry reads bounded by the header ------------------------------------------------


def _read_a_sparse_giant(base_dir: str) -> dict:
    import resource

    region = pickled(base_dir)
    region.set("key", "value")
    region.set("other", "kept")
    path = faultkit.entry_path(region.backend, "key")
    os.truncate(path, 2 * 1024**3)  # sparse: costs no disk, 2 GiB if read whole
    resource.setrlimit(resource.RLIMIT_AS, (1024**3, resource.RLIM_INFINITY))
    return {
        "get": region.get("key") is NO_VALUE,
        "removed": not os.path.exists(path),
        "other": region.get("other"),
    }


@pytest.mark.parametrize("how", ["get", "verify", "cli-verify"])
def test_an_entry_extended_to_gigabytes_is_damage_not_a_memory_error(tmp_path, how):
    """Item 4: the header is read first; a file longer than its header says is a miss and
    is removed, with at most the header read (the get runs under a 1 GiB address-space
    limit, so a whole read of the 2 GiB file would fail)."""
    base_dir = str(tmp_path / "cache")
    if how == "get":
        assert faultkit.in_child(_read_a_sparse_giant, base_dir) == {
            "get": True,
            "removed": True,
            "other": "kept",
        }
        return
    region = pickled(base_dir)
    region.set("key", "value")
    path = faultkit.entry_path(region.backend, "key")
    os.truncate(path, 2 * 1024**3)
    if how == "verify":
        assert region.backend.verify().damaged_removed == 1
    else:
        done = cli("verify", "--json", base_dir)
        assert done.returncode == 0, done
        assert '"damaged_removed": 1' in done.stdout
    assert not os.path.exists(path)


# -- 5, 6: raw values are what read() returns, copied only while they can fit -------------


class _CountingStream(io.RawIOBase):
    """An endless stream that counts what is read from it."""

    def __init__(self) -> None:
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        buffer[:] = b"z" * len(buffer)
        self.read_bytes += len(buffer)
        return len(buffer)


def test_a_stream_larger_than_the_cache_stops_copying_once_it_cannot_fit(tmp_path):
    """Item 5: copying stops as soon as the value can no longer fit (not after 16x
    cache_size), the partial temp file is removed, the refusal is reported as before."""
    base_dir = str(tmp_path / "cache")
    limit = 1024 * 1024
    region = raw(base_dir, cache_size=limit)
    region.set("key", io.BytesIO(b"old"))
    stream = _CountingStream()
    with pytest.warns(CacheSizeWarning, match="more than"):
        region.set("key", io.BufferedReader(stream))
    assert stream.read_bytes <= limit + 2 * 1024 * 1024  # the room plus one read chunk
    assert region.get("key") is NO_VALUE  # the old value does not outlive the refused set
    assert faultkit.temp_files(base_dir) == []
    assert_accounting_exact(region.backend)


def test_dev_zero_is_refused_without_filling_the_disk(tmp_path):
    """Item 5: open('/dev/zero', 'rb') used to fill the filesystem; now it stops at the room."""
    base_dir = str(tmp_path / "cache")
    region = raw(base_dir, cache_size=4 * 1024 * 1024)
    with open("/dev/zero", "rb") as zero, pytest.warns(CacheSizeWarning):
        region.set("zero", zero)
    assert region.get("zero") is NO_VALUE
    assert faultkit.temp_files(base_dir) == []
    assert faultkit.disk_usage(base_dir) == (0, 0)


@pytest.mark.parametrize("opener", [gzip.open, bz2.open, lzma.open], ids=["gzip", "bz2", "lzma"])
def test_a_compressed_file_object_is_cached_as_what_it_reads(tmp_path, opener):
    """Item 6: gzip/bz2/lzma objects have a descriptor holding the compressed bytes; the
    cache stores what read() returns, and the position the creator left."""
    content = faultkit.make_blob("key", 0, 0, 200_000)
    path = str(tmp_path / "value.z")
    with opener(path, "wb") as out:
        out.write(content)
    region = raw(tmp_path / "cache")
    with opener(path, "rb") as value:
        value.read(10)
        region.set("key", value)
        assert value.tell() == 10  # the caller's position is left alone
    hit = region.get("key")
    assert hit.read(5) == content[10:15]  # starts where the creator left its file
    hit.close()
    assert faultkit.read_raw(region.get("key")) == content


def test_a_buffered_wrapper_over_a_decoder_is_cached_as_what_it_reads(tmp_path):
    """Item 6: io.BufferedReader(gzip.GzipFile(...)) has the compressed file's fileno()."""
    content = faultkit.make_blob("key", 0, 0, 50_000)
    path = str(tmp_path / "value.gz")
    with gzip.open(path, "wb") as out:
        out.write(content)
    region = raw(tmp_path / "cache")
    with io.BufferedReader(gzip.GzipFile(path, "rb")) as value:  # type: ignore[arg-type]
        region.set("key", value)
    assert faultkit.read_raw(region.get("key")) == content


def test_a_proc_file_is_cached_with_its_content(tmp_path):
    """Item 6: a /proc file's size reads 0; it used to be cached empty."""
    region = raw(tmp_path / "cache")
    with open("/proc/self/status", "rb") as value:
        region.set("status", value)
    cached = faultkit.read_raw(region.get("status"))
    assert cached.startswith(b"Name:") and b"Pid:" in cached


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_a_non_blocking_pipe_that_runs_dry_is_an_error_not_a_shorter_value(tmp_path, buffered):
    """Item 6: EAGAIN mid-stream used to end the copy as if at the end; now it raises,
    nothing is cached, and the key keeps its old value."""
    region = raw(tmp_path / "cache")
    region.set("key", io.BytesIO(b"old"))
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.write(write_end, b"the first half, and the writer is still writing")
    with (
        os.fdopen(read_end, "rb", buffering=-1 if buffered else 0) as value,
        pytest.raises(BlockingIOError),
    ):
        region.set("key", value)
    os.close(write_end)
    assert faultkit.read_raw(region.get("key")) == b"old"
    assert faultkit.temp_files(str(tmp_path / "cache")) == []


@pytest.mark.parametrize(
    "make",
    [
        lambda: tempfile.NamedTemporaryFile("w+"),  # noqa: SIM115 - closed below
        lambda: tempfile.SpooledTemporaryFile(mode="w+"),  # noqa: SIM115
    ],
    ids=["NamedTemporaryFile", "SpooledTemporaryFile"],
)
def test_a_temporary_file_in_text_mode_is_refused_with_a_clear_error(tmp_path, make):
    """Item 15: a text-mode temporary file is not a TextIOBase (it wraps one), so it
    passed the type check and failed deep in the copy with "memoryview: a bytes-like
    object is required"; now the TypeError says what the raw backend stores."""
    region = raw(tmp_path / "cache")
    region.set("key", io.BytesIO(b"old"))
    with make() as value:
        value.write("text")
        value.seek(0)
        with pytest.raises(TypeError, match="binary") as info:
            region.set("key", value)
    assert "the raw backend stores" in str(info.value)
    assert faultkit.read_raw(region.get("key")) == b"old"
    assert faultkit.temp_files(str(tmp_path / "cache")) == []


def test_writing_to_a_moved_file_after_set_is_detected_as_damage(tmp_path):
    """Item 6: with file_movable=True the cache owns the caller's file after set(); a
    write through the caller's handle that changes its length makes the entry a miss."""
    base_dir = tmp_path / "cache"
    region = raw(base_dir, file_movable=True)
    handle = tempfile.NamedTemporaryFile(dir=base_dir, delete=False)  # noqa: SIM115
    with handle:
        handle.write(b"original")
        handle.flush()
        handle.seek(0)
        region.set("key", handle)
        assert faultkit.read_raw(region.get("key")) == b"original"
        handle.seek(0, os.SEEK_END)
        handle.write(b" and more")
        handle.flush()
    assert region.get("key") is NO_VALUE
    assert_accounting_exact(region.backend)


# -- 7: one marker, never another kind's or a newer format's entries deleted ---------------


def test_a_raw_backend_never_takes_a_pickled_cache_whose_marker_was_deleted(tmp_path):
    """Item 7: after fsbackend.json is deleted, a raw backend used to be accepted and its
    first scan deleted every pickled entry.  Now it is refused, nothing is touched, and
    the pickled backend adopts its own entries again."""
    base_dir = str(tmp_path / "cache")
    region = pickled(base_dir)
    for i in range(20):
        region.set(f"k{i}", i)
    before = faultkit.snapshot(os.path.join(base_dir, layout.DATA_DIR))
    os.unlink(os.path.join(base_dir, layout.MARKER_NAME))
    with pytest.raises(ConfigError, match="holds entries of another kind"):
        raw(base_dir)
    with pytest.raises(ConfigError, match="laid out otherwise"):
        pickled(base_dir, shard_depth=3)
    assert faultkit.snapshot(os.path.join(base_dir, layout.DATA_DIR)) == before
    assert not os.path.exists(os.path.join(base_dir, layout.MARKER_NAME))
    again = pickled(base_dir)
    assert [again.get(f"k{i}") for i in range(20)] == list(range(20))
    assert marker.read(base_dir).kind == records.KIND_PICKLED


def test_a_newer_format_is_refused_and_never_deleted(tmp_path):
    """Item 7: the backend checks the marker's version (the CLI already did): an older
    release never deletes a newer one's entries as damaged."""
    base_dir = str(tmp_path / "cache")
    region = pickled(base_dir)
    region.set("key", "value")
    path = os.path.join(base_dir, layout.MARKER_NAME)
    with open(path) as handle:
        fields = __import__("json").load(handle)
    fields["version"] = marker.FORMAT_VERSION + 1
    with open(path, "w") as handle:
        __import__("json").dump(fields, handle)
    before = faultkit.snapshot(base_dir)
    with pytest.raises(ConfigError, match="newer dogpile_fsbackend"):
        pickled(base_dir)
    for command in ("stats", "prune", "verify", "clear"):
        done = cli(command, base_dir)
        assert done.returncode == 2 and "newer" in done.stderr, done
    assert faultkit.snapshot(base_dir) == before


# -- 8: what cannot be read is skipped, never deleted, never an exception ----------------


def _as_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def _make_cache_as_nobody(base_dir: str) -> None:
    _as_nobody()
    region = pickled(base_dir, cache_size=LIMIT)
    for i in range(20):
        region.set(f"n{i}", faultkit.make_value(f"n{i}", 0, i, ENTRY))


def _nobody_against_roots_files(base_dir: str, root_key: str, root_dir: str) -> dict:
    _as_nobody()
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("dogpile_fsbackend").addHandler(handler)
    region = pickled(base_dir, cache_size=LIMIT)
    root_entry = faultkit.entry_path(region.backend, root_key)
    outcome = {
        "root_key_is_a_miss": region.get(root_key) is NO_VALUE,
        "verify": region.backend.verify().unreadable,
        "kept_by_verify": os.path.exists(root_entry),
        "prune": region.backend.prune().scan.unreadable,
    }
    refused = []
    for i in range(300):  # eviction may take root's entry in LRU order, as any other
        key = f"k{i}"
        try:
            region.set(key, faultkit.make_value(key, 1, i, ENTRY))
        except PermissionError:  # a key whose shard directory root owns: not writable
            refused.append(os.path.dirname(faultkit.entry_path(region.backend, key)))
    return {
        **outcome,
        "refused_elsewhere": [d for d in refused if d != root_dir],
        "disk": faultkit.disk_usage(base_dir)[0],
        "warnings": [m for m in messages if "not readable" in m],
    }


@needs_root
def test_unreadable_directories_and_entries_are_skipped_never_fatal(tmp_path):
    """Item 8: root ran the app once and left a root-owned 0o700 shard directory and a
    root-owned entry in the app user's cache.  As the app user: no set raises because of
    eviction, the limit holds for the rest, prune and verify run and report what they
    could not read (one warning per path), and nothing unreadable is deleted."""
    pickled(tmp_path / "warm-up")  # load the entry points before dropping privileges
    top = tempfile.mkdtemp(prefix="dogpile-fsbackend-unreadable-")
    try:
        os.chown(top, NOBODY, NOBODY)
        base_dir = os.path.join(top, "cache")
        faultkit.in_child(_make_cache_as_nobody, base_dir)
        as_root = pickled(base_dir, cache_size=LIMIT)
        root_dir = root_key = None
        for i in range(1000):  # root writes into a shard directory nobody had made yet
            key = f"root{i}"
            directory = os.path.dirname(faultkit.entry_path(as_root.backend, key))
            exists = os.path.isdir(directory)
            if root_dir is None and not exists:
                as_root.set(key, "root's")
                root_dir = directory
            elif root_key is None and exists and os.stat(directory).st_uid == NOBODY:
                as_root.set(key, "root's too")
                root_key = key
            if root_dir and root_key:
                break
        root_entry = faultkit.entry_path(as_root.backend, root_key)
        assert os.stat(root_dir).st_mode & 0o777 == 0o700
        assert os.stat(root_entry).st_uid == 0
        outcome = faultkit.in_child(_nobody_against_roots_files, base_dir, root_key, root_dir)
        assert outcome["refused_elsewhere"] == []
        assert outcome["root_key_is_a_miss"]
        assert outcome["prune"] >= 1 and outcome["verify"] >= 2
        root_bytes = sum(  # what only root can read or remove
            os.path.getsize(os.path.join(root_dir, name)) for name in os.listdir(root_dir)
        )
        assert outcome["disk"] <= LIMIT + root_bytes + ENTRY + 200
        assert outcome["kept_by_verify"]  # never deleted as "damaged"
        assert os.listdir(root_dir)
        warned = outcome["warnings"]
        assert len(warned) == len(set(warned)) >= 2, warned  # once per path
    finally:
        shutil.rmtree(top, ignore_errors=True)


# -- 10: application writes never wait for maintenance ------------------------------------


def _pausing(ready, resume):
    """A progress callback that pauses the scan in the middle (Ctrl-Z, as an operator would)."""
    seen = []

    def pause(count: int) -> None:
        seen.append(count)
        if len(seen) == 3:
            ready.set()
            assert resume.wait(WAIT)  # the test stops this process here (SIGSTOP), then resumes

    return pause


def _prune_that_pauses(base_dir: str, ready, resume) -> None:
    backend = pickled(base_dir, cache_size=LIMIT).backend
    maintenance.prune(backend.store, progress=_pausing(ready, resume))


def _verify_that_pauses(base_dir: str, ready, resume) -> None:
    backend = pickled(base_dir, cache_size=LIMIT).backend
    maintenance.verify(backend.store, progress=_pausing(ready, resume))


def _clear_that_pauses(base_dir: str, ready, resume) -> None:
    backend = pickled(base_dir, cache_size=LIMIT).backend
    maintenance.clear(backend.store, progress=_pausing(ready, resume))


@pytest.mark.parametrize("holder", [_prune_that_pauses, _verify_that_pauses, _clear_that_pauses])
def test_a_paused_maintenance_process_never_blocks_writers(tmp_path, holder):
    """Item 10: a process stopped (SIGSTOP) while holding the eviction lock, or in the
    middle of a verify, used to block every set that crossed the limit.  Now there is no
    eviction lock, and a prune, verify or clear stopped between two shards holds no lock:
    300 sets, three times what fits, finish and the limit holds."""
    base_dir = str(tmp_path / "cache")
    region = pickled(base_dir, cache_size=LIMIT)
    region.set("seed", 1)
    ready, resume = SPAWN.Event(), SPAWN.Event()
    proc = SPAWN.Process(target=holder, args=(base_dir, ready, resume))
    proc.start()
    try:
        assert ready.wait(WAIT)
        os.kill(proc.pid, signal.SIGSTOP)

        def write_three_times_the_limit() -> int:
            for i in range(300):
                region.set(f"k{i}", faultkit.make_value(f"k{i}", 0, i, ENTRY))
            return faultkit.disk_usage(base_dir)[0]

        assert faultkit.run_bounded(write_three_times_the_limit) <= LIMIT
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        resume.set()
        proc.join(WAIT)
    assert proc.exitcode == 0  # and it finished its own work once resumed


def test_a_set_up_stopped_holding_its_lock_costs_a_bounded_wait_and_a_clear_error(
    tmp_path, monkeypatch
):
    """A process stopped (SIGSTOP) while it sets a directory up holds maintenance.lock:
    a process that finds no marker waits at most ``SETUP_WAIT``, then raises naming the
    lock file; one that finds a cache already set up never takes the lock."""
    ready, fresh = str(tmp_path / "ready"), str(tmp_path / "fresh")
    pickled(ready).set("k", "v")
    os.makedirs(fresh)
    for base_dir in (ready, fresh):
        lock_path = os.path.join(base_dir, layout.MAINTENANCE_LOCK_NAME)
        with faultkit.stopped_flock_holder(lock_path):
            monkeypatch.setattr(store, "SETUP_WAIT", 0.5)
            started = time.monotonic()
            if base_dir == ready:
                assert pickled(ready).get("k") == "v"
            else:
                with pytest.raises(BookkeepingError, match=lock_path):
                    pickled(fresh)
            assert time.monotonic() - started < WAIT  # bounded, not a hang
    region = pickled(fresh)  # the holder is gone: the set-up goes on
    region.set("k", "v")
    assert region.get("k") == "v"


# -- 11: a read-only filesystem --------------------------------------------------------------


def _on_a_read_only_cache(base_dir: str, entry: str) -> dict:
    region = pickled(base_dir)
    stamped = os.stat(entry).st_mtime_ns
    outcome = {"hit": region.get("key"), "stamped": os.stat(entry).st_mtime_ns != stamped}
    with pytest.raises(OSError) as info:
        region.set("key", "new")
    outcome["set"] = errno.errorcode.get(info.value.errno or 0)
    outcome["set error"] = type(info.value).__name__
    outcome["created"] = region.get_or_create("other", lambda: "computed")  # not stored
    logging_region = pickled(base_dir, write_errors="log")
    logging_region.set("key", "new")
    outcome["write_errors"] = logging_region.backend.stats()["write_errors"]
    # A value too large to cache is refused as any set is (the cache is read-only before
    # it is small: no CacheSizeWarning), following write_errors.
    for write_errors in ("raise", "log"):
        small = pickled(base_dir, cache_size=4096, write_errors=write_errors)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", CacheSizeWarning)
                small.set("key", "x" * 10_000)
            outcome[f"too large, {write_errors}"] = small.backend.stats()["write_errors"]
        except OSError as exc:
            outcome[f"too large, {write_errors}"] = errno.errorcode.get(exc.errno or 0)
    outcome["raw hit"] = faultkit.read_raw(raw(base_dir + "-raw").get("file"))
    outcome["stats"] = cli("stats", "--json", base_dir).returncode
    return outcome


@needs_root
def test_a_cache_on_a_read_only_filesystem_serves_hits(tmp_path):
    """Item 11: a cache on a read-only bind mount opens, serves hits without stamping
    them, raises ReadOnlyError (EROFS) for sets (or logs them with write_errors='log'),
    returns what get_or_create created, and CLI stats works."""
    source = tmp_path / "source"
    region = pickled(source / "cache")
    region.set("key", "value")
    raw(source / "cache-raw").set("file", io.BytesIO(b"raw bytes"))
    mount_point = str(tmp_path / "ro")
    os.mkdir(mount_point)
    with faultkit.mounted("--bind", str(source), target=mount_point):
        problem = faultkit.try_mount("-o", "remount,bind,ro", mount_point)
        if problem:
            pytest.skip(problem)
        base_dir = os.path.join(mount_point, "cache")
        entry = os.path.join(
            mount_point, os.path.relpath(faultkit.entry_path(region.backend, "key"), source)
        )
        outcome = faultkit.in_child(_on_a_read_only_cache, base_dir, entry)
    assert outcome == {
        "hit": "value",
        "stamped": False,
        "set": "EROFS",
        "set error": "ReadOnlyError",
        "created": "computed",
        "write_errors": 1,
        "too large, raise": "EROFS",
        "too large, log": 1,
        "raw hit": b"raw bytes",
        "stats": 0,
    }


def _open_read_only(base_dir: str) -> str:
    """What opening the cache says: its ConfigError's message, or "opened"."""
    try:
        pickled(base_dir)
    except ConfigError as exc:
        return str(exc)
    return "opened"


@needs_root
def test_a_read_only_cache_without_its_marker_names_the_file_and_the_way_out(tmp_path):
    """Item 15: a read-only cache whose fsbackend.json is gone (a tmp cleaner took it)
    cannot be adopted; the error used to show the accounting file's path as base_dir."""
    source = tmp_path / "source"
    pickled(source / "cache").set("key", "value")
    os.unlink(source / "cache" / layout.MARKER_NAME)
    mount_point = str(tmp_path / "ro")
    os.mkdir(mount_point)
    with faultkit.mounted("--bind", str(source), target=mount_point):
        problem = faultkit.try_mount("-o", "remount,bind,ro", mount_point)
        if problem:
            pytest.skip(problem)
        base_dir = os.path.join(mount_point, "cache")
        message = faultkit.in_child(_open_read_only, base_dir)
    assert f"got {base_dir!r}" in message, message
    assert os.path.join(base_dir, layout.MARKER_NAME) in message
    assert "read-write" in message


def _misses_of_an_unremovable_cache(base_dir: str, raw_dir: str) -> dict:
    region = pickled(base_dir, expiration_time=60)
    raw_region = raw(raw_dir)
    outcome = {}
    for key, get in (("expired", region.get), ("damaged", region.get), ("file", raw_region.get)):
        try:
            outcome[key] = get(key) is NO_VALUE
        except OSError as exc:
            outcome[key] = errno.errorcode.get(exc.errno or 0, str(exc))
    return outcome


def _give_to_nobody_but_these_entries(top: str, entries: list[str]) -> None:
    """Everything under ``top`` to nobody, except ``entries`` and the shard directories
    that hold them, which stay root's (readable by all, writable by root only)."""
    for directory, _, names in os.walk(top):
        for path in (directory, *(os.path.join(directory, name) for name in names)):
            os.chown(path, NOBODY, NOBODY)
    for entry in entries:
        level = entry
        while os.path.basename(level) != layout.DATA_DIR:
            os.chown(level, 0, 0)
            level = os.path.dirname(level)


@needs_root
@pytest.mark.parametrize("where", ["read-only mount", "another user's cache"])
def test_entries_a_reader_cannot_remove_are_misses_left_in_place(tmp_path, where):
    """Items 8, 11: an entry that a get removes on the way (expired, damaged, a raw
    record whose data file is gone) is a miss on a read-only mount, or for a user who
    may read the cache but not write it (a web server reading the app's files), and
    stays where it is; it used to raise EROFS or PermissionError out of get()."""
    with faultkit.nobody_dir("unremovable") as top:
        source = os.path.join(top, "source")
        modes = {"file_mode": 0o644, "dir_mode": 0o755}  # readable by every user
        region = pickled(os.path.join(source, "cache"), expiration_time=60, **modes)
        an_hour_ago = time.time() - 3600
        record = records.encode(records.KIND_PICKLED, b"expired", b"payload", an_hour_ago)
        region.backend.store.write_and_publish(layout.key_digest(b"expired"), record)
        region.set("damaged", "value")
        with open(faultkit.entry_path(region.backend, "damaged"), "r+b") as handle:
            handle.seek(records.HEADER_SIZE + 2)
            handle.write(b"XX")  # the stored key and the checksum no longer match
        raw_region = raw(os.path.join(source, "cache-raw"), **modes)
        raw_region.set("file", io.BytesIO(b"raw bytes"))
        for path in faultkit.data_paths(raw_region.backend, "file"):
            os.unlink(path)
        if where == "another user's cache":  # root ran the app once, in nobody's cache
            _give_to_nobody_but_these_entries(
                source,
                [faultkit.entry_path(region.backend, key) for key in ("expired", "damaged")]
                + [faultkit.entry_path(raw_region.backend, "file")],
            )
        before = faultkit.snapshot(source)
        if where == "another user's cache":
            outcome = faultkit.in_child_as_nobody(
                _misses_of_an_unremovable_cache,
                os.path.join(source, "cache"),
                os.path.join(source, "cache-raw"),
            )
        else:
            mount_point = os.path.join(top, "ro")
            os.mkdir(mount_point)
            with faultkit.mounted("--bind", source, target=mount_point):
                problem = faultkit.try_mount("-o", "remount,bind,ro", mount_point)
                if problem:
                    pytest.skip(problem)
                outcome = faultkit.in_child(
                    _misses_of_an_unremovable_cache,
                    os.path.join(mount_point, "cache"),
                    os.path.join(mount_point, "cache-raw"),
                )
        assert outcome == {"expired": True, "damaged": True, "file": True}
        assert faultkit.snapshot(source) == before


# -- 12: tmp cleaners ----------------------------------------------------------------------


def _user_of_the_cache(base_dir: str, touch_interval: float, progress, stop) -> None:
    files.TOUCH_INTERVAL = touch_interval  # hourly in production; shortened for the test
    # Times are refreshed only at an identity check (once a second in production): at the
    # cleaner's 1 s age the files would be judged idle for the moment before each check.
    files.CHECK_INTERVAL = touch_interval / 3
    region = pickled(base_dir)
    count = 0
    while not stop.is_set():
        region.set(f"k{count % 20}", count)
        region.get(f"k{count % 20}")
        count += 1
        progress.value = count


@needs_root
def test_systemd_tmpfiles_leaves_the_bookkeeping_files_of_a_busy_cache(tmp_path):
    """Item 12: locking never changes a file's times, so an age-based cleaner took the
    bookkeeping files of a busy cache.  Now they are refreshed (hourly; every 0.3 s
    here) and a real ``systemd-tmpfiles --clean`` with a 1 s age keeps them, while it
    removes an idle file beside them; the exclusion line of the docs' Caveats keeps everything."""
    if shutil.which("systemd-tmpfiles") is None:
        pytest.skip("systemd-tmpfiles is not installed")
    base_dir = str(tmp_path / "cache")
    pickled(base_dir).set("seed", 1)
    idle = os.path.join(base_dir, "idle-file")
    with open(idle, "w") as handle:
        handle.write("nobody touches this")
    progress, stop = SPAWN.Value("q", 0), SPAWN.Event()
    user = SPAWN.Process(target=_user_of_the_cache, args=(base_dir, 0.3, progress, stop))
    user.start()
    try:
        started = time.monotonic()
        wait_for(lambda: time.monotonic() - started > 2.5 and progress.value > 100, "use")
        config = tmp_path / "cleaner.conf"
        config.write_text(f"d {base_dir} - - - 1s\n")
        done = subprocess.run(
            ["systemd-tmpfiles", "--clean", str(config)], capture_output=True, timeout=WAIT
        )
        assert done.returncode == 0, done
        assert not os.path.exists(idle)  # the cleaner did run, and judged by age
        for name in (*BOOKKEEPING, layout.MAINTENANCE_LOCK_NAME):
            assert os.path.exists(os.path.join(base_dir, name)), name
        # With the exclusion line the docs' Caveats show, nothing at all is cleaned.
        with open(idle, "w") as handle:
            handle.write("idle again")
        time.sleep(1.5)  # the idle file must be older than the cleaner's 1 s age
        config.write_text(f"x {base_dir}\nd {tmp_path} - - - 1s\n")
        done = subprocess.run(
            ["systemd-tmpfiles", "--clean", str(config)], capture_output=True, timeout=WAIT
        )
        assert done.returncode == 0, done
        assert os.path.exists(idle)
    finally:
        stop.set()
        user.join(WAIT)
    assert user.exitcode == 0


def _mutex_user(base_dir, worker, warmed, deleted, barrier, calls, results):
    region = pickled(base_dir)
    region.set(f"warm{worker}", 0)
    warmed.release()
    assert deleted.wait(WAIT)
    started = time.monotonic()
    count = 0
    while time.monotonic() - started < 2.5 * files.CHECK_INTERVAL:  # keep using the cache
        region.set(f"warm{worker}", count)
        count += 1
    barrier.wait(WAIT)

    def creator():
        with calls.get_lock():
            calls.value += 1
        time.sleep(0.5)  # long enough that the other process must wait for the mutex
        return "created once"

    results.put(region.get_or_create("shared", creator))


def test_a_deleted_lock_file_is_replaced_and_every_process_moves_to_it(tmp_path):
    """Item 12: after ``lock`` was deleted, a process started afterwards made a new one
    while the running ones stayed on the old, and get_or_create ran its creator in two
    processes at once.  Now the running process notices within a second, both converge
    on the new lock file, and the creator runs once."""
    base_dir = str(tmp_path / "cache")
    pickled(base_dir).set("seed", 1)
    warmed, deleted = SPAWN.Semaphore(0), SPAWN.Event()
    barrier, calls, results = SPAWN.Barrier(2), SPAWN.Value("i", 0), SPAWN.Queue()
    procs = [
        SPAWN.Process(
            target=_mutex_user,
            args=(base_dir, w, warmed, deleted, barrier, calls, results),
        )
        for w in range(2)
    ]
    procs[0].start()  # on the old lock file
    assert warmed.acquire(timeout=WAIT)
    os.unlink(os.path.join(base_dir, layout.LOCK_NAME))
    deleted.set()
    procs[1].start()  # never saw the old one
    values = [results.get(timeout=WAIT) for _ in procs]
    for proc in procs:
        proc.join(WAIT)
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert values == ["created once", "created once"]
    assert calls.value == 1
    assert os.path.isfile(os.path.join(base_dir, layout.LOCK_NAME))


# -- 13: writer liveness across PID namespaces and clock jumps ----------------------------

_WRITER_IN_A_NAMESPACE = textwrap.dedent(
    """
    import os, sys
    from dogpile.cache import make_region
    region = make_region().configure(
        "dogpile_fsbackend.raw", arguments={"base_dir": sys.argv[1], "temp_max_age": 1}
    )
    print("pid", os.getpid(), flush=True)
    region.set("key", sys.stdin.buffer)  # a stream: copied as the test writes it
    print("stored", flush=True)
    """
)


@needs_root
def test_a_live_writer_in_another_pid_namespace_keeps_its_temp_file(tmp_path):
    """Item 13: a prune in another PID namespace judged a live writer dead by its pid and
    deleted its temp file; a clock jump past temp_max_age did the same.  Now the writer's
    lock decides: its temp file survives both, its set succeeds, and once it is gone its
    leftovers go at the next scan."""
    base_dir = str(tmp_path / "cache")
    region = raw(base_dir, temp_max_age=1)
    region.set("seed", io.BytesIO(b"seed"))
    writer = subprocess.Popen(
        ["unshare", "--pid", "--fork", sys.executable, "-c", _WRITER_IN_A_NAMESPACE, base_dir],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=False,
    )
    try:
        line = writer.stdout.readline().split()
        if not line:
            pytest.skip("unshare --pid is not permitted here")
        assert line[0] == b"pid" and int(line[1]) <= 2  # pid 1 or 2 of its own namespace
        first = faultkit.make_blob("key", 0, 0, 100_000)
        writer.stdin.write(first[:50_000])
        writer.stdin.flush()
        wait_for(lambda: faultkit.temp_files(base_dir), "the writer's temp file")
        (temp,) = faultkit.temp_files(base_dir)
        a_day_ago = time.time() - 86400  # a forward clock jump: the file looks a day old
        os.utime(temp, (a_day_ago, a_day_ago))
        result = region.backend.prune()
        assert result.scan.temp_files_removed == 0
        assert os.path.exists(temp)
        writer.stdin.write(first[50_000:])
        writer.stdin.close()
        assert writer.stdout.readline() == b"stored\n"
        assert writer.wait(WAIT) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(WAIT)
        writer.stdout.close()
    assert faultkit.read_raw(region.get("key")) == first
    # A dead writer's temp file (its lock released by the kernel) goes at once.
    dead = python(
        "-c",
        "import sys, os; from dogpile.cache import make_region; "
        "store = make_region().configure('dogpile_fsbackend.raw', "
        "arguments={'base_dir': sys.argv[1]}).backend.store; "
        "fd, path = store.open_temp('ab' * 32); os.write(fd, b'partial'); print(path)",
        base_dir,
        check=True,
    )
    leftover = dead.stdout.strip()
    assert os.path.exists(leftover)
    faultkit.age_temp_files(base_dir)  # past the short grace given to a free lock
    assert region.backend.prune().scan.temp_files_removed == 1
    assert not os.path.exists(leftover)


_PRUNE_IN_A_NEW_PROCESS = (
    "import sys; from dogpile.cache import make_region; "
    "print(make_region().configure('dogpile_fsbackend.raw', arguments={'base_dir': "
    "sys.argv[1]}).backend.prune().scan.temp_files_removed)"
)


def _temp_files_removed_by_a_new_process(base_dir: str) -> int:
    """A prune in a process started now (it judges writers by the lock file at the path)."""
    return int(python("-c", _PRUNE_IN_A_NEW_PROCESS, base_dir, check=True).stdout)


def test_a_write_begun_after_the_lock_file_was_deleted_is_judged_by_the_new_one(
    tmp_path, monkeypatch
):
    """Item 13: a process that took no lock since ``lock`` was deleted named its next temp
    file after the writer byte it holds on the old file only; a scan in a newer process
    found that byte free on the new file and took the live writer's temp file (once it
    was not written for 2 s: a slow stream).  Now a writer checks the lock file, when
    its once-a-second check is due, before it names a temp file."""
    monkeypatch.setattr(files, "CHECK_INTERVAL", 0.0)  # due at once (after a second idle)
    base_dir = str(tmp_path / "cache")
    region = raw(base_dir)
    region.set("warm", io.BytesIO(b"warm"))  # holds its writer byte on the old lock file
    os.unlink(os.path.join(base_dir, layout.LOCK_NAME))
    fd, temp = region.backend.store.open_temp(layout.key_digest(b"key"))  # a stream begins
    try:
        os.write(fd, b"the first part of a slow stream")
        faultkit.age_temp_files(base_dir)  # not written for a while, as a slow stream
        assert _temp_files_removed_by_a_new_process(base_dir) == 0
        assert os.path.exists(temp)
    finally:
        os.close(fd)


def test_a_write_begun_while_the_lock_file_is_being_moved_to_keeps_its_writer_byte(tmp_path):
    """Item 13: moving to a replaced lock file gave up the writer slot for a moment; a
    thread that began a write in that moment took another, and the move then unlocked
    the old slot on the new file, so a scan in another process took the temp files
    still being written under it.  The slot is now carried over without a gap."""
    base_dir = str(tmp_path / "cache")
    store = raw(base_dir).backend.store
    lock_file = store.lock_file
    fd, temp = store.open_temp(layout.key_digest(b"key"))  # a write in progress
    tokens = []

    class WriteDuringTheMove(logging.Handler):  # runs inside check_identity, after the swap
        def emit(self, record: logging.LogRecord) -> None:
            if "moved to the new one" in record.getMessage():
                tokens.append(lock_file.writer_token())

    handler = WriteDuringTheMove()
    logger = logging.getLogger("dogpile_fsbackend.locking")
    logger.addHandler(handler)
    try:
        os.unlink(os.path.join(base_dir, layout.LOCK_NAME))
        lock_file.check_identity()
        os.write(fd, b"still being written")
        faultkit.age_temp_files(base_dir)
        assert _temp_files_removed_by_a_new_process(base_dir) == 0
        assert os.path.exists(temp)
        assert tokens == [layout.temp_writer(os.path.basename(temp))]  # one slot, kept
    finally:
        logger.removeHandler(handler)
        os.close(fd)


# -- 14: clocks that were far ahead ---------------------------------------------------------


def test_times_in_the_future_are_taken_for_now(tmp_path):
    """Item 14: entries stamped under a clock a day ahead outlived newer ones in eviction
    and never expired; a future last_reconcile stopped the periodic recount."""
    base_dir = str(tmp_path / "cache")
    region = pickled(base_dir)
    keys = [f"k{i}" for i in range(6)]
    for key in keys:
        region.set(key, key)
    tomorrow = time.time() + 86400
    for key in keys[:2]:  # written while the clock was a day ahead
        os.utime(faultkit.entry_path(region.backend, key), (tomorrow, tomorrow))
    region.backend.prune()  # re-dates them to now
    for key in keys[:2]:
        assert os.stat(faultkit.entry_path(region.backend, key)).st_mtime < tomorrow - 3600
    newer = [f"new{i}" for i in range(3)]
    last = max(os.stat(faultkit.entry_path(region.backend, k)).st_mtime_ns for k in keys[:2])
    for key in newer:
        faultkit.wait_for_fs_clock(str(tmp_path / "probe"), last)  # file times tick coarsely
        region.set(key, key)
        last = os.stat(faultkit.entry_path(region.backend, key)).st_mtime_ns
    total = region.backend.stats()["bytes"]
    # Room for all but the k-entries: the four older ones, then the two re-dated ones, go.
    k_bytes = sum(os.path.getsize(faultkit.entry_path(region.backend, key)) for key in keys)
    small = pickled(base_dir, cache_size=total - k_bytes, eviction_low_water=1.0)
    small.backend.prune()
    survivors = [key for key in keys[:2] + newer if small.get(key) is not NO_VALUE]
    assert survivors == newer  # the future-dated entries went before the newer ones
    # An entry whose record says it was created tomorrow expires, counted from first sight.
    expiring = pickled(base_dir, expiration_time=1).backend
    record = records.encode(records.KIND_PICKLED, b"future", b"payload", tomorrow)
    expiring.store.write_and_publish(layout.key_digest(b"future"), record)
    path = faultkit.entry_path(expiring, "future")
    os.utime(path, (tomorrow, tomorrow))  # as the clock that was ahead stamped it
    assert expiring.get_serialized("future") == b"payload"
    deadline = time.monotonic() + WAIT
    while expiring.get_serialized("future") is not NO_VALUE:
        assert time.monotonic() < deadline, "an entry created in the future never expired"
        time.sleep(0.1)
    # A recount dated tomorrow is due now (it used to stop the periodic recount).
    region.backend.store.accounting.last_reconcile = tomorrow
    assert region.backend.store.reconcile_due()


def _date_record(backend, key: str, kind: int, when: float) -> None:
    """Rewrite ``key``'s record as if written at ``when`` by a clock that far off."""
    path = faultkit.entry_path(backend, key)
    with open(path, "rb") as handle:
        record = records.decode(handle.read(), kind, key.encode())
    with open(path, "wb") as handle:
        handle.write(records.encode(kind, key.encode(), record.payload, when, record.form))
    os.utime(path, (when, when))


def test_a_creation_time_in_the_future_is_handed_out_as_now(tmp_path):
    """Item 14: expiry took a record created under a clock far ahead for "now", but the
    stamp that get_serialized_stamped hands out (the tiered backend trusts a local copy
    by it, so a copy stored before a missed invalidation was trusted for a day) and a
    raw hit's last_modified still carried the future time."""
    tomorrow = time.time() + 86400
    region = pickled(tmp_path / "pickled")
    # As a tier above stores it: the bytes dogpile serialized (get_serialized_stamped
    # hands out only those).
    region.backend.set_serialized(
        "key", b'{"ct": %f, "v": 2}|' % time.time() + pickle.dumps("value")
    )
    _date_record(region.backend, "key", records.KIND_PICKLED, tomorrow)
    raw_region = raw(tmp_path / "raw")
    raw_region.set("key", io.BytesIO(b"raw bytes"))
    _date_record(raw_region.backend, "key", records.KIND_RAW, tomorrow)
    for _ in range(2):  # the first read, and one after it re-dated the file
        stamp = region.backend.get_serialized_stamped("key")[1]
        assert stamp <= time.time() + store.FUTURE_TOLERANCE
        with raw_region.get("key") as hit:
            assert hit.read() == b"raw bytes"
            assert hit.last_modified <= time.time() + store.FUTURE_TOLERANCE
    assert region.get("key") == "value"


# -- 15, 16, 17: errors that say what is wrong ------------------------------------------------


@pytest.mark.parametrize("key", [1, 2.5, None, b"bytes", ("a", "tuple")])
@pytest.mark.parametrize("kind", ["pickled", "raw"])
def test_keys_must_be_str(tmp_path, kind, key):
    """Item 15: a non-str key raised AttributeError from deep inside; now TypeError."""
    backend = (pickled if kind == "pickled" else raw)(tmp_path / "cache").backend
    getter = backend.get_serialized if kind == "pickled" else backend.get
    operations = [getter, backend.delete, backend.get_mutex]
    operations.append(
        (lambda k: backend.set_serialized(k, b"v"))
        if kind == "pickled"
        else (lambda k: backend.set(k, io.BytesIO(b"v")))
    )
    for operation in operations:
        with pytest.raises(TypeError, match="keys must be str"):
            operation(key)


def _open_as_nobody(base_dir: str) -> str:
    _as_nobody()
    return _open_read_only(base_dir)


@needs_root
def test_another_users_private_base_dir_says_who_owns_it(tmp_path):
    """Item 15: another user's 0o700 base_dir was reported as 'a directory this process
    may create'; now the error says it is not accessible, whose it is, what to do."""
    pickled(tmp_path / "warm-up")  # load the entry points before dropping privileges
    top = tempfile.mkdtemp(prefix="dogpile-fsbackend-private-")
    try:
        os.chmod(top, 0o755)
        base_dir = os.path.join(top, "cache")
        pickled(base_dir).set("root's", 1)  # root's cache, 0o700
        message = faultkit.in_child(_open_as_nobody, base_dir)
        assert "not accessible" in message and "uid 0" in message, message
        assert f"uid {NOBODY}" in message and "Run as its owner" in message
    finally:
        shutil.rmtree(top, ignore_errors=True)


class Renamed:
    """A class that a later release of the application renames."""

    def __init__(self, value):
        self.value = value


def test_a_value_that_cannot_be_unpickled_is_regenerated(tmp_path, monkeypatch):
    """Item 16: a pickled value whose class was renamed raised on every get_or_create
    until it expired; now dogpile sees CantDeserializeException and regenerates it."""
    region = pickled(tmp_path / "cache")
    region.set("key", Renamed(1))
    monkeypatch.delattr(sys.modules[__name__], "Renamed")  # the new release has no such class
    assert region.get("key") is NO_VALUE
    assert region.get_or_create("key", lambda: "regenerated") == "regenerated"
    assert region.get("key") == "regenerated"
    with open(faultkit.entry_path(region.backend, "key"), "rb") as handle:
        assert b"regenerated" in handle.read()  # the new value replaced the old on disk
    # A payload that is not a pickle at all is also a regeneration, not an exception.
    region.backend.set_serialized("other", b'{"ct": 1, "v": 1}|not a pickle')
    assert region.get_or_create("other", lambda: 5) == 5


def test_a_value_that_cannot_be_unpickled_counts_as_a_miss(tmp_path, monkeypatch):
    """stats() counts what a lookup returned: an entry whose value cannot be loaded any
    more is a miss (dogpile regenerates it), never a hit."""
    region = pickled(tmp_path / "cache")
    region.set("key", Renamed(1))
    region.backend.set_serialized("bytes", b'{"ct": 1, "v": 1}|not a pickle')
    monkeypatch.delattr(sys.modules[__name__], "Renamed")
    assert region.get("key") is NO_VALUE
    assert region.get("bytes") is NO_VALUE
    stats = region.backend.stats()
    assert (stats["hits"], stats["misses"]) == (0, 2)
    assert region.get_or_create("key", lambda: "regenerated") == "regenerated"
    stats = region.backend.stats()
    assert (stats["hits"], stats["misses"]) == (0, 3)  # one lookup, dogpile's re-check too
    assert region.get("key") == "regenerated"
    assert region.backend.stats()["hits"] == 1


def test_a_foreign_directory_in_data_is_reported_once_never_counted_as_removed(tmp_path, caplog):
    """Item 17: a foreign directory inside data/ was counted as removed on every scan."""
    region = pickled(tmp_path / "cache")
    region.set("key", 1)
    shard = os.path.dirname(faultkit.entry_path(region.backend, "key"))
    foreign = os.path.join(shard, "not-ours")
    os.mkdir(foreign)
    with caplog.at_level(logging.WARNING, logger="dogpile_fsbackend"):
        reports = [region.backend.prune().scan, region.backend.verify()]
    for report in reports:
        assert (report.damaged_removed, report.foreign_kept) == (0, 1)
    assert os.path.isdir(foreign)
    assert [r.getMessage() for r in caplog.records].count(
        f"{foreign}: a directory that is not the cache's; left alone"
    ) == 1
    assert region.get("key") == 1


def test_a_process_of_another_layout_never_fights_over_the_accounting_file(tmp_path):
    """Item 1: deleting fsbackend.json and starting a process with another shard_depth
    used to re-size the accounting file under the running processes.  Now the newcomer is
    refused with an error naming the file, and the running process goes on untouched."""
    base_dir = str(tmp_path / "cache")
    running = pickled(base_dir)
    running.set("key", "value")
    os.unlink(os.path.join(base_dir, layout.MARKER_NAME))
    shutil.rmtree(os.path.join(base_dir, layout.DATA_DIR))  # an empty cache: nothing to adopt
    accounting_path = os.path.join(base_dir, layout.ACCOUNTING_NAME)
    before = os.stat(accounting_path)
    with pytest.raises(BookkeepingError, match="another layout") as info:
        pickled(base_dir, shard_depth=1)
    assert accounting_path in str(info.value)
    after = os.stat(accounting_path)
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    assert not os.path.exists(os.path.join(base_dir, layout.MARKER_NAME))
    running.set("key", "again")
    assert running.get("key") == "again"


def test_a_count_in_flight_while_another_thread_moves_to_a_new_accounting_file_hits_no_other(
    tmp_path, monkeypatch
):
    """A thread's counter write has the accounting descriptor in hand inside ``os.pwrite``
    (the GIL released, the system call not yet made) when another thread finds the file
    replaced and moves to the new one, then opens a file of its own (an entry's temp
    file, say).  Had the old descriptor been closed at once, that open would get its
    number and the 16 counter bytes would land in it: a raw value is only length-checked."""
    backend = pickled(tmp_path).backend
    accounting = backend.store.accounting
    victim = tmp_path / "victim"
    victim.write_bytes(b"V" * 8192)
    pwrite, opened = os.pwrite, []

    def another_thread():
        temp = tmp_path / "accounting.new"
        temp.write_bytes(accounting._header.ljust(accounting._size, b"\0"))
        os.replace(temp, accounting.path)  # replaced by hand, or repaired by another process
        accounting._watch.next_check = 0
        backend.stats()  # notices: moves to the new file
        opened.append(os.open(victim, os.O_RDWR | os.O_CLOEXEC))

    def the_file_moves_meanwhile(fd, data, offset):
        if fd == held and not opened:
            thread = threading.Thread(target=another_thread)
            thread.start()
            thread.join(WAIT)
        return pwrite(fd, data, offset)

    held = accounting._fd
    monkeypatch.setattr(os, "pwrite", the_file_moves_meanwhile)
    backend.set_serialized("k", b"x" * 100)
    monkeypatch.setattr(os, "pwrite", pwrite)
    os.close(opened[0])
    assert victim.read_bytes() == b"V" * 8192
    assert accounting._fd != held
