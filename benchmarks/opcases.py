"""Single operations as users call them, ready to be run N times in a counted child process.

A *subject* is something that offers operations: a backend through a dogpile
region (as applications call it), the same backend one level down
(``get_serialized``/``set_serialized``), our raw backend, diskcache's file
mode, or the bare floor (the syscalls a one-file-per-entry cache cannot avoid).
The parent prepares a subject's directory (``prepare``); the child opens it
(``open``) and gets one :class:`Loop` per operation: the loop body and its
baseline, which is the caller's own share of the body (nothing, or opening the
file handed to a raw set), so that ``body - baseline`` is the operation alone.

Run as a script, this module is that child (see counts.py)::

    python opcases.py run SUBJECT SIZE OP MODE DIR N      # MODE: op or baseline
    python opcases.py marked N JSON                       # for callgrind markers

Every counted loop runs between ``os.getppid()`` and ``os.getsid(0)``.
``run`` runs one loop, and strace counts only the calls between those two;
``marked`` runs each listed operation's baseline loop and then its body loop:
callgrind started with ``--zero-before=getppid --dump-before=getsid`` writes
one profile per loop.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import diskcache
from common import OURS
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE
from dogpile.cache.region import CacheRegion
from peers import BY_NAME, Peer, bulk_set, close_region

FLOOR = "os floor (bare syscalls)"
RECORD_OVERHEAD = 120  # about what a backend adds to a small value (header, key, metadata)
WARM = 5  # untimed operations of every kind before a loop: one-time work stays out
HIT, MISS, SET_NEW, SET_OLD = "get (hit)", "get (miss)", "set (new key)", "set (overwrite)"
RAW_HIT, RAW_COPY, RAW_MOVE = "raw get (hit) + close", "raw set (copy)", "raw set (move)"
REGION_OPS = (HIT, MISS, SET_NEW, SET_OLD)
RAW_OPS = (RAW_HIT, RAW_COPY, RAW_MOVE)
_OPEN_SOURCE = "opening and closing the source file"
_OPEN_STAGED = "opening and closing the file to move"


class Loop(NamedTuple):
    """One operation as a loop body over an index, and the caller's share of that body."""

    body: Callable[[int], object]
    baseline: Callable[[int], object]


def _nothing(i: int) -> None:
    return None


