"""``python -m dogpile_fsbackend demo``: a tour of both backends in a temp directory.

It memoizes a slow function with the pickled backend, a large generated file
with the raw backend, and a value shared by several processes, printing
misses, hits and timings as it goes.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from dogpile.cache import make_region

_CHUNK = 1 << 20


def _timed(label: str, call: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = call()
    elapsed = time.perf_counter() - start
    print(f"  {label:<44} {elapsed * 1000:10.2f} ms")
    return result


def _slow_square(x: int) -> int:
    time.sleep(0.2)  # stands in for a slow query or computation
    return x * x


def _worker(base_dir: str, ready: Any, go: Any, created: Any, results: Any) -> None:
    """One of several processes asking for the same expensive value at once."""
    region = make_region().configure("dogpile_fsbackend.pickled", arguments={"base_dir": base_dir})

    def create() -> str:
        created.put(os.getpid())
        time.sleep(0.3)
        return "computed once"

    ready.wait(30)
    go.wait(30)
    results.put(region.get_or_create("shared-report", create))


def run(size_mb: int = 256) -> None:
    root = tempfile.mkdtemp(prefix="dogpile-fsbackend-demo-")
    try:
        _pickled(os.path.join(root, "values"))
        _raw(os.path.join(root, "files"), size_mb)
        _processes(os.path.join(root, "shared"))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _pickled(base_dir: str) -> None:
    print(f"pickled backend ({base_dir})")
    region = make_region().configure(
        "dogpile_fsbackend.pickled",
        expiration_time=3600,
        arguments={"base_dir": base_dir, "cache_size": "64MiB"},
    )
    square = region.cache_on_arguments()(_slow_square)
    _timed("square(12)       miss: computes (0.2 s)", lambda: square(12))
    _timed("square(12)       hit", lambda: square(12))
    _timed("square(13)       miss", lambda: square(13))
    _timed("square(13)       hit", lambda: square(13))
    print(f"  stats: {region.backend.stats()}\n")


def _raw(base_dir: str, size_mb: int) -> None:
    print(f"raw backend, a {size_mb} MiB generated file ({base_dir})")
    region = make_region().configure(
        "dogpile_fsbackend.raw",
        arguments={"base_dir": base_dir, "file_movable": True, "cache_size": "4GiB"},
    )
    os.makedirs(base_dir, exist_ok=True)

    @region.cache_on_arguments()
    def render(name: str) -> Any:
        handle = tempfile.NamedTemporaryFile(dir=base_dir, delete=False)  # noqa: SIM115
        block = hashlib.sha256(name.encode()).digest() * (_CHUNK // 32)
        for _ in range(size_mb):
            handle.write(block)
        handle.seek(0)
        return handle  # moved into the cache by rename: no copy

    first = _timed("render('report') miss: generates and moves in", lambda: render("report"))
    first.close()
    cached = _timed("render('report') hit: opens the cached file", lambda: render("report"))
    digest = hashlib.sha256()
    _timed("read the cached file to the end", lambda: _drain(cached, digest))
    cached.close()
    print(f"  {cached.content_length / _CHUNK:.0f} MiB, sha256 {digest.hexdigest()[:16]}...")
    print(f"  stats: {region.backend.stats()}\n")


def _drain(handle: Any, digest: Any) -> None:
    for chunk in iter(lambda: handle.read(_CHUNK), b""):
        digest.update(chunk)


def _processes(base_dir: str, workers: int = 4) -> None:
    print(f"{workers} processes ask for one value at the same moment ({base_dir})")
    context = multiprocessing.get_context("spawn")
    ready, go = context.Barrier(workers + 1), context.Event()
    created, results = context.Queue(), context.Queue()
    procs = [
        context.Process(target=_worker, args=(base_dir, ready, go, created, results))
        for _ in range(workers)
    ]
    for proc in procs:
        proc.start()
    ready.wait(30)
    start = time.perf_counter()
    go.set()
    answers = [results.get(timeout=30) for _ in procs]
    elapsed = time.perf_counter() - start
    for proc in procs:
        proc.join(30)
    creators = []
    while not created.empty():
        creators.append(created.get())
    print(f"  {len(answers)} answers {set(answers)} in {elapsed * 1000:.0f} ms;", end=" ")
    print(f"the value was created {len(creators)} time(s)")
