"""Damaged entries, disk faults and bad input: a miss or a clear error, never a wrong value.

* Integrity: every single-bit flip of an entry, truncation, garbage, a file of
  another key or kind, a crafted header -- each is a miss, and the file is
  removed (on the read that finds it, or by ``verify()``).
* Disk faults, for real where the machine allows it (a full or inode-starved
  tmpfs, a read-only bind mount, a directory the process may not write as an
  unprivileged user, the descriptor limit, RLIMIT_FSIZE), and by injecting
  the errno at one os call at a time otherwise: the error reaches the caller
  as ``OSError`` with that errno, no temp file or partial entry is left, the
  key keeps its old value, and the accounting still equals the files.
* Bad input: unpicklable values, non-files, closed, write-only, exhausted,
  empty and oversized files, and keys that are huge, empty or full of path
  syntax, NULs and lone surrogates.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import io
import logging
import os
import pickle
import resource
import signal
import stat
import tempfile
import threading
from unittest import mock

import faultkit
import pytest
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE, CachedValue
from faultkit import pickled, raw

from dogpile_fsbackend import CacheSizeWarning, SharedInvalidation, beneath, layout, records

NOBODY = faultkit.NOBODY


def assert_consistent(region, base_dir) -> None:
    """No temp or foreign file, and the accounting equals the files (no repair needed)."""
    base_dir = str(base_dir)
    assert faultkit.temp_files(base_dir) == []
    assert faultkit.foreign_files(base_dir) == []
    stats = region.backend.stats()
    assert (stats["bytes"], stats["entries"]) == faultkit.disk_usage(base_dir)


def assert_verified_clean(region, base_dir) -> None:
    report = region.backend.verify()
    assert report.accounting_drift == 0, report
    assert (report.temp_files_removed, report.orphans_removed, report.damaged_removed) == (
        0,
        0,
        0,
    )
    assert_consistent(region, base_dir)


def raw_blob(region, key):
    value = region.get(key)
    return NO_VALUE if value is NO_VALUE else faultkit.read_raw(value)


# -- integrity ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pickled", "raw"])
def test_every_single_bit_flip_of_an_entry_is_a_miss_and_removes_it(tmp_path, kind):
    """All 8 bits of every byte of a record: header, key, payload and checksum."""
    region = (pickled if kind == "pickled" else raw)(tmp_path / "cache")
    if kind == "pickled":
        original = faultkit.make_value("victim", 0, 0, 40)
        region.set("victim", original)
        region.set("bystander", faultkit.make_value("bystander", 0, 0, 40))
    else:
        original = faultkit.make_blob("victim", 0, 0, 40)
        region.set("victim", io.BytesIO(original))
        region.set("bystander", io.BytesIO(faultkit.make_blob("bystander", 0, 0, 40)))
    path = faultkit.entry_path(region.backend, "victim")
    with open(path, "rb") as handle:
        good = handle.read()
    data = faultkit.data_paths(region.backend, "victim")
    undetected = []
    for offset in range(len(good)):
        for bit in range(8):
            damaged = bytearray(good)
            damaged[offset] ^= 1 << bit
            with open(path, "wb") as handle:
                handle.write(damaged)
            for data_path in data:  # a removed raw entry takes its data file along
                if not os.path.exists(data_path):
                    with open(data_path, "wb") as handle:
                        handle.write(original)
            found = region.get("victim") if kind == "pickled" else raw_blob(region, "victim")
            if found is NO_VALUE:
                assert not os.path.exists(path), (offset, bit)
                assert not any(os.path.exists(p) for p in data), (offset, bit)
            else:
                # Only a field that carries no meaning for the value may go unnoticed,
                # and then the value must be exactly the one written.
                assert found == original, (offset, bit)
                undetected.append(offset)
    # reserved u16 and creation time (offsets 6..15) are the only candidates
    assert set(undetected) <= set(range(6, 16)), sorted(set(undetected))
    bystander = region.get("bystander")
    if kind == "pickled":
        assert faultkit.check_value("bystander", bystander) is None
    else:
        assert faultkit.check_raw_hit("bystander", bystander) is None


def _other_kind_record(key: bytes, kind: str) -> bytes:
    other = records.KIND_RAW if kind == "pickled" else records.KIND_PICKLED
    return records.encode(other, key, b"payload", 1.7e9)


DAMAGES = {
    "empty": lambda good, other, key, kind: b"",
    "shorter-than-header": lambda good, other, key, kind: good[:10],
    "header-only": lambda good, other, key, kind: good[: records.HEADER_SIZE],
    "cut-in-key": lambda good, other, key, kind: good[: records.HEADER_SIZE + 2],
    "last-byte-cut": lambda good, other, key, kind: good[:-1],
    "appended": lambda good, other, key, kind: good + b"junk",
    "header-garbage": lambda good, other, key, kind: (
        os.urandom(records.HEADER_SIZE) + good[records.HEADER_SIZE :]
    ),
    "all-garbage": lambda good, other, key, kind: os.urandom(len(good)),
    "other-key": lambda good, other, key, kind: other,
    "other-kind": lambda good, other, key, kind: _other_kind_record(key, kind),
    "crafted-nan-time": lambda good, other, key, kind: records.encode(
        records.KIND_PICKLED if kind == "pickled" else records.KIND_RAW,
        key,
        records.decode(good, 1 if kind == "pickled" else 2, key).payload,
        float("nan"),
    ),
    "crafted-raw-metadata": lambda good, other, key, kind: records.encode(
        records.KIND_PICKLED if kind == "pickled" else records.KIND_RAW,
        key,
        b'{"token": 5, "size": "x"}',
        1.7e9,
    ),
}


@pytest.mark.parametrize(
    ("kind", "damage"),
    [
        (kind, damage)
        for damage in sorted(DAMAGES)
        for kind in ("pickled", "raw")
        # A pickled payload is opaque bytes for the serializer: only raw metadata is parsed.
        if (kind, damage) != ("pickled", "crafted-raw-metadata")
    ],
)
def test_damaged_entry_is_a_miss_and_removed(tmp_path, kind, damage):
    base_dir = tmp_path / "cache"
    region = (pickled if kind == "pickled" else raw)(base_dir)
    for key in ("victim", "other", "bystander"):
        if kind == "pickled":
            region.set(key, faultkit.make_value(key, 0, 0, 100))
        else:
            region.set(key, io.BytesIO(faultkit.make_blob(key, 0, 0, 100)))
    path = faultkit.entry_path(region.backend, "victim")
    with open(path, "rb") as handle:
        good = handle.read()
    with open(faultkit.entry_path(region.backend, "other"), "rb") as handle:
        other = handle.read()
    with open(path, "wb") as handle:
        handle.write(DAMAGES[damage](good, other, b"victim", kind))
    assert region.get("victim") is NO_VALUE
    assert not os.path.exists(path)
    assert faultkit.data_paths(region.backend, "victim") == []
    for key in ("other", "bystander"):
        found = region.get(key)
        if kind == "pickled":
            assert faultkit.check_value(key, found) is None
        else:
            assert faultkit.check_raw_hit(key, found) is None
    region.backend.verify()  # the damaged file's size was still counted: recount
    assert_consistent(region, base_dir)


@contextlib.contextmanager
def short_reads_under(directory: str, most: int = 7):
    """Reads of files under ``directory`` return at most ``most`` bytes per call, as a FUSE
    or network filesystem may (POSIX allows any read to return less than asked)."""
    real_read, real_pread, prefix = os.read, os.pread, os.path.realpath(directory) + os.sep

    def allowed(fd: int, count: int) -> int:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(prefix):
                return min(count, most)
        return count

    def read(fd: int, count: int) -> bytes:
        return real_read(fd, allowed(fd, count))

    def pread(fd: int, count: int, offset: int) -> bytes:
        return real_pread(fd, allowed(fd, count), offset)

    with mock.patch.object(os, "read", read), mock.patch.object(os, "pread", pread):
        yield


def _stored(kind: str, key: str, size: int):
    if kind == "pickled":
        return faultkit.make_value(key, 0, 0, size)
    return io.BytesIO(faultkit.make_blob(key, 0, 0, size))


def _found_as_stored(kind: str, key: str, found) -> bool:
    if kind == "pickled":
        return faultkit.check_value(key, found) is None
    return faultkit.check_raw_hit(key, found) is None


@pytest.mark.parametrize("size", [100, 50_000, 300_000])
@pytest.mark.parametrize("kind", ["pickled", "raw"])
def test_short_reads_are_not_damage(tmp_path, kind, size):
    """A filesystem that returns a few bytes per read: every entry is still a hit and
    stays on disk, a truncated one is still damage (a miss, removed), and no bookkeeping
    file is taken for damaged: the counters stay exact, the invalidation file is read."""
    base_dir = str(tmp_path / "cache")

    def region_on():
        return make_region().configure(
            f"dogpile_fsbackend.{kind}",
            arguments={"base_dir": base_dir},
            region_invalidator=SharedInvalidation(base_dir),
        )

    region = region_on()
    for key in ("whole", "truncated"):
        region.set(key, _stored(kind, key, size))
    truncated = faultkit.entry_path(region.backend, "truncated")
    os.truncate(truncated, os.path.getsize(truncated) - 1)
    region.invalidate(hard=False)
    region.set("after", _stored(kind, "after", size))
    accounting_inode = os.stat(os.path.join(base_dir, layout.ACCOUNTING_NAME)).st_ino
    with short_reads_under(base_dir):
        fresh = region_on()
        invalidator = fresh.region_invalidator
        assert invalidator.was_soft_invalidated() and not invalidator.was_hard_invalidated()
        assert fresh.get("whole") is NO_VALUE  # invalidated, as it should be
        assert _found_as_stored(kind, "after", fresh.get("after"))
        assert fresh.get("truncated") is NO_VALUE
        fresh.set("again", _stored(kind, "again", size))
        assert _found_as_stored(kind, "again", fresh.get("again"))
        assert sorted(fresh.backend.keys()) == ["after", "again", "whole"]
        fresh.backend.verify()
        assert_consistent(fresh, base_dir)
    assert os.stat(os.path.join(base_dir, layout.ACCOUNTING_NAME)).st_ino == accounting_inode
    assert os.path.exists(faultkit.entry_path(region.backend, "whole"))
    assert not os.path.exists(truncated)


@pytest.mark.parametrize("damage", ["truncated", "extended", "emptied", "missing", "fifo"])
def test_raw_data_file_of_the_wrong_length_is_a_miss_and_removed(tmp_path, damage):
    """Raw bytes are not checksummed (they may be gigabytes): their length is checked."""
    base_dir = tmp_path / "cache"
    region = raw(base_dir)
    region.set("victim", io.BytesIO(faultkit.make_blob("victim", 0, 0, 5000)))
    region.set("bystander", io.BytesIO(faultkit.make_blob("bystander", 0, 0, 5000)))
    (data_path,) = faultkit.data_paths(region.backend, "victim")
    if damage == "truncated":
        os.truncate(data_path, 100)
    elif damage == "extended":
        with open(data_path, "ab") as handle:
            handle.write(b"x")
    elif damage == "emptied":
        os.truncate(data_path, 0)
    elif damage == "missing":
        os.unlink(data_path)
    else:
        os.unlink(data_path)
        os.mkfifo(data_path)
    assert faultkit.run_bounded(region.get, "victim") is NO_VALUE
    assert not os.path.exists(faultkit.entry_path(region.backend, "victim"))
    assert not os.path.exists(data_path)
    assert faultkit.check_raw_hit("bystander", region.get("bystander")) is None
    region.backend.verify()
    assert_consistent(region, base_dir)


@pytest.mark.parametrize("kind", ["pickled", "raw"])
def test_verify_finds_and_removes_damaged_entries_without_reading_them(tmp_path, kind):
    base_dir = tmp_path / "cache"
    region = (pickled if kind == "pickled" else raw)(base_dir)
    keys = [f"key-{i}" for i in range(12)]
    for key in keys:
        if kind == "pickled":
            region.set(key, faultkit.make_value(key, 0, 0, 300))
        else:
            region.set(key, io.BytesIO(faultkit.make_blob(key, 0, 0, 300)))
    damaged = keys[:6]
    for number, key in enumerate(damaged):
        path = faultkit.entry_path(region.backend, key)
        with open(path, "r+b") as handle:
            content = handle.read()
            handle.seek(0)
            if number % 3 == 0:
                handle.truncate(len(content) // 2)
            else:
                handle.seek(len(content) - 1 - number)
                handle.write(bytes([content[len(content) - 1 - number] ^ 0x10]))
    report = region.backend.verify()
    assert report.damaged_removed == len(damaged), report
    for key in keys:
        found = region.get(key)
        if key in damaged:
            assert found is NO_VALUE
        elif kind == "pickled":
            assert faultkit.check_value(key, found) is None
        else:
            assert faultkit.check_raw_hit(key, found) is None
    assert_consistent(region, base_dir)


# -- disk faults: injected errno, one os call at a time --------------------------------

ERRNOS = [errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EMFILE, errno.EIO]


def _is_temp(path) -> bool:
    return f"/{layout.TEMP_PREFIX}" in os.fsdecode(path)


def _fd_is_temp(fd: int) -> bool:
    try:
        return _is_temp(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return False


@contextlib.contextmanager
def inject(call: str, error: int, when, after: int = 0):
    """Make ``os.<call>`` fail with ``error`` when ``when(*args)`` holds.

    The first ``after`` matching calls go through; for ``write`` the first
    failing call still writes half its data (a disk filling up mid-file), and
    the next one raises.  ``open`` covers the store's openat2 creates
    (``beneath.Creator.open``) too.  Only the errno is injected; all else is real.
    """
    real = getattr(os, call)
    seen = 0
    half_written = False

    def failing(real_call, *args, **kwargs):
        nonlocal seen, half_written
        if not when(*args):
            return real_call(*args, **kwargs)
        seen += 1
        if seen <= after:
            return real_call(*args, **kwargs)
        if call == "write" and not half_written and len(args[1]) > 1:
            half_written = True
            return real_call(args[0], memoryview(args[1])[: len(args[1]) // 2])
        raise OSError(error, os.strerror(error))

    with contextlib.ExitStack() as patches:
        patches.enter_context(
            mock.patch(f"dogpile_fsbackend.store.os.{call}", functools.partial(failing, real))
        )
        if call == "open":
            real_create = beneath.Creator.open

            def create(creator, path):
                return failing(functools.partial(real_create, creator), path)

            patches.enter_context(mock.patch.object(beneath.Creator, "open", create))
        yield


def assert_old_or_evicted(found, old, error) -> None:
    """The key kept its old value; after ENOSPC/EDQUOT it may instead have been evicted
    to make room for the retry (a miss), never anything else."""
    if error in (errno.ENOSPC, errno.EDQUOT) and found in (NO_VALUE, None):
        return
    assert found == old


PICKLED_POINTS = {
    "open-temp": ("open", lambda path, *a: _is_temp(path), 0),
    "write-half-then-fail": ("write", lambda fd, data: _fd_is_temp(fd), 0),
    "fsync": ("fsync", lambda fd: _fd_is_temp(fd), 0),
    "rename-into-place": ("replace", lambda src, dst: _is_temp(src), 0),
}
RAW_POINTS = {
    "open-data-temp": ("open", lambda path, *a: _is_temp(path), 0),
    "kernel-copy": ("copy_file_range", lambda *args: True, 0),
    "open-record-temp": ("open", lambda path, *a: _is_temp(path), 1),
    "write-record": ("write", lambda fd, data: _fd_is_temp(fd), 0),
    "fsync-data": ("fsync", lambda fd: _fd_is_temp(fd), 0),
    "rename-data-into-place": ("replace", lambda src, dst: _is_temp(src), 0),
    "rename-record-after-data": ("replace", lambda src, dst: _is_temp(src), 1),
}


@pytest.mark.parametrize("error", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("point", sorted(PICKLED_POINTS))
def test_pickled_write_fault_raises_and_keeps_the_old_value(tmp_path, point, error):
    base_dir = tmp_path / "cache"
    region = pickled(base_dir, fsync=True)
    old = faultkit.make_value("key", 0, 0, 3000)
    region.set("key", old)
    region.set("bystander", faultkit.make_value("bystander", 0, 0, 30))
    call, when, after = PICKLED_POINTS[point]
    with inject(call, error, when, after), pytest.raises(OSError) as info:
        region.set("key", faultkit.make_value("key", 1, 0, 3000))
    assert info.value.errno == error
    assert_old_or_evicted(region.get("key"), old, error)
    assert_consistent(region, base_dir)
    # The same write succeeds once the fault is gone.
    region.set("key", faultkit.make_value("key", 1, 0, 3000))
    assert region.get("key")["writer"] == 1
    assert_verified_clean(region, base_dir)


@pytest.mark.parametrize("error", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("point", sorted(RAW_POINTS))
def test_raw_write_fault_raises_and_keeps_the_old_value(tmp_path, point, error):
    base_dir = tmp_path / "cache"
    region = raw(base_dir, fsync=True)
    old = faultkit.make_blob("key", 0, 0, 3000)
    region.set("key", io.BytesIO(old))
    source = tmp_path / "source"
    source.write_bytes(faultkit.make_blob("key", 1, 0, 3000))
    call, when, after = RAW_POINTS[point]
    with open(source, "rb") as value:
        with inject(call, error, when, after), pytest.raises(OSError) as info:
            region.set("key", value)
        assert info.value.errno == error
        assert_old_or_evicted(raw_blob(region, "key"), old, error)
        assert_consistent(region, base_dir)
        region.set("key", value)  # works once the fault is gone
    assert raw_blob(region, "key") == source.read_bytes()
    assert_verified_clean(region, base_dir)


# A move writes one temp file, the record, and renames the caller's file in (no temp name)
# just before the record: (call, when, after); the second fails once the file was taken.
MOVE_POINTS = {
    "open-record-temp": ("open", lambda path, *a: _is_temp(path), 0),
    "rename-record-after-data": ("replace", lambda src, dst: _is_temp(src), 0),
}


@pytest.mark.parametrize("autodelete", [False, True], ids=["named-file", "self-deleting-temp"])
@pytest.mark.parametrize("point", sorted(MOVE_POINTS))
def test_raw_move_write_fault_raises_and_the_callers_handle_still_reads(
    tmp_path, point, autodelete
):
    """file_movable: a fault before the caller's file is moved in, or just after.

    Documented behaviour: the error reaches the caller, nothing is left in the
    cache, the old value stays -- and the caller's file is where it was, with its
    own mode and mtime (one already renamed in gets its name back), and its open
    handle still reads it whole.
    """
    base_dir = tmp_path / "cache"
    region = raw(base_dir, file_movable=True)
    old = faultkit.make_blob("key", 0, 0, 3000)
    region.set("key", io.BytesIO(old))
    new = faultkit.make_blob("key", 1, 0, 3000)
    call, when, after = MOVE_POINTS[point]
    with tempfile.NamedTemporaryFile(dir=tmp_path, delete=autodelete) as value:
        value.write(new)
        value.flush()
        value.seek(0)
        os.chmod(value.name, 0o644)  # the caller's own mode and time, not the cache's
        os.utime(value.name, (1_500_000_000, 1_500_000_000))
        with inject(call, errno.ENOSPC, when, after), pytest.raises(OSError) as info:
            region.set("key", value)
        assert info.value.errno == errno.ENOSPC
        assert_old_or_evicted(raw_blob(region, "key"), old, errno.ENOSPC)
        assert_consistent(region, base_dir)
        left = os.stat(value.name)  # not stored: the caller's, as it was
        assert (left.st_ino, left.st_nlink) == (os.fstat(value.fileno()).st_ino, 1)
        assert (left.st_mode & 0o777, left.st_mtime) == (0o644, 1_500_000_000)
        value.seek(0)
        assert value.read() == new


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_fault_creating_a_shard_directory_raises_and_leaves_nothing(tmp_path, error):
    base_dir = tmp_path / "cache"
    region = pickled(base_dir)
    region.set("first", 1)
    key = next(
        f"k{i}"
        for i in range(10_000)
        if not os.path.isdir(os.path.dirname(faultkit.entry_path(region.backend, f"k{i}")))
    )
    with inject("mkdir", error, lambda path, *a: True), pytest.raises(OSError) as info:
        region.set(key, 2)
    assert info.value.errno == error
    assert region.get(key) is NO_VALUE
    assert_consistent(region, base_dir)
    region.set(key, 2)
    assert region.get(key) == 2


def test_write_fault_inside_get_or_create_reaches_the_caller_and_releases_the_lock(tmp_path):
    """dogpile does not swallow a failed set: get_or_create raises, and nothing is cached."""
    base_dir = tmp_path / "cache"
    region = pickled(base_dir)
    when = PICKLED_POINTS["open-temp"][1]
    with inject("open", errno.ENOSPC, when), pytest.raises(OSError) as info:
        region.get_or_create("key", lambda: faultkit.make_value("key", 0, 0, 10))
    assert info.value.errno == errno.ENOSPC
    assert region.get("key") is NO_VALUE
    mutex = region.backend.get_mutex("key")
    assert mutex.acquire(wait=False)  # released by dogpile on the way out
    mutex.release()
    assert region.get_or_create("key", lambda: 7) == 7
    assert_consistent(region, base_dir)


# -- disk faults: real ones -------------------------------------------------------------


def _write_new_key(region, kind: str, key: str, staging: str, size: int) -> None:
    if kind == "pickled":
        region.set(key, faultkit.make_value(key, 0, 0, size))
    elif kind == "raw-bytesio":
        region.set(key, io.BytesIO(faultkit.make_blob(key, 0, 0, size)))
    else:
        path = os.path.join(staging, "source")
        with open(path, "wb") as handle:
            handle.write(faultkit.make_blob(key, 0, 0, size))
        with open(path, "rb") as handle:
            region.set(key, handle)


def _check_hit(region, kind: str, key: str):
    value = region.get(key)
    if kind == "pickled":
        return faultkit.check_value(key, value)
    return faultkit.check_raw_hit(key, value)


def _disk_full_child(
    kind: str, base_dir: str, staging: str, size: int, disk: int, inodes: bool
) -> dict:
    """A cache_size far above the disk: the disk fills long before the limit."""
    make = pickled if kind == "pickled" else raw
    layout = {"shard_depth": 1} if inodes else {}  # 16 directories: room for entries
    region = make(base_dir, cache_size=10**12, **layout)
    keys = [f"k{i}" for i in range(3 * disk // size)]  # three disks' worth of new keys
    refused = 0
    for key in keys:  # every set succeeds: ENOSPC evicts a batch and retries once
        try:
            _write_new_key(region, kind, key, staging, size)
        except OSError as exc:
            # Out of inodes, a new shard directory may need more than one batch frees.
            assert inodes and exc.errno == errno.ENOSPC, exc
            refused += 1
            continue
        assert _check_hit(region, kind, key) is None, key
    assert refused <= len(keys) // 4, (refused, len(keys))
    evictions = region.backend.stats()["evictions"]
    assert evictions > 0
    for key in keys:  # whatever survived is intact
        value = region.get(key)
        if value is not NO_VALUE:
            assert _check_hit(region, kind, key) is None
    # get_or_create of a new key works on the full disk, and its value is cached
    if kind == "pickled":
        creator = lambda: faultkit.make_value("new", 0, 0, size)  # noqa: E731
    else:
        creator = lambda: io.BytesIO(faultkit.make_blob("new", 0, 0, size))  # noqa: E731
    created = region.get_or_create("new", creator)
    if kind != "pickled":
        created.close()
    assert _check_hit(region, kind, "new") is None
    assert_consistent(region, base_dir)
    if inodes:
        assert_verified_clean(region, base_dir)
        return {"evictions": evictions}
    # A value the whole disk cannot hold: "raise" raises ENOSPC, nothing is cached
    huge = 2 * disk
    with pytest.raises(OSError) as info:
        _write_new_key(region, kind, "huge", staging, huge)
    assert info.value.errno == errno.ENOSPC
    assert region.get("huge") is NO_VALUE
    assert_consistent(region, base_dir)
    # ... and write_errors="log" logs and counts it, and the caller gets its value
    logging_region = make(base_dir, cache_size=10**12, write_errors="log", **layout)
    if kind == "pickled":
        value = logging_region.get_or_create("huge", lambda: faultkit.make_value("h", 0, 0, huge))
        assert faultkit.check_value("h", value) is None
    else:
        _write_new_key(logging_region, kind, "huge", staging, huge)
    assert logging_region.get("huge") is NO_VALUE
    assert logging_region.backend.stats()["write_errors"] == 1
    assert_consistent(region, base_dir)
    assert_verified_clean(region, base_dir)
    return {"evictions": evictions}


@pytest.mark.parametrize(
    ("kind", "options", "size"),
    [
        ("pickled", "size=1m", 6000),
        ("pickled", "size=4m,nr_inodes=48", 100),  # out of inodes: directories and files
        ("raw-file", "size=1m", 6000),
        ("raw-bytesio", "size=1m", 6000),
    ],
)
def test_a_full_disk_heals_by_evicting_on_a_real_tmpfs(tmp_path, kind, options, size):
    """Item 9: ENOSPC on a write evicts a batch and retries once, so a full disk never
    stops the cache; what cannot fit at all follows write_errors."""
    mount_point = str(tmp_path / "mnt")
    os.mkdir(mount_point)
    staging = str(tmp_path / "staging")  # the caller's files live elsewhere
    os.mkdir(staging)
    inodes = "nr_inodes" in options
    disk = 48 * size if inodes else 1024 * 1024
    with faultkit.mounted("-t", "tmpfs", "-o", options, "tmpfs", target=mount_point):
        # A child does the work, so that no descriptor keeps the mount busy afterwards.
        result = faultkit.in_child(
            _disk_full_child,
            kind,
            os.path.join(mount_point, "cache"),
            staging,
            size,
            disk,
            inodes,
        )
    assert result["evictions"] > 0


def _file_size_limit_child(base_dir: str, staging: str) -> dict:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
    limit = 64 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    outcomes = {}
    for kind in ("pickled", "raw-file", "raw-bytesio"):
        region = (pickled if kind == "pickled" else raw)(os.path.join(base_dir, kind))
        small, big = (
            faultkit.make_blob("key", 0, 0, 1000),
            faultkit.make_blob("key", 1, 0, 2 * limit),
        )
        if kind == "pickled":
            region.set("key", small)
            with pytest.raises(OSError) as info:
                region.set("key", big)
            assert region.get("key") == small
        else:
            region.set("key", io.BytesIO(small))
            if kind == "raw-bytesio":
                value = io.BytesIO(big)
            else:
                path = os.path.join(staging, "big")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                resource.setrlimit(resource.RLIMIT_FSIZE, (4 * limit, resource.RLIM_INFINITY))
                with open(path, "wb") as handle:
                    handle.write(big)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
                value = open(path, "rb")  # noqa: SIM115 - closed below
            with value, pytest.raises(OSError) as info:
                region.set("key", value)
            assert raw_blob(region, "key") == small
        outcomes[kind] = info.value.errno
        assert_consistent(region, os.path.join(base_dir, kind))
    return outcomes


def test_file_size_limit_rlimit_fsize(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse to grow a file: a disk fault any user can cause."""
    staging = str(tmp_path / "staging")
    os.mkdir(staging)
    outcomes = faultkit.in_child(_file_size_limit_child, str(tmp_path / "cache"), staging)
    assert set(outcomes.values()) == {errno.EFBIG}, outcomes


