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

from dogpile.cache.api import CacheMutex

from .remote import OUTAGE, RemoteGuard

log = logging.getLogger(__name__)

LOCK_MODES = ("both", "remote", "local")


def tier_mutex(
    mode: str,
    local: CacheMutex | None,
    remote: CacheMutex | None,
    guard: RemoteGuard,
    expired: tuple[type[BaseException], ...] = (),
) -> CacheMutex | None:
    """The mutex a tier's ``get_mutex`` returns for one key (None: dogpile's own lock).

    ``expired`` are the errors with which the remote's ``release`` says that its
    lock timed out while held (redis-py's ``LockNotOwnedError``).
    """
    if mode == "local" or remote is None:
        return local  # a remote without a distributed lock has nothing to add
    if local is None and mode == "both":
        mode = "remote"
    return TierMutex(mode, local, remote, guard, expired)


class TierMutex(CacheMutex):
    """``local`` then ``remote`` (mode "both"), or ``remote`` alone (mode "remote").

    dogpile shares one mutex object per key between threads, and only one
    holder exists at a time, so what the holder took is kept on the object.
    Any thread may release (dogpile's async creators do).
    """

    __slots__ = ("_expired", "_guard", "_held", "_local", "_mode", "_remote")

    def __init__(
        self,
        mode: str,
        local: CacheMutex | None,
        remote: CacheMutex,
        guard: RemoteGuard,
        expired: tuple[type[BaseException], ...] = (),
    ) -> None:
        self._mode = mode
        self._expired = expired
        self._local = local
        self._remote = remote
        self._guard = guard
        self._held: tuple[bool, bool] = (False, False)  # (local, remote) held by the holder

    def acquire(self, wait: bool = True) -> bool:
        local_held = False
        if self._mode == "both":
            assert self._local is not None
            if not self._local.acquire(wait):
                return False
            local_held = True
        try:
            got = self._guard.call(self._remote.acquire, wait)
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

    def release(self) -> None:
        local_held, remote_held = self._held
        self._held = (False, False)
        try:
            if remote_held:
                self._release_remote()
        finally:
            if local_held:
                self._local.release()  # type: ignore[union-attr]

    def _release_remote(self) -> None:
        try:
            self._guard.call(self._remote.release)
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
        if self._local is not None and self._local.locked():
            return True
        held = self._guard.call(self._remote.locked)
        return held is not OUTAGE and bool(held)

    def __repr__(self) -> str:
        return f"<TierMutex {self._mode}: {self._local!r} then {self._remote!r}>"
