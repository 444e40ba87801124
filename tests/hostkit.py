"""Simulated hosts: spawned processes that run the commands a test sends them.

A host's process calls :func:`serve` with a function that handles one
command; the test drives it through a :class:`ProcessHost`.  What a host is
(its backend, its base_dir) is up to the kit that starts it (tieredkit.py,
s3kit.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from conftest import SPAWN, WAIT

STOP_WAIT = 5  # seconds for an idle host to stop by itself before it is killed


def serve(handle: Callable[[str, list[Any]], Any], inbox: Any, outbox: Any) -> None:
    """Answer each command from ``inbox`` with ``handle(command, args)``, until "stop".

    An exception is answered as an error (with its type and message), and the
    host goes on; an unknown command is one.
    """
    outbox.put(("ready", os.getpid()))
    while True:
        command, *args = inbox.get()
        if command == "stop":
            outbox.put(("ok", None))
            return
        try:
            answer = handle(command, args)
        except Exception as exc:
            outbox.put(("error", f"{type(exc).__name__}: {exc}"))
        else:
            outbox.put(("ok", answer))


def unknown(command: str) -> ValueError:
    return ValueError(f"unknown command {command!r}")


class ProcessHost:
    """A simulated host: ``target(*args, inbox, outbox)`` in a spawned process."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        self._inbox, self._outbox = SPAWN.Queue(), SPAWN.Queue()
        self.process = SPAWN.Process(
            target=target, args=(*args, self._inbox, self._outbox), daemon=True
        )
        self.process.start()
        kind, self.pid = self._outbox.get(timeout=WAIT)
        assert kind == "ready"

    def __call__(self, command: str, *args: Any, timeout: float = 2 * WAIT) -> Any:
        self.send(command, *args)
        return self.answer(timeout)

    def send(self, command: str, *args: Any) -> None:
        """Send without waiting (for a command that answers later, or never)."""
        self._inbox.put((command, *args))

    def answer(self, timeout: float = 2 * WAIT) -> Any:
        """The answer to the oldest command sent and not yet answered."""
        kind, answer = self._outbox.get(timeout=timeout)
        if kind == "error":
            raise AssertionError(f"host {self.pid}: {answer}")
        return answer

    def close(self) -> None:
        """Stop the host: by its "stop" command if it is idle (so that it exits as a
        process does, and coverage keeps what it ran), else by SIGKILL."""
        if self.process.is_alive():
            self.send("stop")
            self.process.join(STOP_WAIT)
        if self.process.is_alive():
            self.process.kill()
        self.process.join(WAIT)