def test_read_only_mount(tmp_path):
    """EROFS: hits still work (recency is best effort), writes and deletes raise EROFS."""
    base_dir = tmp_path / "cache"
    region = pickled(base_dir)
    old = faultkit.make_value("key", 0, 0, 500)
    region.set("key", old)
    data_dir = str(base_dir / "data")
    with faultkit.mounted("--bind", data_dir, target=data_dir):
        problem = faultkit.try_mount("-o", "remount,bind,ro", data_dir)
        if problem:
            pytest.skip(problem)
        assert region.get("key") == old
        for operation in (
            lambda: region.set("key", faultkit.make_value("key", 1, 0, 500)),
            lambda: region.set("new", 1),
            lambda: region.delete("key"),
            lambda: region.get_or_create("other", lambda: 1),
        ):
            with pytest.raises(OSError) as info:
                operation()
            assert info.value.errno == errno.EROFS
        assert region.get("key") == old
    assert region.get("key") == old
    assert_verified_clean(region, base_dir)


def _unwritable_directory_child(base_dir: str) -> dict:
    region = pickled(base_dir)
    old = faultkit.make_value("key", 0, 0, 200)
    region.set("key", old)
    region.set("bystander", 1)
    entry_dir = os.path.dirname(faultkit.entry_path(region.backend, "key"))
    os.chmod(entry_dir, 0o500)  # the owner itself may not write there now
    errors = {}
    for name, operation in (
        ("set", lambda: region.set("key", faultkit.make_value("key", 1, 0, 200))),
        ("delete", lambda: region.delete("key")),
    ):
        with pytest.raises(OSError) as info:
            operation()
        errors[name] = info.value.errno
    assert region.get("key") == old  # reads still work
    os.chmod(entry_dir, 0o700)
    assert_consistent(region, base_dir)
    region.set("key", faultkit.make_value("key", 1, 0, 200))
    assert region.get("key")["writer"] == 1
    return errors


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user")
def test_permission_denied_for_an_unprivileged_user():
    """EACCES cannot be provoked as root, so a forked child drops to 'nobody' first."""
    with faultkit.nobody_dir("eacces") as top:
        errors = faultkit.in_child_as_nobody(
            _unwritable_directory_child, os.path.join(top, "cache")
        )
    assert errors == {"set": errno.EACCES, "delete": errno.EACCES}


