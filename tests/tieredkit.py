"""Helpers of the tiered tests: regions on a real Redis, simulated hosts, bounded waits.

A simulated host is a process with a ``base_dir`` of its own: what distinguishes
hosts for the tiered backend is the local tier they share, or not.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import hostkit
from conftest import WAIT
from dogpile.cache import make_region
from dogpile.cache.region import CacheRegion

from dogpile_fsbackend import SharedInvalidation

FAST_BACKOFF = {"remote_backoff": 0.2, "remote_backoff_max": 0.5}


def arguments(url: str, base_dir: str, remote: dict | None = None, **top: Any) -> dict[str, Any]:
    """Tiered arguments that raise no pitfall warning (the suite turns warnings into errors)."""
    return {
        "local": {"base_dir": base_dir, "cache_size": 64 * 1024**2},
        "remote_backend": "dogpile.cache.redis",
        "remote": {
            "url": url,
            "distributed_lock": True,
            "lock_timeout": 30,
            "lock_sleep": 0.01,
            **(remote or {}),
        },
        **top,
    }


def region(
    url: str,
    base_dir: str,
    remote: dict | None = None,
    expiration_time: float | None = None,
    shared_invalidation: bool = False,
    **top: Any,
) -> CacheRegion:
    """A tiered region; ``shared_invalidation``: with a SharedInvalidation on ``base_dir``."""
    configured = make_region().configure(
        "dogpile_fsbackend.tiered",
        expiration_time=expiration_time,
        arguments=arguments(url, base_dir, remote, **top),
        region_invalidator=SharedInvalidation(base_dir) if shared_invalidation else None,
    )
    listener = configured.backend.listener
    if listener is not None:  # so that a test's first read may trust what it wrote
        assert listener.wait_connected(WAIT), "the invalidation listener never subscribed"
    return configured


def wait_until(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> float:
    """Poll ``condition`` until it is true; seconds taken.  Fails after ``timeout``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.002)
    return time.monotonic() - start


class PortWatcher:
    """Listens on a dead server's port and counts the connections made to it.

    Not a fake Redis: it accepts and closes, so every attempt fails the way a
    crashed server's port does, and :attr:`connections` says how many there were.
    """

    def __init__(self, port: int) -> None:
        self._socket = socket.socket()
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", port))
        self._socket.listen(128)
        self._socket.settimeout(0.05)
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        self._socket.close()


@contextlib.contextmanager
def watching(port: int) -> Iterator[PortWatcher]:
    watcher = PortWatcher(port)
    try:
        yield watcher
    finally:
        watcher.close()


# -- simulated hosts ------------------------------------------------------------------

MISS = "<miss>"  # what a host reports for NO_VALUE (which does not pickle across processes)


def _host_main(url: str, base_dir: str, top: dict, inbox: Any, outbox: Any) -> None:
    """A simulated host's process: runs the commands it is sent, answers each one."""
    from dogpile.cache.api import NO_VALUE

    tier = region(url, base_dir, **top)
    held = {}

    def handle(command: str, args: list[Any]) -> Any:
        if command == "get":
            value = tier.get(args[0])
            return MISS if value is NO_VALUE else value
        if command == "set":
            return tier.set(args[0], args[1])
        if command == "delete":
            return tier.delete(args[0])
        if command == "invalidate":  # region.invalidate(hard)
            return tier.invalidate(args[0])
        if command == "get_or_create":  # (key, value): the value is created if needed
            return tier.get_or_create(args[0], lambda: args[1])
        if command == "poll":  # until get(key) == expected; seconds taken
            return _poll(tier, *args)
        if command == "hold":  # take a key's mutex and keep it
            held[args[0]] = tier.backend.get_mutex(args[0])
            return held[args[0]].acquire()
        if command == "try":  # acquire(False) and release: is the key locked elsewhere?
            mutex = tier.backend.get_mutex(args[0])
            acquired = mutex.acquire(False)
            if acquired:
                mutex.release()
            return acquired
        if command == "acquire":  # blocking acquire and release; seconds taken
            mutex = tier.backend.get_mutex(args[0])
            started = time.monotonic()
            mutex.acquire()
            waited = time.monotonic() - started
            mutex.release()
            return waited
        if command == "stats":
            return tier.backend.stats()
        raise hostkit.unknown(command)

    hostkit.serve(handle, inbox, outbox)


def _poll(tier: CacheRegion, key: str, expected: Any) -> float:
    from dogpile.cache.api import NO_VALUE

    def seen() -> bool:
        value = tier.get(key)
        return (MISS if value is NO_VALUE else value) == expected

    return wait_until(seen, f"{key!r} == {expected!r} on this host")


class Host(hostkit.ProcessHost):
    """A simulated host: a spawned process with a base_dir of its own."""

    def __init__(self, url: str, base_dir: str, **top: Any) -> None:
        super().__init__(_host_main, url, base_dir, top)


@contextlib.contextmanager
def host_pool() -> Iterator[Callable[..., Host]]:
    """``start(url, base_dir, **top)`` starts a simulated host; all are stopped at the end."""
    started: list[Host] = []

    def start(url: str, base_dir: str, **top: Any) -> Host:
        host = Host(url, base_dir, **top)
        started.append(host)
        return host

    try:
        yield start
    finally:
        for host in started:
            host.close()


def redis_client(url: str) -> Any:
    """A plain redis-py client, for looking at (or writing to) Redis behind the tiers."""
    import redis

    return redis.Redis.from_url(url, socket_timeout=5)


def blocked_lockf_waiters(path: str) -> int:
    """Processes blocked in the kernel waiting for a record lock on ``path`` (/proc/locks)."""
    info = os.stat(path)
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    with open("/proc/locks") as locks:
        return sum(1 for line in locks if "->" in line and f" {device} " in line)
