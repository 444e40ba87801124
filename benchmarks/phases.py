"""Processes of one benchmark phase: spawned, released together, reporting on one queue.

Every process runs a *role*: a function that sets itself up, calls
``ready()`` (which tells the parent and waits at the phase's barrier, so all
roles start together) and returns its report, a dict.  The parent learns of a
failed set-up or a death without a report at once, never by a hung barrier.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

WAIT_S = 600.0  # the barrier: every process is importing and opening caches
PHASE_S = 4 * 3600.0  # a phase's reports: a 1M fill or a blocked eviction takes long

Ready = Callable[[], None]


def _run_role(
    role: str, results: Any, barrier: Any, target: Callable[..., dict[str, Any]], *args: Any
) -> None:
    """Run one role and put its report (or its traceback) on the results queue.

    The role calls ``ready()`` once it is set up: that says so on the queue (so
    the parent learns of a failed set-up at once) and waits at the barrier.
    """

    def ready() -> None:
        results.put({"role": role, "ready": True})
        barrier.wait(WAIT_S)

    try:
        report = target(ready, *args)
    except BaseException:
        report = {"error": traceback.format_exc()}
    report["role"] = role
    results.put(report)


class Phase:
    """Processes started together, released by one barrier (the parent is a party too),
    reporting on one queue.  Leaving the block with an error stops every process."""

    def __init__(self, parties: int) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self.barrier = self._ctx.Barrier(parties + 1)
        self.stop = self._ctx.Event()
        self._results = self._ctx.Queue()
        self._processes: dict[str, Any] = {}
        self._ready: dict[str, Any] = {}
        self.reports: dict[str, dict[str, Any]] = {}

    def start(self, role: str, target: Callable[..., dict[str, Any]], *args: Any) -> None:
        process = self._ctx.Process(
            target=_run_role,
            args=(role, self._results, self.barrier, target, *args),
            name=role,
            daemon=True,
        )
        process.start()
        self._processes[role] = process

    def event(self) -> Any:
        """One more event for the processes of this phase (pass it when starting them)."""
        return self._ctx.Event()

    def release(self) -> int:
        """Wait until every process is ready and let them all go; the release time (ns)."""
        self._wait_for(self._ready, list(self._processes), WAIT_S)
        self.barrier.wait(WAIT_S)
        return time.monotonic_ns()

    def collect(self, roles: Sequence[str], timeout: float = PHASE_S) -> None:
        """Wait for the reports of ``roles``; an error or a silent death raises."""
        self._wait_for(self.reports, roles, timeout)

    def _wait_for(self, got: dict[str, Any], roles: Sequence[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(role not in got for role in roles):
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing from {sorted(set(roles) - set(got))}")
            try:
                message = self._results.get(timeout=1.0)
            except queue.Empty:  # check that nobody died without a word
                dead = [
                    role
                    for role, process in self._processes.items()
                    if role not in self.reports and process.exitcode is not None
                ]
                if dead:
                    raise RuntimeError(f"{dead} exited without a report") from None
                continue
            if "error" in message:
                raise RuntimeError(f"{message['role']} failed:\n{message['error']}")
            (self._ready if message.get("ready") else self.reports)[message["role"]] = message

    def __enter__(self) -> Phase:
        return self

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        self.stop.set()
        if error is not None:
            self.barrier.abort()
        for process in self._processes.values():
            process.join(timeout=60 if error is None else 5)
            if process.is_alive():  # only after an error or a hang: our own child, by handle
                process.terminate()
                process.join(timeout=10)
