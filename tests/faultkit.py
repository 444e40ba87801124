"""Helpers of the trust tests (crash, faults, security, soak, fork).

* Self-verifying values: every value carries its key, who wrote it, a
  sequence number and a checksum, so a wrong value (another key's, or one
  never written) and a torn value (a mix of two writes, a truncated file) are
  told apart from a good one without knowing which write won.
* What is on disk: the bytes and entries the accounting should report, and any
  temp file, counted by walking the directory ourselves.
* Crash points: a profiler hook that SIGKILLs the process when execution
  reaches a chosen function (Python or builtin), so a kill lands exactly there.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from conftest import WAIT
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE, CachedValue

from dogpile_fsbackend import layout


def pickled(base_dir, **arguments):
    """A region on the pickled backend at ``base_dir``."""
    return make_region().configure(
        "dogpile_fsbackend.pickled", arguments={"base_dir": str(base_dir), **arguments}
    )


def raw(base_dir, **arguments):
    """A region on the raw backend at ``base_dir``."""
    return make_region().configure(
        "dogpile_fsbackend.raw", arguments={"base_dir": str(base_dir), **arguments}
    )


# -- self-verifying values ----------------------------------------------------------


def _payload(key: str, writer: int, seq: int, size: int) -> bytes:
    seed = f"{key!r}|{writer}|{seq}".encode("utf-8", "surrogatepass")
    return hashlib.shake_256(seed).digest(size)


def _seal(key: str, writer: int, seq: int, payload: bytes) -> str:
    head = f"{key!r}|{writer}|{seq}|{len(payload)}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(head + payload).hexdigest()


def make_value(key: str, writer: int, seq: int, size: int) -> dict:
    """A picklable value that proves which write of which key it is."""
    payload = _payload(key, writer, seq, size)
    return {
        "key": key,
        "writer": writer,
        "seq": seq,
        "payload": payload,
        "sha": _seal(key, writer, seq, payload),
    }


def check_value(key: str, value: Any, writers: int | None = None) -> str | None:
    """None if ``value`` is a whole value written for ``key``; else what is wrong with it.

    ``writers`` bounds the writer ids that exist, so a value nobody wrote is caught.
    """
    if isinstance(value, CachedValue):
        value = value.payload
    if not isinstance(value, dict) or set(value) != {"key", "writer", "seq", "payload", "sha"}:
        return f"torn: not a value of this test: {value!r:.200}"
    if value["key"] != key:
        return f"wrong: value of key {value['key']!r} returned for {key!r}"
    writer, seq, payload = value["writer"], value["seq"], value["payload"]
    if value["sha"] != _seal(key, writer, seq, payload):
        return f"torn: checksum mismatch for {key!r} (writer {writer}, seq {seq})"
    if payload != _payload(key, writer, seq, len(payload)):
        return f"wrong: payload was never written for {key!r} (writer {writer}, seq {seq})"
    if writers is not None and not 0 <= writer < writers:
        return f"wrong: writer {writer} of {key!r} never ran"
    return None


def make_blob(key: str, writer: int, seq: int, size: int) -> bytes:
    """Raw-file content that proves which write of which key it is."""
    head = json.dumps([key, writer, seq, size]).encode() + b"\n"
    body = _payload(key, writer, seq, size)
    return head + body + hashlib.sha256(head + body).digest()


def check_blob(key: str, blob: bytes, writers: int | None = None) -> str | None:
    """None if ``blob`` is whole content written for ``key``; else what is wrong with it."""
    head, newline, rest = blob.partition(b"\n")
    try:
        found_key, writer, seq, size = json.loads(head)
    except ValueError:
        return f"torn: unreadable header {head[:80]!r} for {key!r}"
    if not newline or found_key != key:
        return f"wrong: content of key {found_key!r} returned for {key!r}"
    body, seal = rest[:-32], rest[-32:]
    if len(body) != size or hashlib.sha256(head + newline + body).digest() != seal:
        return f"torn: content of {key!r} (writer {writer}, seq {seq}) is cut or mixed"
    if body != _payload(key, writer, seq, size):
        return f"wrong: content was never written for {key!r}"
    if writers is not None and not 0 <= writer < writers:
        return f"wrong: writer {writer} of {key!r} never ran"
    return None


def read_raw(value: Any) -> bytes:
    """All bytes of a raw cache hit (from the start), closing the returned file."""
    reader = value.payload if isinstance(value, CachedValue) else value
    with reader:
        reader.seek(0)
        return reader.read()


def check_raw_hit(key: str, value: Any, writers: int | None = None) -> str | None:
    if value is NO_VALUE:
        return None
    return check_blob(key, read_raw(value), writers)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m dogpile_fsbackend ARGS`` in a new process, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "dogpile_fsbackend", *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )


def run_processes(procs: list[Any], results: Any) -> list[Any]:
    """Start ``procs``, take one result each from ``results`` (a queue), and join them:
    the results, once every process exited cleanly."""
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=WAIT * 4) for _ in procs]
    for proc in procs:
        proc.join(WAIT)
        assert proc.exitcode == 0
    return outcomes


def set_bytes(backend: Any, kind: str, key: str, value: bytes) -> None:
    """Store ``value`` under ``key`` on either backend ("pickled" or "raw")."""
    if kind == "raw":
        backend.set(key, io.BytesIO(value))
    else:
        backend.set_serialized(key, value)


def get_bytes(backend: Any, kind: str, key: str) -> bytes | None:
    """The bytes stored under ``key`` on either backend; None for a miss."""
    found = backend.get(key) if kind == "raw" else backend.get_serialized(key)
    if found is NO_VALUE:
        return None
    return read_raw(found) if kind == "raw" else found


def blob_file(blob: bytes) -> io.BytesIO:
    return io.BytesIO(blob)


# -- what is on disk ----------------------------------------------------------------


def disk_usage(base_dir: str) -> tuple[int, int]:
    """(bytes, entries) of the entry and data files under ``base_dir/data``, temp files excluded.

    This is what the shared accounting must report once it is repaired.
    """
    total = entries = 0
    for directory, _, names in os.walk(os.path.join(base_dir, layout.DATA_DIR)):
        for name in names:
            parsed = layout.split_entry_name(name)
            if parsed is None:
                continue
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(directory, name)).st_size
                entries += parsed[1] is None
    return total, entries


def temp_files(base_dir: str) -> list[str]:
    """Every temp file anywhere in the cache directory."""
    return [
        os.path.join(directory, name)
        for directory, _, names in os.walk(base_dir)
        for name in names
        if layout.TEMP_PREFIX in name
    ]


def foreign_files(base_dir: str) -> list[str]:
    """Files under data/ that are neither entries nor temp files."""
    return [
        os.path.join(directory, name)
        for directory, _, names in os.walk(os.path.join(base_dir, layout.DATA_DIR))
        for name in names
        if layout.split_entry_name(name) is None and not layout.is_temp_name(name)
    ]


def snapshot(root: str) -> dict[str, tuple]:
    """Names, kinds, sizes, modes, times and contents of everything under ``root``."""
    found = {}
    for directory, dirnames, names in os.walk(root):
        for name in dirnames + names:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            content = None
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as handle:
                    content = handle.read()
            elif os.path.islink(path):
                content = os.readlink(path)
            found[os.path.relpath(path, root)] = (
                info.st_mode,
                info.st_size,
                info.st_mtime_ns,
                info.st_ino,
                content,
            )
    return found


def tree_state(root: str, atimes: bool = True) -> dict[str, tuple]:
    """Everything a process could change under ``root`` (``root`` included): names, kinds,
    owners, modes, sizes, inodes, link counts, mtimes, ctimes, atimes (unless
    ``atimes=False``) and a digest of each file's content.

    Read with ``O_NOATIME`` (the test runs as root), so taking it changes no atime.
    """
    noatime = getattr(os, "O_NOATIME", 0)
    found: dict[str, tuple] = {}

    def visit(path: str, name: str) -> None:
        info = os.lstat(path)
        content: str | None = None
        if stat.S_ISREG(info.st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | noatime)
            try:
                digest = hashlib.sha256()
                while chunk := os.read(fd, 1 << 20):
                    digest.update(chunk)
                content = digest.hexdigest()
            finally:
                os.close(fd)
        elif stat.S_ISLNK(info.st_mode):
            content = os.readlink(path)
        found[name] = (
            info.st_mode,
            info.st_uid,
            info.st_gid,
            info.st_size,
            info.st_ino,
            info.st_nlink,
            info.st_mtime_ns,
            info.st_ctime_ns,
            # (reading a symlink, as this does, updates its atime: not compared)
            info.st_atime_ns if atimes and not stat.S_ISLNK(info.st_mode) else None,
            content,
        )
        if stat.S_ISDIR(info.st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | noatime)
            try:
                names = sorted(os.listdir(fd))
            finally:
                os.close(fd)
            for child in names:
                visit(os.path.join(path, child), os.path.join(name, child))

    visit(root, ".")
    return found


def keeps_atimes(directory: str) -> bool:
    """True if a plain read of a file in ``directory`` updates its atime (relatime,
    strictatime), so that comparing atimes shows whether anything read without care."""
    probe = os.path.join(directory, f"atime-probe-{os.getpid()}")
    with open(probe, "wb") as handle:
        handle.write(b"probe")
    try:
        an_hour_ago = time.time() - 3600
        os.utime(probe, (an_hour_ago, time.time()))
        with open(probe, "rb") as handle:
            handle.read()
        return os.stat(probe).st_atime > an_hour_ago + 1
    finally:
        os.unlink(probe)


def entry_path(backend: Any, key: str) -> str:
    return backend.store.layout.entry_path(layout.key_digest(layout.encode_key(key)))


def data_paths(backend: Any, key: str) -> list[str]:
    digest = layout.key_digest(layout.encode_key(key))
    return [path for path, _ in backend.store.data_files(digest)]


def age_temp_files(base_dir: str, seconds: float = 60.0) -> None:
    """Date every temp file ``seconds`` back: past the grace a scan gives a temp file
    whose writer's lock is free (see maintenance.TEMP_GRACE), without waiting for it."""
    when = time.time() - seconds
    for path in temp_files(base_dir):
        with contextlib.suppress(FileNotFoundError):
            os.utime(path, (when, when), follow_symlinks=False)


