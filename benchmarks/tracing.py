"""Deterministic counts of a child process: syscalls (``strace -f``, between marker
calls) and instructions (``valgrind --tool=callgrind``).

Wall times on a shared 2-core VM swing by 30% or more; these counts do not.
Both tools are Debian packages (``apt-get install strace valgrind``); when one
is missing its counts are skipped, never faked.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ZERO_MARKER, DUMP_MARKER = "getppid", "getsid"  # what opcases.py calls around each loop
_TIMEOUT_S = 900


def strace_path() -> str | None:
    return shutil.which("strace")


def valgrind_path() -> str | None:
    return shutil.which("valgrind")


def child_env(tmp: str) -> dict[str, str]:
    """The same interpreter state in every counted run: fixed hash seed, no .pyc writes."""
    env = dict(os.environ)
    env.update(PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1", TMPDIR=tmp)
    return env


def opcases_command(*args: str) -> list[str]:
    return [sys.executable, os.path.join(HERE, "opcases.py"), *args]


def run_checked(command: Sequence[str], env: dict[str, str]) -> None:
    done = subprocess.run(
        command, cwd=HERE, env=env, capture_output=True, text=True, timeout=_TIMEOUT_S
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(command[:6])} ... failed:\n" + "\n".join(tail))


def strace_marked_counts(command: Sequence[str], output: str, env: dict[str, str]) -> Counter[str]:
    """Calls per syscall name (failed calls included) that ``command`` and its threads
    make between its ``ZERO_MARKER`` and ``DUMP_MARKER`` calls: only the loop, so that
    start-up and one-time work that depends on timing (a due recount, a lazy import)
    never leaks into a count."""
    strace = strace_path()
    if strace is None:
        raise RuntimeError("strace is not installed")
    run_checked([strace, "-f", "-o", output, *command], env)
    with open(output) as handle:
        return parse_strace_between_markers(handle)


def parse_strace_between_markers(lines: Iterable[str]) -> Counter[str]:
    """Syscall names of ``strace -f -o`` lines (``PID name(args) = result``) between the
    first ``ZERO_MARKER`` call and the next ``DUMP_MARKER`` call of the traced process
    (the first PID; its threads' calls between them count too), each call once (its
    ``<... name resumed>`` half is not counted again; signals and exits are no calls)."""
    counts: Counter[str] = Counter()
    counting = False
    traced = None
    for line in lines:
        pid, _, call = line.partition(" ")
        traced = traced or pid
        name, paren, _ = call.lstrip().partition("(")
        if not paren or not name.isidentifier():
            continue  # "<... name resumed>", "--- SIGCHLD ...", "+++ exited ..."
        if name == ZERO_MARKER and not counting and pid == traced:
            counting = True
        elif name == DUMP_MARKER and counting and pid == traced:
            return counts
        elif counting:
            counts[name] += 1
    raise ValueError(f"no {ZERO_MARKER}() ... {DUMP_MARKER}() loop in the strace output")


def callgrind_loops(command: Sequence[str], out_dir: str, env: dict[str, str]) -> list[int]:
    """Instructions (Ir) of each marked loop of ``command``, in order.

    callgrind zeroes its counters when the program enters ``getppid`` and
    writes a profile when it enters ``getsid``: one profile per loop, nothing
    of start-up, imports or set-up.
    """
    valgrind = valgrind_path()
    if valgrind is None:
        raise RuntimeError("valgrind is not installed")
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, "callgrind.out")
    run_checked(
        [
            valgrind,
            "--tool=callgrind",
            f"--callgrind-out-file={base}",
            f"--zero-before={ZERO_MARKER}",
            f"--dump-before={DUMP_MARKER}",
            *command,
        ],
        env,
    )
    dumps = sorted(glob.glob(base + ".*"), key=lambda p: int(p.rsplit(".", 1)[1]))
    return [_callgrind_total(path) for path in dumps]


def _callgrind_total(path: str) -> int:
    """The profile's ``summary:`` (what callgrind_annotate shows as PROGRAM TOTALS).

    Not ``totals:``: in a profile dumped mid-run that also carries cost of the
    calls still on the stack from before the counters were zeroed.
    """
    with open(path) as handle:
        for line in handle:
            if line.startswith("summary:"):
                return int(line.split()[1])
    raise RuntimeError(f"no summary line in {path}")
