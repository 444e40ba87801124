"""Maintenance scans on every shard layout, and recovery when the bookkeeping files are lost.

Scans walk ``shard_depth`` levels of ``shard_width`` hex digits, of which only the first
levels make up an accounting shard; these tests plant damage at the deepest level of
each layout and check what verify, prune, clear and the CLI make of it.  The lost
accounting tests check behaviour only: whatever the accounting file holds, the counts
and the size limit come back true from the files.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from conftest import SPAWN, WAIT
from dogpile.cache import make_region
from faultkit import disk_usage, entry_path, foreign_files, get_bytes, set_bytes, temp_files

from dogpile_fsbackend import cli, layout, maintenance

LAYOUTS = [(1, 1), (3, 1), (4, 1), (1, 2), (2, 2), (3, 2), (1, 3), (2, 3)]
KEYS = [f"key {index}" for index in range(30)]


def _backend(base_dir: str, kind: str, **arguments):
    return (
        make_region()
        .configure(f"dogpile_fsbackend.{kind}", arguments={"base_dir": base_dir, **arguments})
        .backend
    )


def _value(key: str) -> bytes:
    return key.encode() * 40


def _fill(backend, kind: str) -> None:
    for key in KEYS:
        set_bytes(backend, kind, key, _value(key))


def _plant_damage(backend, kind: str) -> None:
    """A truncated entry, a foreign file, an abandoned temp file and (raw) an orphaned data
    file, all in the deepest directories of the layout."""
    victim = entry_path(backend, KEYS[0])
    with open(victim, "r+b") as handle:
        handle.truncate(10)
    directory = os.path.dirname(entry_path(backend, KEYS[1]))
    with open(os.path.join(directory, "not-an-entry"), "wb") as handle:
        handle.write(b"foreign")
    temp = os.path.join(directory, f"{layout.TEMP_PREFIX}{os.getpid()}-abandoned")
    with open(temp, "wb") as handle:
        handle.write(b"half written")
    an_hour_ago = time.time() - 3600
    os.utime(temp, (an_hour_ago, an_hour_ago))  # older than temp_max_age
    if kind == "raw":
        digest = layout.key_digest(layout.encode_key("never stored"))
        orphan_dir = backend.store.layout.entry_dir(digest)
        os.makedirs(orphan_dir, exist_ok=True)
        with open(os.path.join(orphan_dir, f"{digest}.00112233"), "wb") as handle:
            handle.write(b"no record names me")


def _depth_of(backend, key: str) -> int:
    relative = os.path.relpath(entry_path(backend, key), backend.store.layout.data_dir)
    return relative.count(os.sep)


@pytest.mark.parametrize("kind", ["pickled", "raw"])
@pytest.mark.parametrize(("depth", "width"), LAYOUTS, ids=lambda v: str(v))
def test_verify_prune_and_clear_on_every_shard_layout(cache_dir, kind, depth, width):
    backend = _backend(cache_dir, kind, shard_depth=depth, shard_width=width, temp_max_age=600)
    _fill(backend, kind)
    assert _depth_of(backend, KEYS[1]) == depth
    assert (
        os.path.basename(os.path.dirname(entry_path(backend, KEYS[1])))
        == layout.key_digest(layout.encode_key(KEYS[1]))[(depth - 1) * width : depth * width]
    )
    _plant_damage(backend, kind)

    report = backend.verify()
    assert report.entries == len(KEYS) - 1
    assert report.damaged_removed == 2  # the truncated entry and the foreign file
    assert report.temp_files_removed == 1
    assert report.orphans_removed == (1 if kind == "raw" else 0)
    assert report.accounting_drift < 0  # the truncated entry had been counted
    assert not temp_files(cache_dir) and not foreign_files(cache_dir)
    size, entries = disk_usage(cache_dir)
    assert backend.stats()["bytes"] == report.bytes == size
    assert backend.stats()["entries"] == entries == len(KEYS) - 1
    assert get_bytes(backend, kind, KEYS[0]) is None
    assert all(get_bytes(backend, kind, key) == _value(key) for key in KEYS[1:])

    limit = size // 2
    small = _backend(cache_dir, kind, shard_depth=depth, shard_width=width, cache_size=limit)
    result = small.prune()
    assert result.removed > 0 and result.expired == 0
    assert disk_usage(cache_dir)[0] == small.stats()["bytes"] <= 0.9 * limit

    cleared = backend.clear()
    assert cleared.removed == len(KEYS) - 1 - result.removed
    assert disk_usage(cache_dir) == (0, 0)
    assert (backend.stats()["bytes"], backend.stats()["entries"]) == (0, 0)


@pytest.mark.parametrize(("depth", "width"), [(4, 1), (1, 3), (3, 2)], ids=lambda v: str(v))
def test_the_cli_reads_the_layout_from_the_marker(cache_dir, capsys, depth, width):
    backend = _backend(cache_dir, "pickled", shard_depth=depth, shard_width=width)
    _fill(backend, "pickled")
    _plant_damage(backend, "pickled")
    assert cli.main(["verify", "--json", cache_dir]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["entries"], report["damaged_removed"]) == (len(KEYS) - 1, 2)
    assert cli.main(["stats", "--json", cache_dir]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["shards"] == backend.store.layout.shard_count
    assert (stats["bytes"], stats["entries"]) == disk_usage(cache_dir)


# -- a lost or damaged accounting file -------------------------------------------------


def _lose(path: str, how: str) -> None:
    if how == "deleted":
        os.unlink(path)
    elif how == "emptied":
        os.truncate(path, 0)
    elif how == "truncated":
        os.truncate(path, 40)
    else:  # overwritten with garbage of the right size
        size = os.path.getsize(path)
        with open(path, "r+b") as handle:
            handle.write(b"\xff" * size)


def _write_and_report(base_dir: str, kind: str, limit: int, results) -> None:
    """In a new process: one write, then what stats says and what is on disk."""
    backend = _backend(base_dir, kind, cache_size=limit)
    set_bytes(backend, kind, "after the loss", b"x" * 1000)
    stats = backend.stats()
    results.put(((stats["bytes"], stats["entries"]), disk_usage(base_dir)))


@pytest.mark.parametrize("how", ["deleted", "emptied", "truncated", "garbage"])
@pytest.mark.parametrize("kind", ["pickled", "raw"])
def test_a_lost_accounting_file_is_rebuilt_from_the_files(cache_dir, kind, how):
    _fill(_backend(cache_dir, kind), kind)  # dropped at once: nobody maps the file below
    before = disk_usage(cache_dir)
    accounting = os.path.join(cache_dir, layout.ACCOUNTING_NAME)
    _lose(accounting, how)

    results = SPAWN.Queue()  # a new process, as when an application restarts
    child = SPAWN.Process(target=_write_and_report, args=(cache_dir, kind, 10**9, results))
    child.start()
    counted, on_disk = results.get(timeout=WAIT)
    child.join(WAIT)
    assert child.exitcode == 0
    assert counted == on_disk  # the first write after the loss recounted the files
    assert on_disk[1] == before[1] + 1
    assert os.path.getsize(accounting) > 0
    fresh = _backend(cache_dir, kind)
    assert fresh.verify().accounting_drift == 0
    assert all(get_bytes(fresh, kind, key) == _value(key) for key in KEYS)


@pytest.mark.parametrize("kind", ["pickled", "raw"])
def test_the_size_limit_holds_after_the_accounting_file_is_lost(cache_dir, kind):
    _fill(_backend(cache_dir, kind), kind)
    size = disk_usage(cache_dir)[0]
    os.unlink(os.path.join(cache_dir, layout.ACCOUNTING_NAME))
    limit = size // 2  # the files alone are over it; the lost counters knew nothing of them
    results = SPAWN.Queue()
    child = SPAWN.Process(target=_write_and_report, args=(cache_dir, kind, limit, results))
    child.start()
    counted, on_disk = results.get(timeout=WAIT)
    child.join(WAIT)
    assert counted == on_disk
    assert on_disk[0] <= limit


@pytest.mark.parametrize("how", ["deleted", "garbage"])
def test_the_cli_recounts_after_the_accounting_file_is_lost(cache_dir, capsys, how):
    _fill(_backend(cache_dir, "pickled"), "pickled")
    _lose(os.path.join(cache_dir, layout.ACCOUNTING_NAME), how)
    assert cli.main(["prune", "--json", cache_dir]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["bytes"], data["entries"]) == disk_usage(cache_dir)
    assert data["entries"] == len(KEYS)


# -- verify reads without the lock, and removes only what it judged -------------------------


@pytest.mark.parametrize("kind", ["pickled", "raw"])
def test_verify_never_removes_an_entry_rewritten_after_it_was_judged(cache_dir, kind, monkeypatch):
    """verify reads the records of a shard without its lock, then takes the lock to
    recount and remove what it judged damaged: an entry rewritten in between (a new
    file) is kept, and one still damaged goes."""
    backend = _backend(cache_dir, kind)
    _fill(backend, kind)
    rewritten, damaged = KEYS[0], KEYS[1]
    for key in (rewritten, damaged):
        with open(entry_path(backend, key), "r+b") as handle:
            handle.seek(40)
            handle.write(b"\xff" * 4)  # a flipped byte: the checksum no longer matches
    judge_shard = maintenance._judge_shard
    shard_of = backend.store.layout.shard_index

    def judge_then_rewrite(store, shard, report):
        verdicts = judge_shard(store, shard, report)
        if shard == shard_of(layout.key_digest(rewritten.encode())):
            set_bytes(backend, kind, rewritten, b"fresh")  # after the verdict, before the lock
        return verdicts

    monkeypatch.setattr(maintenance, "_judge_shard", judge_then_rewrite)
    report = backend.verify()
    assert report.damaged_removed == 1
    assert get_bytes(backend, kind, rewritten) == b"fresh"
    assert get_bytes(backend, kind, damaged) is None
    assert (backend.stats()["bytes"], backend.stats()["entries"]) == disk_usage(cache_dir)
