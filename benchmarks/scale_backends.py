"""The backends of the scale workload as its processes see them: how to open one, its own
size figure, presence checks that leave recency alone, and its maintenance calls."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from common import OURS
from dogpile.cache.region import CacheRegion
from peers import BY_NAME

from dogpile_fsbackend import layout

MAINTENANCE = (("prune", "cull"), ("verify", "check"), ("clear", "clear"))  # ours, diskcache


def key_name(key: int) -> str:
    return f"scale:{key}"


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a child needs to open the cache of one backend."""

    peer: str
    directory: str
    limit: int
    value_size: int

    @property
    def handle_type(self) -> type[Handle]:
        return OursHandle if self.peer == OURS else DiskcacheHandle

    def open(self) -> tuple[CacheRegion, Handle]:
        region = BY_NAME[self.peer].region(self.directory, self.limit)
        return region, self.handle_type(region)

    def value(self) -> bytes:
        return bytes(range(256))[: self.value_size].ljust(self.value_size, b"v")


class Handle:
    """What the workload needs from a backend besides its region."""

    maintenance_ops: tuple[str, ...]

    def __init__(self, region: CacheRegion) -> None:
        self.region = region

    def size(self) -> int:
        """The backend's own figure for what counts against its limit."""
        raise NotImplementedError

    def present(self, key: str) -> bool:
        """Whether the key is stored, without making it recently used."""
        raise NotImplementedError

    def maintenance(self, name: str) -> Callable[[], object]:
        raise NotImplementedError

    def counted_bytes(self, directory: str) -> int:
        """Apparent size of the files the limit counts, by a walk of the directory."""
        raise NotImplementedError


class OursHandle(Handle):
    maintenance_ops = tuple(ours for ours, _ in MAINTENANCE)

    def size(self) -> int:
        return int(self.region.backend.stats()["bytes"])

    def present(self, key: str) -> bool:
        # The entry's path comes from the store's internal layout, which may change:
        # this class is the one place that knows it.  lstat reads no data, stamps nothing.
        digest = layout.key_digest(layout.encode_key(key))
        try:
            os.lstat(self.region.backend.store.layout.entry_path(digest))
        except FileNotFoundError:
            return False
        return True

    def maintenance(self, name: str) -> Callable[[], object]:
        return getattr(self.region.backend, name)

    def counted_bytes(self, directory: str) -> int:
        """Every entry file under data/ (temp files of writes in flight are not counted)."""
        return _walk(os.path.join(directory, layout.DATA_DIR), skip=layout.is_temp_name)


class DiskcacheHandle(Handle):
    maintenance_ops = tuple(peer for _, peer in MAINTENANCE)

    def size(self) -> int:
        return int(self.region.backend.cache.volume())

    def present(self, key: str) -> bool:
        return key in self.region.backend.cache  # a SELECT: no access time is written

    def maintenance(self, name: str) -> Callable[[], object]:
        return getattr(self.region.backend.cache, name)

    def counted_bytes(self, directory: str) -> int:
        """What volume() counts: the database file and value files (not the WAL or shm)."""
        return _walk(directory, skip=lambda name: name.endswith(("-wal", "-shm")))


def _walk(directory: str, skip: Callable[[str], bool]) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            if not skip(name):
                try:
                    total += os.lstat(os.path.join(root, name)).st_size
                except FileNotFoundError:
                    continue
    return total


def all_bytes(directory: str) -> int:
    return _walk(directory, skip=lambda name: False)
