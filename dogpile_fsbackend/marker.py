"""The format marker ``fsbackend.json``: the one reader and writer of a directory's identity.

The marker records what a cache directory is: the format and its version,
the backend kind (pickled or raw) and the layout fixed at creation (shard
depth and width, lock slots).  The backends, the CLI and scans all go
through :func:`read` and :func:`ensure`, so a directory is judged the same
way everywhere:

* no marker and no entries: a new cache, and the marker is written;
* no marker but entries (the marker was deleted, by hand or by a tmp
  cleaner): adopted only if the entries found are records of the same kind
  in the same layout; otherwise refused, never taken for an empty cache of
  another kind (whose scans would delete the entries as foreign);
* a marker of another kind, another layout, or a newer format version:
  refused with a :class:`ConfigError` naming the directory, so nothing of
  another kind or version is ever deleted;
* a damaged marker (not JSON, a FIFO, a symlink, huge): a
  :class:`BookkeepingError` naming the file and how to repair it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import stat
from collections.abc import Callable

from . import layout as paths
from . import records
from .config import PARSERS
from .exceptions import BookkeepingError, ConfigError
from .files import open_shared, pread_fully, read_bounded

log = logging.getLogger(__name__)

FORMAT_NAME = "dogpile_fsbackend"
FORMAT_VERSION = 1
KIND_NAMES = {records.KIND_PICKLED: "pickled", records.KIND_RAW: "raw"}
KINDS = {name: kind for kind, name in KIND_NAMES.items()}
MAX_SIZE = 64 * 1024  # a real marker is ~150 bytes; /dev/zero behind it must not be read
_LAYOUT_FIELDS = ("shard_depth", "shard_width", "lock_slots")
_ADOPTION_SAMPLE = 16  # entry files read to learn the kind of an unmarked directory
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclasses.dataclass(frozen=True)
class Marker:
    kind: int
    shard_depth: int
    shard_width: int
    lock_slots: int

    def to_json(self) -> str:
        fields = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": KIND_NAMES[self.kind]}
        fields.update({name: getattr(self, name) for name in _LAYOUT_FIELDS})
        return json.dumps(fields, indent=2)


def path_of(base_dir: str) -> str:
    return os.path.join(base_dir, paths.MARKER_NAME)


def read(base_dir: str) -> Marker | None:
    """The marker of ``base_dir``; None if there is none.

    Raises BookkeepingError for a damaged marker and ConfigError for one of
    another format or a newer version.
    """
    path = path_of(base_dir)
    try:
        fd = open_shared(path, 0, writable=False)
    except FileNotFoundError:
        return None
    try:
        data = read_bounded(fd, MAX_SIZE)
    finally:
        os.close(fd)
    if len(data) > MAX_SIZE:
        raise _damaged(path, f"is larger than {MAX_SIZE} bytes")
    try:
        fields = json.loads(data)
    except ValueError:
        raise _damaged(path, "is not JSON") from None
    if not isinstance(fields, dict):
        raise _damaged(path, "is not a JSON object")
    if fields.get("format") != FORMAT_NAME:
        raise ConfigError(
            "base_dir",
            "a directory that is not already used by something else "
            f"({path} is not a dogpile_fsbackend marker)",
            base_dir,
        )
    version = fields.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _damaged(path, f"has no valid format version ({version!r})")
    if version > FORMAT_VERSION:
        raise ConfigError(
            "base_dir",
            f"a cache of format version {FORMAT_VERSION} or older (it holds version {version}, "
            "written by a newer dogpile_fsbackend: upgrade, or use another directory)",
            base_dir,
        )
    kind = KINDS.get(str(fields.get("kind")))
    if kind is None:
        raise _damaged(path, f"names no known backend kind ({fields.get('kind')!r})")
    try:
        layout = {name: PARSERS[name](name, fields.get(name)) for name in _LAYOUT_FIELDS}
    except ConfigError as exc:
        raise _damaged(path, f"has a bad layout value ({exc})") from None
    return Marker(kind, **layout)


def ensure(base_dir: str, wanted: Marker, mode: int, temp_suffix: Callable[[], str]) -> bool:
    """Check ``base_dir``'s marker against ``wanted``, writing it if there is none.

    True if this call wrote the marker.  The caller holds the maintenance
    lock when it may write (first set-up), so two processes never race here.
    """
    found = read(base_dir)
    if found is None:
        adopted = _kind_of_unmarked_entries(base_dir, wanted)
        write(base_dir, wanted, mode, temp_suffix())
        if adopted:
            log.warning(
                "%s was missing; re-created it for the %s entries found",
                path_of(base_dir),
                KIND_NAMES[wanted.kind],
            )
        return True
    check(base_dir, found, wanted)
    return False


def check(base_dir: str, found: Marker, wanted: Marker) -> None:
    """ConfigError unless ``found`` is the kind and layout ``wanted``."""
    if found.kind != wanted.kind:
        raise ConfigError(
            "base_dir",
            f"a directory that is not already used by something else (it holds a "
            f"{KIND_NAMES[found.kind]} cache; use another directory for the "
            f"{KIND_NAMES[wanted.kind]} backend)",
            base_dir,
        )
    for name in _LAYOUT_FIELDS:
        if getattr(found, name) != getattr(wanted, name):
            raise ConfigError(
                name,
                f"{getattr(found, name)!r}, the value this cache directory was created with",
                getattr(wanted, name),
            )


def write(base_dir: str, marker: Marker, mode: int, temp_suffix: str) -> None:
    """Publish ``marker`` atomically: a temp file (``fsbackend.json<temp_suffix>``, named
    after its writer, so a scan can tell when it was left behind) renamed over the marker."""
    path = path_of(base_dir)
    temp_path = f"{path}{temp_suffix}"
    fd = os.open(temp_path, _CREATE_FLAGS, mode)
    try:
        os.fchmod(fd, mode)
        with open(fd, "w", closefd=False) as handle:
            handle.write(marker.to_json())
    finally:
        os.close(fd)
    try:
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_path)
        raise


def _kind_of_unmarked_entries(base_dir: str, wanted: Marker) -> bool:
    """True if ``base_dir`` holds entries of ``wanted``'s kind and layout, False if none.

    Raises ConfigError if what it holds is anything else: the directory is
    then never taken for a new cache.
    """
    data_dir = os.path.join(base_dir, paths.DATA_DIR)
    layout = paths.Layout(base_dir, wanted.shard_depth, wanted.shard_width)
    seen = 0
    for directory, _, names in os.walk(data_dir):
        for name in names:
            parsed = paths.split_entry_name(name)
            if parsed is None:
                continue
            digest, token = parsed
            entry = os.path.join(directory, name)
            if os.path.dirname(entry) != layout.entry_dir(digest):
                raise _unmarked(base_dir, f"entries laid out otherwise ({entry})")
            if token is None and _record_kind(entry) not in (wanted.kind, None):
                raise _unmarked(base_dir, f"entries of another kind ({entry})")
            seen += 1
            if seen >= _ADOPTION_SAMPLE:
                return True
    return seen > 0


def _record_kind(path: str) -> int | None:
    """The kind byte of a record's header; None if it cannot be read as one."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            return records.header_kind(pread_fully(fd, records.HEADER_SIZE))
        finally:
            os.close(fd)
    return None


def _unmarked(base_dir: str, what: str) -> ConfigError:
    return ConfigError(
        "base_dir",
        f"a new directory or a cache of the same kind and layout ({base_dir} has no "
        f"{paths.MARKER_NAME} but holds {what}: restore its {paths.MARKER_NAME}, "
        "or use another directory)",
        base_dir,
    )


def _damaged(path: str, problem: str) -> BookkeepingError:
    return BookkeepingError(
        errno.EINVAL,
        f"the cache's format marker {path} {problem}: delete it and the next backend "
        "of the same kind and layout re-creates it from the entries (or restore it "
        "from a backup)",
        path,
    )