def _out_of_descriptors_child(base_dir: str, source: str) -> dict:
    pickled_region = pickled(os.path.join(base_dir, "pickled"))
    raw_region = raw(os.path.join(base_dir, "raw"))
    pickled_region.set("key", "old")
    raw_region.set("key", io.BytesIO(b"old"))
    value = open(source, "rb")  # noqa: SIM115 - opened before the descriptors run out
    # Backends dropped earlier in this (forked) process close their descriptors when
    # collected: collect them now, and not while the table is full, or a collection
    # would free a descriptor in the middle of the test.
    gc.collect()
    gc.disable()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (faultkit.fd_count() + 16, hard))
    fillers = []
    try:
        while True:
            fillers.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as exc:
        assert exc.errno == errno.EMFILE
    errors = {}
    try:
        for name, operation in (
            ("pickled set", lambda: pickled_region.set("key", "new")),
            ("raw set", lambda: raw_region.set("key", value)),
            ("pickled get", lambda: pickled_region.get("key")),
        ):
            with pytest.raises(OSError) as info:
                operation()
            errors[name] = info.value.errno
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        gc.enable()
    assert pickled_region.get("key") == "old"
    assert raw_blob(raw_region, "key") == b"old"
    assert_consistent(pickled_region, os.path.join(base_dir, "pickled"))
    assert_consistent(raw_region, os.path.join(base_dir, "raw"))
    raw_region.set("key", value)
    value.close()
    assert raw_blob(raw_region, "key") == b"new content"
    return errors


