"""Operation logs of the scale workload, and the true-LRU oracle they are judged against.

Every process that reads or writes logs each call as (monotonic timestamp in
ns taken just before the call, op, key id) in compact arrays: a million
entries cost 13 MB, not a million tuples.  Afterwards the logs of all
processes are merged by timestamp and replayed into an entry-count LRU
(``OrderedDict``) whose capacity is the number of entries the cache holds at
the end.  Evicted means ever set and absent at the end, for the cache and for
the oracle alike; precision is the share of the cache's evictions that true
LRU would also have made.

A get that found its entry is a use of it, so the oracle inserts it again if
it had dropped it: the cache was filled up to its limit before the oracle's
capacity (what is left at the end) was reached, and a key the cache still
served must not count as evicted just because a smaller LRU would have lost
it earlier.  The oracle then holds exactly the ``capacity`` most recently used
keys, a use being a set or a get that hit.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
from array import array
from collections.abc import Iterator, Sequence

SET, GET_HIT, GET_MISS = 1, 2, 3


def _stamps() -> array[int]:
    return array("q")


def _ops() -> array[int]:
    return array("B")


def _keys() -> array[int]:
    return array("i")


@dataclasses.dataclass
class OpLog:
    """One process's calls in call order (so sorted by timestamp); pickles compactly."""

    stamps: array[int] = dataclasses.field(default_factory=_stamps)
    ops: array[int] = dataclasses.field(default_factory=_ops)
    keys: array[int] = dataclasses.field(default_factory=_keys)

    def add(self, stamp_ns: int, op: int, key: int) -> None:
        self.stamps.append(stamp_ns)
        self.ops.append(op)
        self.keys.append(key)

    def __len__(self) -> int:
        return len(self.stamps)

    def events(self) -> Iterator[tuple[int, int, int]]:
        return zip(self.stamps, self.ops, self.keys, strict=True)


def merged(logs: Sequence[OpLog]) -> Iterator[tuple[int, int, int]]:
    """Every logged call of every process, by timestamp (ties: op, then key id)."""
    return heapq.merge(*(log.events() for log in logs))


def ever_set(logs: Sequence[OpLog], key_count: int) -> bytearray:
    """1 for every key id that some process set."""
    flags = bytearray(key_count)
    for log in logs:
        for op, key in zip(log.ops, log.keys, strict=True):
            if op == SET:
                flags[key] = 1
    return flags


def lru_survivors(logs: Sequence[OpLog], capacity: int, key_count: int) -> bytearray:
    """1 for every key an exact LRU cache of ``capacity`` entries holds after the history.

    A set, or a get that hit, inserts the key (or refreshes it) and evicts the
    least recently used key beyond ``capacity``; a get that missed refreshes a
    key the oracle holds and inserts nothing.
    """
    order: collections.OrderedDict[int, None] = collections.OrderedDict()
    for _, op, key in merged(logs):
        if key in order:
            order.move_to_end(key)
        elif op != GET_MISS:
            order[key] = None
            if len(order) > capacity:
                order.popitem(last=False)
    survivors = bytearray(key_count)
    for key in order:
        survivors[key] = 1
    return survivors


@dataclasses.dataclass(frozen=True)
class Precision:
    evicted: int  # by the cache: ever set, absent at the end
    agreed: int  # of those, also evicted by the oracle
    oracle_evicted: int

    @property
    def value(self) -> float | None:
        return self.agreed / self.evicted if self.evicted else None


def precision(set_keys: bytearray, present: bytearray, oracle: bytearray) -> Precision:
    """|evicted by the cache ∩ evicted by the oracle| / |evicted by the cache|."""
    evicted = agreed = oracle_evicted = 0
    for was_set, kept, oracle_kept in zip(set_keys, present, oracle, strict=True):
        if not was_set:
            continue
        if not oracle_kept:
            oracle_evicted += 1
        if not kept:
            evicted += 1
            agreed += not oracle_kept
    return Precision(evicted, agreed, oracle_evicted)