def payload(size: int) -> bytes:
    """The same ``size`` bytes in every process and run: counts must not depend on luck."""
    return (bytes(range(256)) * (size // 256 + 1))[:size]


def measured(n: int) -> range:
    """Indices of the counted operations (0..WARM-1 are the warm-up)."""
    return range(WARM, WARM + n)


def one_key_per_shard(prefix: str) -> list[str]:
    """Keys that land in every one of our 256 shard directories (the first two hex digits
    of the key's SHA-256 name them, see the README's layout): a prepared cache of ours
    has them all, as a cache in use does, so no counted write creates a directory."""
    keys: dict[str, str] = {}
    i = 0
    while len(keys) < 256:
        key = f"{prefix}:{i}"
        keys.setdefault(hashlib.sha256(key.encode()).hexdigest()[:2], key)
        i += 1
    return list(keys.values())


class Subject(Protocol):
    name: str
    ops: tuple[str, ...]
    size: int

    def caller_share(self, op: str) -> str:
        """What the baseline of ``op`` does ("nothing" unless the caller must open a file)."""

    def prepare(self, directory: str, n: int) -> None:
        """Fill ``directory`` with what every operation's warm-up and N counted calls need.

        Always all of it, whichever operation runs: a baseline run and every
        operation's run start from the same state."""

    def open(self, directory: str, n: int) -> dict[str, Loop]:
        """In the child: open the prepared directory and return every operation's loop."""


class RegionSubject:
    """A peer through ``make_region().configure(...)``: what applications call."""

    ops: tuple[str, ...] = REGION_OPS

    def __init__(self, peer: Peer, size: int) -> None:
        self.peer = peer
        self.name = peer.name
        self.size = size

    def caller_share(self, op: str) -> str:
        return "nothing"

    def prepare(self, directory: str, n: int) -> None:
        if not self.peer.shared:
            return  # a per-process cache: the child fills it itself (see open)
        region = self.peer.region(directory)
        self._fill(region, n)
        close_region(region)

    def _fill(self, region: CacheRegion, n: int) -> None:
        value = payload(self.size)
        mapping = dict.fromkeys(_keys("hit", WARM + n) + _keys("old", WARM + n), value)
        if self.peer.is_ours:
            mapping.update(dict.fromkeys(one_key_per_shard("shard"), value))
        bulk_set(self.peer, region, mapping)

    def _open_region(self, directory: str, n: int) -> CacheRegion:
        """The prepared region, warmed up like a long-running process's (see _write_shards)."""
        region = self.peer.region(directory)
        if not self.peer.shared:
            self._fill(region, n)
        if self.peer.is_ours:
            _write_shards(lambda key: region.set(key, payload(self.size)))
        return region

    def open(self, directory: str, n: int) -> dict[str, Loop]:
        region = self._open_region(directory, n)
        value = payload(self.size)
        count = WARM + n
        hit, miss = _keys("hit", count), _keys("miss", count)
        new, old = _keys("new", count), _keys("old", count)
        if region.get(hit[0]) != value or region.get(miss[0]) is not NO_VALUE:
            raise AssertionError(f"{self.name}: prepared entries are not what was set")
        return {
            HIT: Loop(lambda i: region.get(hit[i]), _nothing),
            MISS: Loop(lambda i: region.get(miss[i]), _nothing),
            SET_NEW: Loop(lambda i: region.set(new[i], value), _nothing),
            SET_OLD: Loop(lambda i: region.set(old[i], value), _nothing),
        }


class BackendSubject(RegionSubject):
    """The same peer one level down: what the region calls, ``get``/``set`` with dogpile's
    ``CachedValue`` for a backend without a serializer of its own (ours), else
    ``get_serialized``/``set_serialized`` with the bytes."""

    ops: tuple[str, ...] = (HIT, SET_NEW)

    def __init__(self, peer: Peer, size: int) -> None:
        super().__init__(peer, size)
        self.name = f"{peer.name} (backend level)"

    def open(self, directory: str, n: int) -> dict[str, Loop]:
        backend = self._open_region(directory, n).backend
        count = WARM + n
        hit, new = _keys("hit", count), _keys("new", count)
        if backend.serializer is None:
            get, put = backend.get, backend.set
        else:
            get, put = backend.get_serialized, backend.set_serialized
        value = get(hit[0])  # what the region would pass down
        if value is NO_VALUE:
            raise AssertionError(f"{self.name}: a prepared entry is missing")
        return {
            HIT: Loop(lambda i: get(hit[i]), _nothing),
            SET_NEW: Loop(lambda i: put(new[i], value), _nothing),
        }


def _keys(prefix: str, count: int) -> list[str]:
    return [f"{prefix}:{i}" for i in range(count)]


class _FileSubject:
    """Shared by the raw subjects: a source file, and files staged to be moved in."""

    ops: tuple[str, ...] = RAW_OPS

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size

    def caller_share(self, op: str) -> str:
        return {RAW_COPY: _OPEN_SOURCE, RAW_MOVE: _OPEN_STAGED}.get(op, "nothing")

    @staticmethod
    def source(directory: str) -> str:
        return os.path.join(directory, "source")

    @staticmethod
    def staged(directory: str, count: int) -> list[str]:
        """Files to move in: outside the cache but on its filesystem."""
        return [os.path.join(directory, "staging", f"file-{i}") for i in range(count)]

    def prepare_files(self, directory: str, n: int) -> None:
        os.makedirs(os.path.join(directory, "staging"), exist_ok=True)
        data = payload(self.size)
        paths = [self.source(directory)]
        if RAW_MOVE in self.ops:
            paths += self.staged(directory, WARM + n)
        for path in paths:
            with open(path, "wb") as handle:
                handle.write(data)


class OursRawSubject(_FileSubject):
    """``dogpile_fsbackend.raw`` through a region: copy (file_movable off) and move (on)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"{OURS}.raw", size)

    @staticmethod
    def _region(directory: str, cache: str, movable: bool) -> CacheRegion:
        arguments = {"base_dir": os.path.join(directory, cache), "file_movable": movable}
        return make_region().configure("dogpile_fsbackend.raw", arguments=arguments)

    def prepare(self, directory: str, n: int) -> None:
        self.prepare_files(directory, n)
        source = self.source(directory)
        for cache, keys in (
            ("copy", _keys("hit", WARM + n) + one_key_per_shard("shard")),
            ("move", one_key_per_shard("shard")),
        ):
            region = self._region(directory, cache, movable=False)
            for key in keys:
                _set_from(region, key, source)

    def open(self, directory: str, n: int) -> dict[str, Loop]:
        copying = self._region(directory, "copy", movable=False)
        moving = self._region(directory, "move", movable=True)
        count = WARM + n
        hit, new, moved = _keys("hit", count), _keys("new", count), _keys("moved", count)
        source, staged = self.source(directory), self.staged(directory, count)
        _write_shards(functools.partial(_set_from, copying, path=source))
        # The counted instance itself (a stream is copied, never moved): its shard checks.
        _write_shards(lambda key: moving.set(key, io.BytesIO(payload(self.size))))

        def copy(i: int) -> None:
            with open(source, "rb") as handle:
                copying.set(new[i], handle)

        def move(i: int) -> None:
            with open(staged[i], "rb") as handle:
                moving.set(moved[i], handle)

        return {
            RAW_HIT: Loop(lambda i: _close_file(copying.get(hit[i])), _nothing),
            RAW_COPY: Loop(copy, lambda i: _open_close(source)),
            RAW_MOVE: Loop(move, lambda i: _open_close(staged[i])),
        }


def _set_from(region: CacheRegion, key: str, path: str) -> None:
    with open(path, "rb") as handle:
        region.set(key, handle)


def _write_shards(write: Callable[[str], object]) -> None:
    """Write once into each of our shard directories, as a process that has run a while has.

    Our backend checks a shard directory the first time a process writes
    there (a walk up to base_dir) and then trusts it: without this, a short
    counted loop would charge that one-time walk to the operation.
    """
    for key in one_key_per_shard("shard"):
        write(key)


def _close_file(value: Any) -> None:
    value.close()


def _open_close(path: str) -> None:
    with open(path, "rb"):
        pass


class DiskcacheRawSubject(_FileSubject):
    """diskcache's own file mode (``read=True``); its dogpile adapter has none."""

    ops: tuple[str, ...] = (RAW_HIT, RAW_COPY)

    def __init__(self, size: int) -> None:
        super().__init__("diskcache (read=True)", size)

    def prepare(self, directory: str, n: int) -> None:
        self.prepare_files(directory, n)
        with diskcache.Cache(os.path.join(directory, "cache")) as cache:
            for key in _keys("hit", WARM + n):
                with open(self.source(directory), "rb") as handle:
                    cache.set(key, handle, read=True)

    def open(self, directory: str, n: int) -> dict[str, Loop]:
        cache = diskcache.Cache(os.path.join(directory, "cache"))
        count = WARM + n
        hit, new = _keys("hit", count), _keys("new", count)
        source = self.source(directory)

        def copy(i: int) -> None:
            with open(source, "rb") as handle:
                cache.set(new[i], handle, read=True)

        return {
            RAW_HIT: Loop(lambda i: cache.get(hit[i], read=True).close(), _nothing),
            RAW_COPY: Loop(copy, lambda i: _open_close(source)),
        }


class Floor:
    """What one small file costs on this disk without any cache logic.

    A set is create+write+close+rename; a get is open, one read of exactly the
    size it needs (it wrote the file, so it knows), close; a miss is a failed
    open.  For files: a copy is create+copy_file_range+close+rename and a move
    is one rename.  These are the syscalls a one-file-per-entry cache cannot avoid.
    """

    def __init__(self, directory: str, record_size: int) -> None:
        self.directory = directory
        self.record_size = record_size
        os.makedirs(directory, exist_ok=True)

    def path(self, key: str) -> str:
        return os.path.join(self.directory, key)

    def _create(self, key: str) -> tuple[int, str]:
        temp = self.path(key) + ".tmp"
        return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), temp

    def set(self, key: str, data: bytes) -> None:
        fd, temp = self._create(key)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(temp, self.path(key))

    def get(self, key: str) -> bytes | None:
        try:
            fd = os.open(self.path(key), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return os.read(fd, self.record_size)
        finally:
            os.close(fd)

    def copy_in(self, key: str, source_fd: int, size: int) -> None:
        fd, temp = self._create(key)
        try:
            os.copy_file_range(source_fd, fd, size, 0)
        finally:
            os.close(fd)
        os.replace(temp, self.path(key))

    def move_in(self, key: str, path: str) -> None:
        os.replace(path, self.path(key))

    def open_file(self, key: str) -> int:
        return os.open(self.path(key), os.O_RDONLY)


class FloorSubject(_FileSubject):
    """The floor's small-value and file operations (see :class:`Floor`)."""

    ops: tuple[str, ...] = (*REGION_OPS, *RAW_OPS)

    def __init__(self, size: int) -> None:
        super().__init__(FLOOR, size)

    def caller_share(self, op: str) -> str:
        return super().caller_share(op) if op in RAW_OPS else "nothing"

    def _floor(self, directory: str) -> Floor:
        return Floor(os.path.join(directory, "floor"), self.size + RECORD_OVERHEAD)

    def prepare(self, directory: str, n: int) -> None:
        self.prepare_files(directory, n)
        floor = self._floor(directory)
        record = payload(floor.record_size)
        for key in _keys("hit", WARM + n) + _keys("old", WARM + n):
            floor.set(key, record)
        for key in _keys("file", WARM + n):
            floor.set(key, payload(self.size))

    def open(self, directory: str, n: int) -> dict[str, Loop]:
        floor = self._floor(directory)
        record = payload(floor.record_size)
        count = WARM + n
        hit, miss, new, old = (_keys(p, count) for p in ("hit", "miss", "new", "old"))
        files, copies, moved = (_keys(p, count) for p in ("file", "copy", "moved"))
        source, staged = self.source(directory), self.staged(directory, count)
        if floor.get(hit[0]) != record or floor.get(miss[0]) is not None:
            raise AssertionError("the floor's prepared files are not what was written")

        def copy(i: int) -> None:
            with open(source, "rb") as handle:
                floor.copy_in(copies[i], handle.fileno(), self.size)

        def move(i: int) -> None:
            with open(staged[i], "rb"):
                floor.move_in(moved[i], staged[i])

        return {
            HIT: Loop(lambda i: floor.get(hit[i]), _nothing),
            MISS: Loop(lambda i: floor.get(miss[i]), _nothing),
            SET_NEW: Loop(lambda i: floor.set(new[i], record), _nothing),
            SET_OLD: Loop(lambda i: floor.set(old[i], record), _nothing),
            RAW_HIT: Loop(lambda i: os.close(floor.open_file(files[i])), _nothing),
            RAW_COPY: Loop(copy, lambda i: _open_close(source)),
            RAW_MOVE: Loop(move, lambda i: _open_close(staged[i])),
        }


_BACKEND_LEVEL = " (backend level)"
_FILE_SUBJECTS: Mapping[str, Callable[[int], Subject]] = {
    f"{OURS}.raw": OursRawSubject,
    "diskcache (read=True)": DiskcacheRawSubject,
    FLOOR: FloorSubject,
}


def subject(name: str, size: int) -> Subject:
    """The subject called ``name``: a peer (region level), ``<peer> (backend level)``, a
    file subject, or the floor."""
    if name in _FILE_SUBJECTS:
        return _FILE_SUBJECTS[name](size)
    if name.endswith(_BACKEND_LEVEL):
        return BackendSubject(BY_NAME[name[: -len(_BACKEND_LEVEL)]], size)
    return RegionSubject(BY_NAME[name], size)


def _warm(loops: Mapping[str, Loop]) -> None:
    for loop in loops.values():
        for i in range(WARM):
            loop.body(i)


def _run(name: str, size: int, op: str, mode: str, directory: str, n: int) -> None:
    loops = subject(name, size).open(directory, n)
    _warm(loops)
    step = loops[op].body if mode == "op" else loops[op].baseline
    os.getppid()  # strace: counting starts (tracing.strace_marked_counts)
    for i in measured(n):
        step(i)
    os.getsid(0)  # strace: counting ends


def _marked(n: int, plan: list[dict[str, Any]]) -> None:
    """Each planned op's baseline loop, then its body loop, each between the two markers."""
    for item in plan:
        loops = subject(item["subject"], item["size"]).open(item["directory"], n)
        _warm(loops)
        for op in item["ops"]:
            for step in (loops[op].baseline, loops[op].body):
                os.getppid()  # callgrind: --zero-before=getppid
                for i in measured(n):
                    step(i)
                os.getsid(0)  # callgrind: --dump-before=getsid


def main(argv: list[str]) -> None:
    if argv[0] == "run":
        name, size, op, mode, directory, n = argv[1:]
        _run(name, int(size), op, mode, directory, int(n))
    elif argv[0] == "marked":
        _marked(int(argv[1]), json.loads(argv[2]))
    else:
        raise SystemExit(f"usage: see {__file__}")


if __name__ == "__main__":
    main(sys.argv[1:])