def test_out_of_file_descriptors(tmp_path):
    """EMFILE: the error reaches the caller (a read too: it cannot tell a miss), nothing leaks."""
    source = tmp_path / "source"
    source.write_bytes(b"new content")
    errors = faultkit.in_child(_out_of_descriptors_child, str(tmp_path / "cache"), str(source))
    assert set(errors.values()) == {errno.EMFILE}, errors


# -- bad input ----------------------------------------------------------------------------


def _generator():
    yield 1


class _Unpicklable:
    def __reduce__(self):
        raise TypeError("refuses to be pickled")


UNPICKLABLE = {
    "lambda": lambda: 1,
    "lock": threading.Lock(),
    "generator": _generator(),
    "refusing-object": _Unpicklable(),
    "nested": {"fine": 1, "not": [threading.Lock()]},
}


@pytest.mark.parametrize("name", sorted(UNPICKLABLE))
def test_unpicklable_value_raises_and_leaves_no_file(tmp_path, name):
    base_dir = tmp_path / "cache"
    region = pickled(base_dir)
    region.set("key", "old")
    with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
        region.set("key", UNPICKLABLE[name])
    assert region.get("key") == "old"
    with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
        region.get_or_create("other", lambda: UNPICKLABLE[name])
    assert region.get("other") is NO_VALUE
    mutex = region.backend.get_mutex("other")
    assert mutex.acquire(wait=False)
    mutex.release()
    assert region.backend.stats()["entries"] == 1
    assert_consistent(region, base_dir)