def wait_for_fs_clock(probe: str, past_ns: int) -> None:
    """Return once the filesystem stamps times later than ``past_ns``.

    File timestamps may come from a coarse clock (one tick is a few ms), so the
    probe asks the filesystem itself rather than ``time.time_ns()``.
    """
    deadline = time.monotonic() + WAIT
    with open(probe, "a"):
        pass
    while True:
        os.utime(probe)
        if os.stat(probe).st_mtime_ns > past_ns:
            return
        assert time.monotonic() < deadline, "the filesystem clock did not advance"
        time.sleep(0.0005)


def wait_until_reconcile_due(backend: Any, timeout: float = 30.0) -> None:
    """Wait (bounded) until the automatic reconciliation is due for ``backend``."""
    deadline = time.monotonic() + timeout
    while not backend.store.reconcile_due():
        if time.monotonic() > deadline:
            raise AssertionError("reconciliation never became due")
        time.sleep(0.01)


# -- processes and crash points -----------------------------------------------------


def kill_at(target: Callable, nth: int = 1) -> None:
    """SIGKILL this process when ``target`` is called for the ``nth`` time.

    ``target`` is a Python function (matched by code object) or a builtin such
    as ``os.replace`` (matched by identity).  The code under test runs
    unchanged; only the moment of death is chosen.
    """
    code = getattr(target, "__code__", None)
    calls = 0

    def hook(frame, event, arg):
        nonlocal calls
        if (event == "call" and code is not None and frame.f_code is code) or (
            event == "c_call" and code is None and arg is target
        ):
            calls += 1
            if calls == nth:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.setprofile(hook)


