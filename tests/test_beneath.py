"""openat2 creation below a directory: no symlink followed, errors like os.open's.

The store creates every temp file through ``beneath.Creator`` where openat2
exists; test_security.py runs the planted-symlink cases both ways.
"""

from __future__ import annotations

import errno
import os
import shutil

import pytest
from dogpile.cache import make_region

from dogpile_fsbackend import beneath

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
    assert os.path.samestat(os.fstat(region.backend.store._creator._fd), os.stat(base_dir))