NOT_FILES = {
    "str": "text",
    "bytes": b"bytes",
    "bytearray": bytearray(b"bytes"),
    "memoryview": memoryview(b"bytes"),
    "int": 42,
    "none": None,
    "dict": {"a": 1},
    "list": [b"a"],
    "stringio": io.StringIO("text"),
}


@pytest.mark.parametrize("name", sorted(NOT_FILES))
def test_raw_backend_rejects_what_is_not_a_binary_file(tmp_path, name):
    base_dir = tmp_path / "cache"
    region = raw(base_dir)
    region.set("key", io.BytesIO(b"old"))
    with pytest.raises(TypeError):
        region.set("key", NOT_FILES[name])
    assert raw_blob(region, "key") == b"old"
    assert_consistent(region, base_dir)


def test_raw_backend_rejects_text_closed_and_write_only_files(tmp_path):
    base_dir = tmp_path / "cache"
    region = raw(base_dir)
    path = tmp_path / "file"
    path.write_bytes(b"content")
    with open(path) as text, pytest.raises(TypeError):
        region.set("key", text)
    closed = open(path, "rb")  # noqa: SIM115
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        region.set("key", closed)
    with open(path, "ab") as write_only, pytest.raises(TypeError, match="reading"):
        region.set("key", write_only)
    assert region.get("key") is NO_VALUE
    assert_consistent(region, base_dir)
    assert path.read_bytes() == b"content"  # the caller's file is untouched