def fork_child(body: Callable[[], Any], error_file: str | None = None) -> int:
    """Fork a child that runs ``body`` and exits 0, or 3 after writing its error.

    The child never returns into the caller (the test runner) whatever happens.
    """
    pid = os.fork()
    if pid:
        return pid
    code = 3
    try:
        body()
        code = 0
    except BaseException:
        if error_file:
            import traceback

            with contextlib.suppress(Exception), open(error_file, "a") as handle:
                handle.write(f"pid {os.getpid()}:\n{traceback.format_exc()}\n")
    finally:
        os._exit(code)


def reap(pid: int, timeout: float = 60.0) -> int:
    """Wait (bounded) for a child; its wait status.  A child still alive is killed and fails."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not finish within {timeout} s")
        time.sleep(0.002)


def in_child(func: Callable[..., Any], *args: Any, timeout: float = 60.0) -> Any:
    """Run ``func(*args)`` in a forked child and return its (picklable) result.

    For what must not happen in the test runner itself: dropping privileges,
    lowering resource limits, or holding descriptors on a mount that the test
    unmounts.  An exception in the child is re-raised here with its traceback.
    """
    import pickle
    import select
    import traceback

    read_end, write_end = os.pipe()

    def body() -> None:
        os.close(read_end)
        try:
            outcome = ("ok", func(*args))
        except BaseException:
            outcome = ("error", traceback.format_exc())
        data = pickle.dumps(outcome)
        view = memoryview(data)
        while view:
            view = view[os.write(write_end, view) :]

    pid = fork_child(body)
    os.close(write_end)
    chunks = []
    poller = select.poll()  # not select.select: a long test run holds fds past 1024
    poller.register(read_end, select.POLLIN)
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                break
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
    status = reap(pid, max(1.0, deadline - time.monotonic()))
    if not chunks:
        raise AssertionError(f"child ended without a result (wait status {status})")
    kind, result = pickle.loads(b"".join(chunks))
    if kind == "error":
        raise AssertionError(f"child failed:\n{result}")
    return result


NOBODY = 65534  # the unprivileged user of the tests that run as root


def in_child_as_nobody(func: Callable[..., Any], *args: Any) -> Any:
    """:func:`in_child`, with the child dropped to 'nobody' first (the test runs as root).

    'nobody' may not read the interpreter's own files, so dogpile's backend plugins
    are looked up here first (the lookup scans sys.path once, then is cached).
    """
    import tempfile

    from dogpile.cache import make_region

    with tempfile.TemporaryDirectory() as warm_up:
        make_region().configure("dogpile_fsbackend.pickled", arguments={"base_dir": warm_up})
    return in_child(_as_nobody, func, *args)


def _as_nobody(func: Callable[..., Any], *args: Any) -> Any:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    return func(*args)


@contextlib.contextmanager
def nobody_dir(prefix: str) -> Iterator[str]:
    """A fresh directory that 'nobody' owns (pytest's tmp_path is private to root)."""
    import shutil
    import tempfile

    top = tempfile.mkdtemp(prefix=f"dogpile-fsbackend-{prefix}-")
    try:
        os.chown(top, NOBODY, NOBODY)
        os.chmod(top, 0o755)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def plant_socket(path: str) -> Any:
    """A Unix socket bound at ``path`` (close it after use).  Bound from its directory:
    a socket's address holds at most 107 bytes, less than a deep cache path."""
    import socket

    sock = socket.socket(socket.AF_UNIX)
    here = os.getcwd()
    os.chdir(os.path.dirname(path))
    try:
        sock.bind(os.path.basename(path))
    except BaseException:
        sock.close()
        raise
    finally:
        os.chdir(here)
    return sock


def read_text(path: str) -> str:
    with open(path) as handle:
        return handle.read()


_HOLD_A_FLOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def stopped_flock_holder(path: str) -> Iterator[None]:
    """Another process takes ``flock(path)`` and is stopped (SIGSTOP) holding it, as a
    process suspended in a debugger or a frozen container would; killed on exit."""
    with subprocess.Popen(
        [sys.executable, "-c", _HOLD_A_FLOCK, path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            os.kill(holder.pid, signal.SIGSTOP)
            yield
        finally:
            holder.kill()
            holder.wait(WAIT)


def fd_count() -> int:
    """Files this process holds open; sockets and pipes are left out: the Redis clients and
    multiprocessing queues of earlier tests close theirs whenever the collector frees them."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor
            if not os.readlink(f"/proc/self/fd/{name}").startswith(("socket:", "pipe:")):
                count += 1
    return count


# -- mounts (root only; tests skip when the machine does not allow them) ------------


def try_mount(*args: str) -> str | None:
    """Run ``mount ARGS``; None on success, else why it failed."""
    if os.geteuid() != 0:
        return "mounting needs root"
    try:
        result = subprocess.run(
            ["mount", *args], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"mount is not available: {exc}"
    if result.returncode:
        return f"mount {' '.join(args)} is not permitted here: {result.stderr.strip()}"
    return None


def unmount(path: str) -> None:
    """Unmount ``path``; lazily if something (a leaked descriptor) keeps it busy."""
    result = subprocess.run(["umount", path], capture_output=True, timeout=30, check=False)
    if result.returncode:
        subprocess.run(["umount", "-l", path], capture_output=True, timeout=30, check=False)


@contextlib.contextmanager
def mounted(*args: str, target: str) -> Iterator[None]:
    import pytest

    problem = try_mount(*args, target)
    if problem:
        pytest.skip(problem)
    try:
        yield
    finally:
        unmount(target)


def run_bounded(func, *args):
    """``func(*args)`` in a thread, failing (instead of hanging the suite) if it blocks."""
    result = []
    thread = threading.Thread(target=lambda: result.append(func(*args)), daemon=True)
    thread.start()
    thread.join(WAIT)
    assert result, f"{func.__name__} blocked"
    return result[0]
