"""Helpers of the tiered tests: regions on a real Redis, simulated hosts, bounded waits.

A simulated host is a process with a ``base_dir`` of its own: what distinguishes
hosts for the tiered backend is the local tier they share, or not.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from conftest import WAIT
from dogpile.cache import make_region
from dogpile.cache.region import CacheRegion

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
    **top: Any,
) -> CacheRegion:
    configured = make_region().configure(
        "dogpile_fsbackend.tiered",
        expiration_time=expiration_time,
        arguments=arguments(url, base_dir, remote, **top),
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