@pytest.mark.parametrize("source", ["file", "bytesio"])
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_raw_file_position_is_kept(tmp_path, source, where):
    """A file positioned at its end is cached whole; hits start where the creator left it."""
    region = raw(tmp_path / "cache")
    content = faultkit.make_blob("key", 0, 0, 1000)
    offset = {"start": 0, "middle": 500, "end": len(content)}[where]
    path = tmp_path / "file"
    path.write_bytes(content)
    with open(path, "rb") if source == "file" else io.BytesIO(content) as value:
        value.seek(offset)
        region.set("key", value)
        assert value.tell() == offset  # the caller's position is left alone
    with region.get("key") as hit:
        assert hit.content_length == len(content)
        assert hit.read() == content[offset:]
        hit.seek(0)
        assert hit.read() == content


@pytest.mark.parametrize("movable", [False, True])
def test_raw_zero_byte_file(tmp_path, movable):
    base_dir = tmp_path / "cache"
    region = raw(base_dir, file_movable=movable)
    with tempfile.NamedTemporaryFile(dir=base_dir.parent, delete=False) as empty:
        pass
    with open(empty.name, "rb") as value:
        region.set("key", value)
    with region.get("key") as hit:
        assert hit.read() == b""
        assert hit.content_length == 0
    assert_consistent(region, base_dir)


