"""One creator across hosts: the local kernel lock, then the remote's distributed lock.

``lock="both"`` (the default) takes this host's ``lockf`` key lock first, so the
processes of one host queue in the kernel (woken the moment it is released) and
only one of them per host polls the remote lock; then it takes the remote's
lock, which excludes the other hosts.  ``"remote"`` takes only the remote lock
(every waiting process polls it), ``"local"`` only this host's (one creator per
host).  If the remote is out and ``remote_errors="degrade"``, a tier mutex falls
back to the local lock: each host stays a correct single-host cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from dogpile.cache.api import CacheMutex

from .remote import OUTAGE, Outage, RemoteGuard

log = logging.getLogger(__name__)

LOCK_MODES = ("both", "remote", "local")


def tier_mutex(
    mode: str,
    local: CacheMutex | None,
    remote: CacheMutex | None,
    guard: RemoteGuard,
    expired: tuple[type[BaseException], ...] = (),
    written_since: Callable[[float], bool] | None = None,
) -> CacheMutex | None:
    """The mutex a tier's ``get_mutex`` returns for one key (None: dogpile's own lock).

    ``expired`` are the errors with which the remote's ``release`` says that its
    lock timed out while held (redis-py's ``LockNotOwnedError``).
    ``written_since(t)`` says whether the local tier got a value for the key at
    or after ``t`` (``time.time()``); see :class:`TierMutex`.
    """
    if mode == "local" or remote is None:
        return local  # a remote without a distributed lock has nothing to add
    if local is None and mode == "both":
        mode = "remote"
    return TierMutex(mode, local, remote, guard, expired, written_since)


class TierMutex(CacheMutex):
    """``local`` then ``remote`` (mode "both"), or ``remote`` alone (mode "remote").

    With mode "both", a process that had to wait for this host's lock and finds
    that the holder left a value in the local tier meanwhile takes the local
    lock alone: dogpile only re-reads the value under it, so the processes of a
    host queue in the kernel and never touch the remote lock after a creator of
    their own host.

    dogpile shares one mutex object per key between threads, and only one
    holder exists at a time, so what the holder took is kept on the object.
    With mode "both" this host's lock makes sure of that; with "remote" a
    thread lock of the object does, or a thread falling back to this host's
    lock during an outage would join a holder of the remote lock.  Any thread
    may release (dogpile's async creators do).
    """

    __slots__ = (
        "_expired",
        "_guard",
        "_held",
        "_local",
        "_mode",
        "_one_holder",
        "_remote",
        "_written_since",
    )

    def __init__(
        self,
        mode: str,
        local: CacheMutex | None,
        remote: CacheMutex,
        guard: RemoteGuard,
        expired: tuple[type[BaseException], ...] = (),
        written_since: Callable[[float], bool] | None = None,
    ) -> None:
        self._mode = mode
        self._expired = expired
        self._local = local
        self._remote = remote
        self._guard = guard
        self._written_since = written_since
        self._held: tuple[bool, bool] = (False, False)  # (local, remote) held by the holder
        self._one_holder = threading.Lock() if mode == "remote" else None

    def acquire(self, wait: bool = True) -> bool:
        one_holder = self._one_holder
        if one_holder is None:
            return self._acquire(wait)
        if not one_holder.acquire(wait):
            return False
        try:
            got = self._acquire(wait)
        except BaseException:
            one_holder.release()
            raise
        if not got:
            one_holder.release()
        return got

    def _acquire(self, wait: bool) -> bool:
        local_held = False
        if self._mode == "both":
            assert self._local is not None
            if not self._local.acquire(False):
                if not wait:
                    return False
                waited_from = time.time()
                self._local.acquire()
                if self._written_since is not None and self._written_since(waited_from):
                    self._held = (True, False)  # a creator of this host just finished
                    return True
            local_held = True
        try:
            got = self._acquire_remote(wait)
            if got is OUTAGE:  # degrade: this host's lock alone keeps one creator per host
                if not local_held and self._local is not None:
                    if not self._local.acquire(wait):
                        return False
                    local_held = True
                self._held = (local_held, False)
                return True
            if not got:
                if local_held:
                    self._local.release()  # type: ignore[union-attr]
                return False
        except BaseException:
            if local_held:
                self._local.release()  # type: ignore[union-attr]
            raise
        self._held = (local_held, True)
        return True

    def _acquire_remote(self, wait: bool) -> bool | Outage:
        """The remote lock.  While the remote is out, a blocking acquire would be the
        guard's probe for as long as another holder keeps the lock, and every other
        call of this process would skip the remote meanwhile: probe without waiting."""
        if wait and not self._guard.healthy:
            got = self._guard.call(self._remote.acquire, False)
            if got is OUTAGE or got:
                return got
        return self._guard.call(self._remote.acquire, wait)

    def release(self) -> None:
        local_held, remote_held = self._held
        self._held = (False, False)
        try:
            if remote_held:
                self._release_remote()
        finally:
            if local_held:
                self._local.release()  # type: ignore[union-attr]
            if self._one_holder is not None:
                self._one_holder.release()

    def _release_remote(self) -> None:
        try:
            self._guard.call_anyway(self._remote.release)  # even during a back-off
        except self._expired:
            # The creator outlived the lock's timeout and the lock expired; another
            # host may have taken it and created the value meanwhile.
            log.warning(
                "the remote lock %r expired before its holder released it: the creator "
                "ran longer than the remote's lock_timeout, so another host may have "
                "created the value too; raise lock_timeout",
                self._remote,
            )

    def locked(self) -> bool:
        if self._one_holder is not None and self._one_holder.locked():
            return True
        if self._local is not None and self._local.locked():
            return True
        held = self._guard.call(self._remote.locked)
        return held is not OUTAGE and bool(held)

    def __repr__(self) -> str:
        return f"<TierMutex {self._mode}: {self._local!r} then {self._remote!r}>"
