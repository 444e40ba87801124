"""openat2 creation below a directory: no symlink followed, errors like os.open's.

The store creates every temp file through ``beneath.Creator`` where openat2
exists; test_security.py runs the planted-symlink cases both ways.
"""

from __future__ import annotations

import errno
import gc
import os
import shutil
import sys
import threading

import pytest
from dogpile.cache import make_region

from dogpile_fsbackend import beneath, files

pytestmark = pytest.mark.skipif(not beneath.available(), reason="openat2 is not available here")

FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@pytest.fixture
def tree(tmp_path):
    base = tmp_path / "base"
    (base / "data" / "a" / "b").mkdir(parents=True)
    outside = tmp_path / "outside"
    (outside / "a" / "b").mkdir(parents=True)
    return base, outside


def test_creates_the_file_with_its_mode(tree):
    base, _ = tree
    creator = beneath.Creator(str(base), FLAGS, 0o600)
    path = f"{base}/data/a/b/new"
    os.close(creator.open(path))
    assert os.path.isfile(path) and not os.path.islink(path)
    with pytest.raises(FileExistsError) as raised:  # O_EXCL, as os.open
        creator.open(path)
    assert raised.value.filename == path


@pytest.mark.parametrize("level", ["data", "data/a", "data/a/b"])
def test_a_symlink_on_any_level_is_refused_and_nothing_outside_is_made(tree, level):
    base, outside = tree
    creator = beneath.Creator(str(base), FLAGS, 0o600)
    planted = base / level
    shutil.rmtree(planted)
    depth = level.count("/")  # where the link points: the same place in the outside tree
    target = outside / "/".join(["a", "b"][:depth]) if depth else outside
    os.symlink(target, planted)
    path = f"{base}/data/a/b/new"
    with pytest.raises(OSError) as raised:
        creator.open(path)
    assert raised.value.errno == errno.ELOOP and raised.value.filename == path
    assert not any(files for _, _, files in os.walk(outside))


def test_a_symlink_as_the_file_itself_is_refused(tree):
    base, outside = tree
    creator = beneath.Creator(str(base), FLAGS, 0o600)
    os.symlink(outside / "target", base / "data/a/b/new")
    with pytest.raises(FileExistsError):  # O_EXCL: the link is never followed
        creator.open(f"{base}/data/a/b/new")
    assert not os.path.lexists(outside / "target")


def test_the_directory_itself_may_be_reached_through_a_symlink(tree, tmp_path):
    base, _ = tree
    os.symlink(base, tmp_path / "link")
    creator = beneath.Creator(str(tmp_path / "link"), FLAGS, 0o600)
    os.close(creator.open(f"{tmp_path}/link/data/a/b/new"))
    assert (base / "data/a/b/new").is_file()


def test_a_missing_level_is_file_not_found(tree):
    base, _ = tree
    creator = beneath.Creator(str(base), FLAGS, 0o600)
    with pytest.raises(FileNotFoundError):
        creator.open(f"{base}/data/x/y/new")


def test_a_directory_made_again_is_followed_once_renewed(tree):
    base, _ = tree
    creator = beneath.Creator(str(base), FLAGS, 0o600)
    shutil.rmtree(base)
    (base / "data" / "a" / "b").mkdir(parents=True)
    with pytest.raises(FileNotFoundError):  # still the removed directory
        creator.open(f"{base}/data/a/b/new")
    creator.renew_if_moved()
    os.close(creator.open(f"{base}/data/a/b/new"))
    assert (base / "data/a/b/new").is_file()


def test_a_cache_whose_directory_was_removed_and_made_again_goes_on_storing(tmp_path):
    """The store's kept descriptor of base_dir follows a base_dir made again."""
    base_dir = str(tmp_path / "cache")
    region = make_region().configure("dogpile_fsbackend.pickled", arguments={"base_dir": base_dir})
    region.set("before", 1)
    shutil.rmtree(base_dir)
    os.makedirs(base_dir)
    for number in range(20):
        region.set(f"key-{number}", number)
    assert [region.get(f"key-{number}") for number in range(20)] == list(range(20))
    assert region.backend.store._creator is not None
    assert os.path.samestat(os.fstat(region.backend.store._creator.fd), os.stat(base_dir))


def test_a_base_dir_swapped_for_another_cache_is_written_where_it_now_points(
    tmp_path, monkeypatch
):
    """base_dir a symlink switched to another (already used) cache directory, as a
    deployment does: the kept descriptor still named the old one, whose shard
    directories were all there, so each temp file went there and its publish by path
    found nothing (FileNotFoundError on every set, a temp file left per set)."""
    monkeypatch.setattr(files, "CHECK_INTERVAL", 0.0)  # due at once (else within a second)
    old, new, link = tmp_path / "v1", tmp_path / "v2", tmp_path / "current"
    old.mkdir()
    os.symlink(old, link)
    keys = [f"key-{number}" for number in range(10)]
    region = make_region().configure("dogpile_fsbackend.pickled", arguments={"base_dir": link})
    prepared = make_region().configure("dogpile_fsbackend.pickled", arguments={"base_dir": new})
    for key in keys:
        region.set(key, "old")
        prepared.set(key, "prepared")
    os.symlink(new, tmp_path / "next")
    os.replace(tmp_path / "next", link)
    for key in keys:
        region.set(key, "new")
    assert [prepared.get(key) for key in keys] == ["new"] * len(keys)
    assert not [name for _, _, names in os.walk(old) for name in names if ".tmp-" in name]