def test_raw_non_seekable_stream_stores_what_is_left(tmp_path):
    region = raw(tmp_path / "cache")
    read_end, write_end = os.pipe()
    os.write(write_end, b"streamed bytes")
    os.close(write_end)
    with open(read_end, "rb") as stream:
        stream.read(9)
        region.set("key", stream)
    with region.get("key") as hit:
        assert hit.read() == b"bytes"


@pytest.mark.parametrize("kind", ["pickled", "raw-copy", "raw-move"])
def test_value_larger_than_the_cache_is_not_cached_with_a_warning(tmp_path, kind, caplog):
    """Current behaviour: not cached, CacheSizeWarning and a log line; the old value goes."""
    base_dir = tmp_path / "cache"
    limit = 10_000
    if kind == "pickled":
        region = pickled(base_dir, cache_size=limit)
        region.set("key", "old")
        region.set("small", "kept")
        value = faultkit.make_value("key", 1, 0, 2 * limit)
    else:
        region = raw(base_dir, cache_size=limit, file_movable=kind == "raw-move")
        region.set("key", io.BytesIO(b"old"))
        region.set("small", io.BytesIO(b"kept"))
        big = tmp_path / "big"
        big.write_bytes(faultkit.make_blob("key", 1, 0, 2 * limit))
        value = open(big, "rb")  # noqa: SIM115 - closed below
    with caplog.at_level(logging.WARNING), pytest.warns(CacheSizeWarning, match="larger than"):
        region.set("key", value)
    assert "larger than cache_size" in caplog.text
    if kind != "pickled":
        assert big.exists()  # refused before the caller's file was moved in
        value.seek(0)  # the caller's file still reads whole
        assert faultkit.check_blob("key", value.read()) is None
        value.close()
    assert region.get("key") is NO_VALUE  # never the value this set replaced
    assert region.get("small") is not NO_VALUE
    assert_consistent(region, base_dir)


EVIL_KEYS = [
    "",
    " ",
    ".",
    "..",
    "/",
    "//",
    "../../../../../../etc/passwd",
    "a/../../b",
    "/absolute/path",
    "\x00",
    "a\x00b",
    "\udcff\udc80",  # lone surrogates: not UTF-8 encodable
    "\ud800",
    "ключ-鍵-🔑",
    "\n\r\t\x1b",
    "*?[]{}~$`'\"\\",
    "C:\\Windows\\system32",
    "%s%n%x",
    ".tmp-1-abc",
    "data",
    "lock",
    "x" * 255,
    "x" * 4097,
    "k" * 1_000_000,
]


@pytest.mark.parametrize("kind", ["pickled", "raw"])
def test_hostile_keys_stay_inside_base_dir_and_never_collide(tmp_path, kind):
    base_dir = tmp_path / "cache"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("not yours")
    region = (pickled if kind == "pickled" else raw)(base_dir)
    before = faultkit.snapshot(str(tmp_path / "outside"))

    def put(key, writer):
        if kind == "pickled":
            region.set(key, faultkit.make_value(key, writer, 0, 50))
        else:
            region.set(key, io.BytesIO(faultkit.make_blob(key, writer, 0, 50)))

    def check(key, writer):
        found = region.get(key)
        if kind == "pickled":
            assert faultkit.check_value(key, found) is None
            assert found["writer"] == writer
        else:
            blob = faultkit.read_raw(found)
            assert faultkit.check_blob(key, blob) is None
            assert blob == faultkit.make_blob(key, writer, 0, 50)

    for key in EVIL_KEYS:
        put(key, 0)
    for key in EVIL_KEYS:  # each key has its own value: no two collide
        check(key, 0)
    for key in EVIL_KEYS:
        mutex = region.backend.get_mutex(key)
        assert mutex.acquire(wait=False)
        mutex.release()
        region.delete(key)
        assert region.get(key) is NO_VALUE
        created = region.get_or_create(
            key,
            (lambda k=key: faultkit.make_value(k, 1, 0, 50))
            if kind == "pickled"
            else (lambda k=key: io.BytesIO(faultkit.make_blob(k, 1, 0, 50))),
        )
        if kind != "pickled":
            created.close()
        check(key, 1)
    assert faultkit.snapshot(str(outside)) == before
    assert sorted(os.listdir(tmp_path)) == ["cache", "outside"]
    assert set(os.listdir(base_dir)) <= {
        layout.MARKER_NAME,
        layout.LOCK_NAME,
        layout.ACCOUNTING_NAME,
        layout.MAINTENANCE_LOCK_NAME,
        layout.DATA_DIR,
    }
    for directory, dirnames, names in os.walk(base_dir / "data"):
        for name in dirnames:
            assert set(name) <= set("0123456789abcdef"), name
        for name in names:
            assert layout.split_entry_name(name) is not None, name
            assert stat.S_ISREG(os.lstat(os.path.join(directory, name)).st_mode)
    assert_verified_clean(region, base_dir)
    assert region.backend.stats()["entries"] == len(EVIL_KEYS)


