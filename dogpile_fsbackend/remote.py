"""The shared tier behind a local cache: loading it by name, and living through its outages.

Every call to a remote tier (values, locks, pub/sub publishes) goes through one
:class:`RemoteGuard`.  A failure the guard recognises as an outage (a refused or
timed-out connection, a server that answers with an error) opens it: for a
back-off period (doubling on each failed probe, up to a cap) no call touches the
network, and then a single thread probes the remote while the others carry on
without it.  So a dead Redis costs each process one bounded attempt per back-off
period, never a retry storm.  The one exception is the release of a lock the
remote holds for this process (:meth:`RemoteGuard.call_anyway`): skipping it
would keep the key locked on every host.  A forked child forgets a probe in
progress: the thread making it stayed in the parent.

What a call does while the remote is out depends on ``remote_errors``:
``"raise"`` raises :class:`RemoteError` naming the remote, ``"degrade"``
returns :data:`OUTAGE` so that the caller serves and writes locally.  The
transition to an outage and back is logged once each.
"""

from __future__ import annotations

import enum
import importlib
import logging
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal, TypeVar

from dogpile.cache.api import CacheBackend
from dogpile.cache.region import (  # type: ignore[attr-defined]  # dogpile's one registry
    _backend_loader,
)
from dogpile.util import PluginLoader

from . import forking
from .exceptions import ConfigError, MissingExtraError, RemoteError

log = logging.getLogger(__name__)

T = TypeVar("T")
REMOTE_ERRORS = ("raise", "degrade")


class _Outage(enum.Enum):
    OUTAGE = "OUTAGE"


OUTAGE: Final = _Outage.OUTAGE
"""Returned by :meth:`RemoteGuard.call` instead of a result when degrading."""
Outage = Literal[_Outage.OUTAGE]


def require_extra(module: str, extra: str, feature: str) -> Any:
    """The module ``module`` of the optional extra ``extra``, or MissingExtraError
    saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{feature} needs {module}, an optional extra: pip install dogpile_fsbackend[{extra}]"
        ) from exc


def load_backend(name: Any, argument: str) -> type[CacheBackend]:
    """The dogpile backend class registered as ``name`` (``"dogpile.cache.redis"``)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(
            argument, "the name of a dogpile.cache backend, e.g. 'dogpile.cache.redis'", name
        )
    try:
        backend_class: type[CacheBackend] = _backend_loader.load(name)  # type: ignore[no-untyped-call]
    except PluginLoader.NotFound as exc:
        raise ConfigError(
            argument, "the name of an installed dogpile.cache backend", name
        ) from exc
    return backend_class


def describe(backend_name: str, arguments: Mapping[str, Any]) -> str:
    """How messages name a remote: its backend and address, never its password."""
    url = arguments.get("url")
    if isinstance(url, str):
        parts = urllib.parse.urlsplit(url)
        if parts.password is not None:
            host = parts.hostname or ""
            port = f":{parts.port}" if parts.port else ""
            user = f"{parts.username}:***@" if parts.username else ":***@"
            url = parts._replace(netloc=f"{user}{host}{port}").geturl()
        return f"{backend_name} at {url}"
    if "host" in arguments or "port" in arguments:
        host = arguments.get("host", "localhost")
        return f"{backend_name} at {host}:{arguments.get('port', 6379)}/{arguments.get('db', 0)}"
    return backend_name


def not_listable(method: str, remote: str) -> NotImplementedError:
    """Why a tiered cache has no ``keys()`` or ``delete_matching()``: the keys that count
    are in the remote tier, which a dogpile backend (or a bucket named by digests) cannot
    list, and a prefix delete of this host's copies alone would leave the values in the
    remote and on every other host, to be served again."""
    if method == "keys":
        action = "cannot list the keys of a tiered cache"
        instead = "backend.local.keys(prefix) lists this host's copies only"
    else:
        action = "cannot delete by prefix on a tiered cache: other hosts' copies and"
        action += " the remote's values would stay, to be served again"
        instead = (
            "delete the keys by name (region.delete_multi reaches the remote and every "
            "host), or drop this host's copies only with backend.local.delete_matching(prefix)"
        )
    return NotImplementedError(
        f"{method}(): {action}; the remote tier {remote} cannot list its keys. Instead, {instead}"
    )


