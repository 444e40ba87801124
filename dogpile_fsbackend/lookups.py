"""Counting hits and misses as callers see them: one per lookup.

On a miss, dogpile's ``get_or_create`` waits for the key's mutex and looks
again, because another thread or process may have created the value
meanwhile (``dogpile.lock.Lock._enter_create``).  That second look is part of
the same call: counted as a second miss, it doubled the misses of every
``cache_on_arguments`` miss.  So the backend hands out its key mutexes wrapped
in :class:`RecheckingMutex`: a blocking acquire right after this thread missed
the same key marks this thread's next lookup of that key as the re-check,
whose outcome replaces the first look's instead of adding to it.  A call
therefore counts one miss when its creator runs, and one hit when it returns
a cached value, even one that another process created while it waited.

With ``distributed_lock=False`` (and on a read-only cache, which may not
lock its lock file) a :class:`ThreadMutex` of ours stands where dogpile's own
in-process lock would, so that the re-check is seen there too.
"""

from __future__ import annotations

import threading
import weakref

from dogpile.cache.api import CacheMutex

from . import forking


class LookupTracker(threading.local):
    """Per thread: the key whose lookup just missed, and whether a re-check of it is due."""

    missed: str | None = None
    recheck: str | None = None

    def is_recheck(self, key: str | None, found: bool) -> bool:
        """Record a lookup of ``key``; True if it is dogpile's re-check of a counted miss."""
        pending = self.recheck
        if pending is not None:
            self.recheck = None
        recheck = key is not None and pending == key
        missed = None if found or recheck else key
        if self.missed is not missed:  # a hit with nothing pending writes nothing
            self.missed = missed
        return recheck


class RecheckingMutex(CacheMutex):
    """A key's mutex that tells the tracker when dogpile takes it to look again."""

    __slots__ = ("_key", "_mutex", "_tracker")

    def __init__(self, mutex: CacheMutex, tracker: LookupTracker, key: str) -> None:
        self._mutex = mutex
        self._tracker = tracker
        self._key = key

    def acquire(self, wait: bool = True) -> bool:
        acquired = self._mutex.acquire(wait)
        if acquired and wait and self._tracker.missed == self._key:
            self._tracker.recheck = self._key
        return acquired

    def release(self) -> None:
        if self._tracker.recheck == self._key:  # released without looking again
            self._tracker.recheck = None
        self._mutex.release()

    def locked(self) -> bool:
        return self._mutex.locked()

    def __repr__(self) -> str:
        return repr(self._mutex)


class ThreadMutex(CacheMutex):
    """A key's mutex among this process's threads only; get it from :class:`ThreadMutexes`."""

    __slots__ = ("_held", "_lock")

    def __init__(self, held: set[ThreadMutex]) -> None:
        self._lock = threading.Lock()
        self._held = held

    def acquire(self, wait: bool = True) -> bool:
        if not self._lock.acquire(wait):
            return False
        self._held.add(self)
        return True

    def release(self) -> None:
        self._lock.release()
        self._held.discard(self)

    def locked(self) -> bool:
        return self._lock.locked()


class ThreadMutexes:
    """The key mutexes of one backend with ``distributed_lock=False`` (or a read-only one).

    A key's mutex lives while someone references or holds it, so a lock taken
    through one ``get_mutex`` call can be released through another (as with the
    lock file), and the keys of a long-running process are not kept forever.
    """

    def __init__(self) -> None:
        self._reset()
        forking.reset_in_children(self)

    def _reset(self) -> None:
        """A forked child starts afresh: it has none of the threads that held a key's
        mutex (or the guard) at fork(), so it must not wait for them."""
        self._guard = threading.Lock()
        self._mutexes: weakref.WeakValueDictionary[str, ThreadMutex] = (
            weakref.WeakValueDictionary()
        )
        self._held: set[ThreadMutex] = set()

    _reset_after_fork = _reset  # see forking.py

    def get(self, key: str) -> ThreadMutex:
        with self._guard:
            mutex = self._mutexes.get(key)
            if mutex is None:
                mutex = self._mutexes[key] = ThreadMutex(self._held)
            return mutex

    def is_held(self, key: str) -> bool:
        """True while some thread of this process holds ``key``'s mutex."""
        with self._guard:
            mutex = self._mutexes.get(key)
        return mutex is not None and mutex.locked()