def test_cached_value_metadata_round_trips_for_hostile_keys(tmp_path):
    """dogpile's metadata rides in the raw record as JSON, for any key."""
    region = raw(tmp_path / "cache")
    for key in ("\udcff", "a\x00b", "k" * 10_000):
        region.backend.set(key, CachedValue(io.BytesIO(b"bytes"), {"ct": 1.0, "v": 2}))
        found = region.backend.get(key)
        assert found.metadata == {"ct": 1.0, "v": 2}
        with found.payload as hit:
            assert hit.read() == b"bytes"


def test_movable_file_just_under_the_room_but_over_it_with_its_record_stays_put(tmp_path):
    """The record counts too: a file that fits alone but not with its record is refused
    before it is moved, never moved in and then deleted."""
    base_dir = tmp_path / "cache"
    region = raw(base_dir, cache_size=10_000, file_movable=True)
    source = base_dir / "made-by-the-app"
    source.write_bytes(b"z" * 9_000)  # the room is 9,000 bytes (0.9 x 10,000)
    with open(source, "rb") as handle, pytest.warns(CacheSizeWarning):
        region.set("key", handle)
    assert source.read_bytes() == b"z" * 9_000
    assert region.get("key") is NO_VALUE


@pytest.mark.parametrize("kind", ["pickled", "raw"])
def test_a_sparse_entry_whose_header_claims_a_terabyte_is_a_miss_not_a_memory_error(
    tmp_path, kind
):
    """A sparse file of 1 TiB whose header declares exactly that length (so the length
    checks agree) is never read into memory, by a hit, a listing or a scan: no entry of
    this cache can be larger than cache_size.  A hit leaves it alone (a process with a
    larger cache_size may own such an entry); verify, repairing under this limit,
    removes it."""
    base_dir = tmp_path / "cache"
    region = (pickled if kind == "pickled" else raw)(base_dir)
    region.set("bystander", "b" if kind == "pickled" else io.BytesIO(b"b"))

    def plant() -> str:
        region.set("victim", "v" if kind == "pickled" else io.BytesIO(b"v"))
        path = faultkit.entry_path(region.backend, "victim")
        size = 1 << 40
        with open(path, "rb") as handle:
            header = bytearray(handle.read(records.HEADER_SIZE))
        key_len = int.from_bytes(header[16:20], "little")
        header[20:28] = (size - records.HEADER_SIZE - key_len).to_bytes(8, "little")
        with open(path, "r+b") as handle:
            handle.write(header)
            handle.truncate(size)  # sparse: no blocks
        return path

    path = plant()
    assert list(region.backend.keys()) == ["bystander"]
    assert region.get("victim") is NO_VALUE
    assert os.path.getsize(path) == 1 << 40
    region.backend.verify()
    assert not os.path.exists(path)
    assert_consistent(region, base_dir)


@pytest.mark.parametrize("autodelete", [False, True], ids=["named-file", "self-deleting-temp"])
def test_a_move_the_filesystem_refuses_is_copied_and_the_file_stays(tmp_path, autodelete):
    """file_movable: the caller's file goes in under the shard lock, straight to its data
    file's name (never a temp name); when that rename or link fails (EXDEV: a bind
    mount of the same device), nothing is published and the file is copied instead."""
    base_dir = tmp_path / "cache"
    region = raw(base_dir, file_movable=True)
    region.set("key", io.BytesIO(b"old"))
    new = faultkit.make_blob("key", 1, 0, 3000)
    call = "link" if autodelete else "replace"
    with tempfile.NamedTemporaryFile(dir=tmp_path, delete=autodelete) as value:
        value.write(new)
        value.flush()
        value.seek(0)
        with inject(call, errno.EXDEV, lambda src, dst: not _is_temp(src)):
            region.set("key", value)
        assert os.path.exists(value.name)  # not taken
        value.seek(0)
        assert value.read() == new
        assert raw_blob(region, "key") == new
        assert_consistent(region, base_dir)
        assert_verified_clean(region, base_dir)
        moved_to = []
        real = getattr(os, call)

        def watched(src, dst, *args, **kwargs):
            if not _is_temp(src):
                moved_to.append(os.path.basename(dst))
            return real(src, dst, *args, **kwargs)

        with mock.patch.object(os, call, watched):
            region.set("key", value)
    (name,) = moved_to
    assert layout.split_entry_name(name) == (layout.digest_of("key"), mock.ANY)
    assert raw_blob(region, "key") == new
    assert_verified_clean(region, base_dir)


@pytest.mark.parametrize("autodelete", [False, True], ids=["named-file", "self-deleting-temp"])
@pytest.mark.parametrize("call", ["fchmod", "utime"])
def test_a_moved_file_that_may_not_be_changed_is_given_back_and_copied(tmp_path, call, autodelete):
    """file_movable: the file gets the cache's mode and a stamp of now only once it is
    in (never while it may still be left to the caller); when that is refused (EPERM:
    another user's file in a directory we may write), it gets its name, mode and mtime
    back and is copied, with nothing left behind."""
    base_dir = tmp_path / "cache"
    region = raw(base_dir, file_movable=True)
    region.set("key", io.BytesIO(b"old"))
    new = faultkit.make_blob("key", 1, 0, 3000)
    with tempfile.NamedTemporaryFile(dir=tmp_path, delete=autodelete) as value:
        value.write(new)
        value.flush()
        value.seek(0)
        os.chmod(value.name, 0o644)
        os.utime(value.name, (1_500_000_000, 1_500_000_000))
        before = os.stat(value.name)
        with inject(call, errno.EPERM, lambda target, *a: target == value.fileno()):
            region.set("key", value)
        after = os.stat(value.name)
        assert (after.st_ino, after.st_nlink, after.st_mode, after.st_mtime_ns) == (
            before.st_ino,
            1,
            before.st_mode,
            before.st_mtime_ns,
        )
        assert raw_blob(region, "key") == new
        (data,) = faultkit.data_paths(region.backend, "key")
        assert os.stat(data).st_ino != before.st_ino  # a copy
        assert_consistent(region, base_dir)
        assert_verified_clean(region, base_dir)