class RemoteGuard:
    """One remote tier's calls: outages recognised, remembered, and probed sparingly.

    :param name: how errors and log lines name the remote (see :func:`describe`).
    :param error_types: exceptions that mean the remote is out (not a bug of ours).
    :param mode: ``"raise"`` or ``"degrade"`` (``remote_errors``).
    :param backoff: seconds without calls after the first failure.
    :param backoff_max: the longest pause; each failed probe doubles it up to this.
    """

    def __init__(
        self,
        name: str,
        error_types: tuple[type[BaseException], ...],
        mode: str,
        backoff: float,
        backoff_max: float,
    ) -> None:
        self.name = name
        self.error_types = error_types
        self.mode = mode
        self.backoff = backoff
        self.backoff_max = max(backoff, backoff_max)
        self._lock = threading.Lock()
        self._down_since: float | None = None  # monotonic time of the first failure
        self._retry_at = 0.0
        self._delay = 0.0
        self._probing = False
        self._last_error: BaseException | None = None
        self.attempts = self.failures = self.skipped = 0
        forking.reset_in_children(self)

    def _reset_after_fork(self) -> None:
        """In a forked child: the thread that probed (or held the lock) did not survive."""
        self._lock = threading.Lock()
        self._probing = False

    @property
    def healthy(self) -> bool:
        """True unless an outage is in progress (the last call failed)."""
        return self._down_since is None

    def call(self, function: Callable[..., T], *args: Any) -> T | Outage:
        """``function(*args)``, or :data:`OUTAGE` (degrade) / :class:`RemoteError` (raise)."""
        admitted = self._admit()
        if admitted is None:
            self.skipped += 1
            return self._unavailable(None)
        return self._attempt(function, args, probing=admitted)

    def call_anyway(self, function: Callable[..., T], *args: Any) -> T | Outage:
        """Like :meth:`call`, but made during a back-off too.

        For what must not be skipped, such as releasing a lock that the remote
        holds for this process: skipped, it would stay held on every host
        until it times out.
        """
        return self._attempt(function, args, probing=False)

    def _attempt(self, function: Callable[..., T], args: Any, probing: bool) -> T | Outage:
        self.attempts += 1
        try:
            result = function(*args)
        except self.error_types as exc:
            self._failed(exc)
            return self._unavailable(exc)
        finally:
            if probing:
                self._probing = False
        if self._down_since is not None:
            self._recovered()
        return result

    def stats(self) -> dict[str, Any]:
        return {
            "remote_healthy": self.healthy,
            "remote_attempts": self.attempts,
            "remote_failures": self.failures,
            "remote_skipped": self.skipped,
        }

    # -- internals ----------------------------------------------------------------

    def _admit(self) -> bool | None:
        """None: leave the remote alone now; True: this call is the probe; False: healthy."""
        if self._down_since is None:
            return False
        with self._lock:
            if self._probing or time.monotonic() < self._retry_at:
                return None
            self._probing = True  # this thread probes; the others carry on without the remote
            return True

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        now = time.monotonic()
        with self._lock:
            self._last_error = exc
            first = self._down_since is None
            if first:
                self._down_since = now
                self._delay = self.backoff
            elif now >= self._retry_at:  # a probe failed: wait longer before the next one
                self._delay = min(self._delay * 2, self.backoff_max)
            else:
                return  # a call that was in flight when the outage began
            # Jitter keeps the processes of a farm from probing in lockstep.
            self._retry_at = now + self._delay * random.uniform(0.75, 1.0)
        if first:
            action = (
                "raising RemoteError"
                if self.mode == "raise"
                else "serving and writing locally, with local locks"
            )
            log.warning(
                "remote tier %s is unavailable (%s: %s); %s until it answers again "
                "(next attempt in %.1f s)",
                self.name,
                type(exc).__name__,
                exc,
                action,
                self._delay,
            )
        else:
            log.debug("remote tier %s still unavailable: %r", self.name, exc)

    def _recovered(self) -> None:
        with self._lock:
            since = self._down_since
            if since is None:
                return
            self._down_since = None
            self._last_error = None
        log.warning(
            "remote tier %s is back after %.1f s of outage", self.name, time.monotonic() - since
        )

    def _unavailable(self, exc: BaseException | None) -> Outage:
        if self.mode == "degrade":
            return OUTAGE
        cause = exc or self._last_error
        if exc is None:
            wait = max(0.0, self._retry_at - time.monotonic())
            detail = f"it failed recently ({cause!r}); next attempt in {wait:.1f} s"
        else:
            detail = f"{type(exc).__name__}: {exc}"
        raise RemoteError(f"remote tier {self.name} is unavailable: {detail}") from cause