def test_renewing_never_closes_a_descriptor_another_thread_may_be_using(tree):
    """A thread that read the kept descriptor just before another renewed it still
    resolves from it (a removed directory: ENOENT, repaired); had it been closed, that
    thread would get EBADF, or resolve from whatever file took the number."""
    base, _ = tree
    creator = beneath.Creator(str(base), FLAGS, 0o600)
    in_use = creator.fd
    shutil.rmtree(base)
    (base / "data" / "a" / "b").mkdir(parents=True)
    creator.renew_if_moved()
    assert creator.fd != in_use
    assert os.path.samestat(os.fstat(in_use), os.fstat(in_use))  # still open
    with pytest.raises(FileNotFoundError):  # the removed directory: repaired by the caller
        os.open("data/a/b/new", FLAGS, 0o600, dir_fd=in_use)
    del creator
    gc.collect()
    with pytest.raises(OSError) as raised:  # closed with the creator: no descriptor kept
        os.fstat(in_use)
    assert raised.value.errno == errno.EBADF


def test_threads_writing_while_base_dir_is_made_again_never_see_a_closed_descriptor(tree):
    """Threads renewing at once closed the descriptor others were resolving from (EBADF,
    or whatever file took its number next)."""
    base, _ = tree
    creator = beneath.Creator(str(base), FLAGS, 0o600)
    stop = threading.Event()
    unexpected: list[OSError] = []

    def write(number: int) -> None:
        count = 0
        while not stop.is_set():
            count += 1
            path = f"{base}/data/a/b/{number}-{count}"
            try:
                os.close(creator.open(path))
                os.unlink(path)  # a few files at a time, however long the run
            except FileNotFoundError:  # removed meanwhile: the store's repair, in short
                creator.renew_if_moved()
            except OSError as exc:
                unexpected.append(exc)
                stop.set()

    threads = [threading.Thread(target=write, args=(number,)) for number in range(4)]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for thread in threads:
            thread.start()
        for _ in range(200):
            if stop.is_set():
                break
            shutil.rmtree(base, ignore_errors=True)
            os.makedirs(base / "data" / "a" / "b", exist_ok=True)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        sys.setswitchinterval(switch)
    assert unexpected == []


def test_a_kept_descriptor_whose_number_another_file_took_is_never_closed(tmp_path):
    """Something closed the store's descriptor of base_dir and the number went to another
    file (a daemonizer closing descriptors, then opening its own): sets go on, and
    that file is never closed by the cache."""
    base_dir = str(tmp_path / "cache")
    region = make_region().configure("dogpile_fsbackend.pickled", arguments={"base_dir": base_dir})
    region.set("before", 1)
    kept = region.backend.store._creator.fd
    foreign = os.open(tmp_path / "foreign", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.dup2(foreign, kept)  # our number now names the foreign file
    try:
        for number in range(20):
            region.set(f"key-{number}", number)
        assert [region.get(f"key-{number}") for number in range(20)] == list(range(20))
        assert os.path.samestat(os.fstat(kept), os.fstat(foreign))  # not closed by us
        assert os.path.samestat(
            os.fstat(region.backend.store._creator.fd), os.stat(base_dir)
        )  # a descriptor of its own again
    finally:
        os.close(foreign)
        os.close(kept)


def _fdinfo_flags(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as info:
        return next(int(line.split()[1], 8) for line in info if line.startswith("flags:"))


def test_files_are_opened_with_the_flags_os_open_gives_them(tree):
    """Including O_LARGEFILE, which glibc's open adds for a 32-bit process and a raw
    openat2 does not on a 32-bit kernel: writes past 2 GiB would fail (EFBIG)."""
    base, _ = tree
    creator = beneath.Creator(str(base), FLAGS, 0o600)
    ours = creator.open(f"{base}/data/a/b/ours")
    theirs = os.open(f"{base}/data/a/b/theirs", FLAGS, 0o600)
    try:
        assert _fdinfo_flags(ours) == _fdinfo_flags(theirs)
    finally:
        os.close(ours)
        os.close(theirs)


def test_a_kept_descriptor_closed_behind_its_back_is_opened_again(tmp_path):
    """Something closed it (its number free): the next set opens base_dir again, where it
    raised EBADF on every set."""
    base_dir = str(tmp_path / "cache")
    region = make_region().configure("dogpile_fsbackend.pickled", arguments={"base_dir": base_dir})
    region.set("before", 1)
    os.close(region.backend.store._creator.fd)
    region.set("after", 2)
    assert region.get("after") == 2
    assert os.path.samestat(os.fstat(region.backend.store._creator.fd), os.stat(base_dir))


def test_openat2_refused_after_the_probe_falls_back_to_the_path_check(tmp_path, monkeypatch):
    """A seccomp filter installed after the probe (a sandboxed worker) makes openat2 fail
    with ENOSYS: the store creates by path from then on, and the set succeeds."""
    region = make_region().configure(
        "dogpile_fsbackend.pickled", arguments={"base_dir": str(tmp_path / "cache")}
    )
    region.set("before", 1)
    store = region.backend.store

    def refused(creator, path):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS), path)

    monkeypatch.setattr(beneath.Creator, "open", refused)
    region.set("after", 2)
    assert store._creator is None
    assert (region.get("before"), region.get("after")) == (1, 2)
