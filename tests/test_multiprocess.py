"""Several processes hammer the same keys through get_or_create.

Every creation is logged (one O_APPEND line) with its start and end time, the
time its value was published, and what the creating thread had last read for
the key (the read dogpile based its decision on, recorded by a ProxyBackend).
The assertions, per key:

* creations never overlap: each one starts after the previous one was published,
  so the distributed mutex covers creator *and* publish;
* a creation is justified: either the thread had read the newest value and
  that value had expired (the next creation starts at least ``expiration_time``
  after the previous one ended -- one creation per expiry window), or the
  thread's read began before the newest value was published.  The latter is
  dogpile's own check-then-lock window (``Lock._enter_create`` takes the mutex
  with ``acquire(False)`` and does not re-read), not a backend fault; any other
  creation (a miss or an old value read after a publish) fails the test;
* every value read is whole: its checksum matches.

With ``expiration_time`` on the region, dogpile's window makes redundant
creations common under contention (about one extra per window here).  With
``expiration_time`` on the *backend* instead, an expired entry is a miss, dogpile
takes its blocking path and re-reads under the mutex, and the test demands
exactly what it promises: every creation follows a miss read after the previous
publish, at least ``expiration_time`` after the previous creation ended.
"""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import json
import os
import pickle
import threading
import time
import traceback

import pytest
from conftest import SPAWN, WAIT
from dogpile.cache import make_region
from dogpile.cache.api import CachedValue
from dogpile.cache.proxy import ProxyBackend

from dogpile_fsbackend import CachedFile

PROCESSES = 4
THREADS = 3
KEYS = ["alpha", "beta", "gamma"]
EXPIRATION = 0.5
DURATION = 3.0
VALUE_SIZE = 64 * 1024

_local = threading.local()


def make_value(value_id: str) -> bytes:
    body = os.urandom(VALUE_SIZE)
    header = f"{value_id}|{hashlib.sha256(body).hexdigest()}|".encode()
    return header + body


def check_value(data: bytes) -> str | None:
    """The id of an intact value; None if it is torn."""
    try:
        value_id, digest, body = data.split(b"|", 2)
    except ValueError:
        return None
    if hashlib.sha256(body).hexdigest() != digest.decode() or len(body) != VALUE_SIZE:
        return None
    return value_id.decode()


class Recorder(ProxyBackend):
    """Remembers, per thread and key, when the last read began and which value it found."""

    log_fd = -1

    def _remember(self, key, started, found) -> None:
        _local.__dict__.setdefault("seen", {})[key] = (started, found)

    def get_serialized(self, key):
        started = time.monotonic()
        data = self.proxied.get_serialized(key)
        self._remember(key, started, data)
        return data

    def get(self, key):
        started = time.monotonic()
        value = self.proxied.get(key)
        found = None
        if isinstance(value, CachedValue):  # raw: the file's name; pickled: the value itself
            payload = value.payload
            found = check_value(payload) if isinstance(payload, bytes) else payload.filename
        self._remember(key, started, found)
        return value

    def set_serialized(self, key, value):
        self.proxied.set_serialized(key, value)
        self._log_creation(key)

    def set(self, key, value):
        self.proxied.set(key, value)
        self._log_creation(key)

    def _log_creation(self, key) -> None:
        creation = _local.__dict__.pop("creation", None)
        if creation is None or creation["key"] != key:
            return  # not a write made by our creator
        creation["published"] = time.monotonic()
        os.write(self.log_fd, (json.dumps(creation) + "\n").encode())


def seen_value_id(found) -> str | None:
    """The id of the value a read found (None for a miss)."""
    if found is None or isinstance(found, str):
        return found  # raw: the id travels as the file name; pickled get(): already checked
    if not isinstance(found, bytes):
        return None  # NO_VALUE
    return check_value(pickle.loads(found.partition(b"|")[2]))  # after dogpile's metadata


def _worker(kind, expiry, base_dir, log_path, ready, start, deadline, results) -> None:
    Recorder.log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    region = make_region().configure(
        f"dogpile_fsbackend.{kind}",
        expiration_time=EXPIRATION if expiry == "region" else None,
        arguments={"base_dir": base_dir, **backend_arguments(expiry)},
        wrap=[Recorder],
    )
    counter = iter(range(10**9))
    lock = threading.Lock()
    totals = collections.Counter()
    errors = []

    def creator_for(key):
        def creator():
            started_wall, started = time.time(), time.monotonic()
            seen_at, found = _local.__dict__.get("seen", {}).get(key, (None, None))
            with lock:
                value_id = f"{os.getpid()}-{threading.get_ident()}-{next(counter)}"
            data = make_value(value_id)
            time.sleep(0.01)  # widen the creation window
            _local.creation = {
                "key": key,
                "id": value_id,
                "start_wall": started_wall,
                "start": started,
                "seen_at": seen_at,
                "seen_id": seen_value_id(found),
                "end_wall": time.time(),
                "end": time.monotonic(),
            }
            if kind == "pickled":
                return data
            return CachedFile(io.BytesIO(data), filename=value_id)

        return creator

    def run(thread_index):
        try:
            index = thread_index
            first = True
            while first or time.time() < deadline.value:  # at least one read per thread
                first = False
                key = KEYS[index % len(KEYS)]
                index += 1
                value = region.get_or_create(key, creator_for(key))
                if kind == "raw":  # the creator's CachedFile, or a CachedFileReader
                    handle = value
                    try:
                        value = handle.read()
                    finally:
                        handle.close()
                value_id = check_value(value)
                with lock:
                    totals["reads"] += 1
                    if value_id is None:
                        totals["torn"] += 1
                    elif not value_id.startswith(f"{os.getpid()}-"):
                        totals["foreign"] += 1
        except BaseException:
            errors.append(traceback.format_exc())

    ready.put(os.getpid())
    if not start.wait(WAIT):
        raise AssertionError("never started")
    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT + DURATION)
    results.put((dict(totals), errors))


def backend_arguments(expiry: str) -> dict:
    return {"expiration_time": EXPIRATION} if expiry == "backend" else {}


@pytest.mark.parametrize("expiry", ["region", "backend"], ids=["region_expiry", "backend_expiry"])
@pytest.mark.parametrize("kind", ["pickled", "raw"])
def test_get_or_create_hammered_by_several_processes(tmp_path, kind, expiry):
    """With ``expiry="backend"`` an expired entry is a miss, so dogpile takes the
    blocking path and re-reads under the mutex: exactly one creation per window."""
    base_dir = str(tmp_path / "cache")
    log_path = str(tmp_path / "creations.log")
    open(log_path, "w").close()
    make_region().configure(
        f"dogpile_fsbackend.{kind}", arguments={"base_dir": base_dir, **backend_arguments(expiry)}
    )
    ready, results = SPAWN.Queue(), SPAWN.Queue()
    start, deadline = SPAWN.Event(), SPAWN.Value("d", 0.0)
    workers = [
        SPAWN.Process(
            target=_worker,
            args=(kind, expiry, base_dir, log_path, ready, start, deadline, results),
        )
        for _ in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:
            ready.get(timeout=WAIT)
        began = time.time()
        deadline.value = began + DURATION
        start.set()
        outcomes = [results.get(timeout=WAIT + DURATION) for _ in workers]
    finally:
        start.set()
        for worker in workers:
            worker.join(WAIT)
            if worker.is_alive():
                worker.kill()
    elapsed = time.time() - began
    assert [worker.exitcode for worker in workers] == [0] * PROCESSES

    totals = collections.Counter()
    for counts, errors in outcomes:
        assert not errors, errors[0]
        assert counts.get("reads", 0) > 0  # every process took part
        totals.update(counts)
    assert totals["torn"] == 0
    assert totals["foreign"] > 0  # values made by one process were read by others

    with open(log_path) as log:
        creations = [json.loads(line) for line in log]
    by_key = collections.defaultdict(list)
    for creation in creations:
        by_key[creation["key"]].append(creation)
    assert set(by_key) == set(KEYS)
    racy = 0
    for key, made in by_key.items():
        made.sort(key=lambda c: c["start"])
        assert made[0]["seen_id"] is None  # the first creation followed a miss
        windows = elapsed / EXPIRATION
        assert len(made) >= 2, f"{key}: expiry was never exercised"
        for previous, current in itertools.pairwise(made):
            where = f"{key}: {previous['id']} then {current['id']}"
            assert current["start"] > previous["published"], f"overlapping creations, {where}"
            if expiry == "backend":
                # Decided on a miss read under the mutex, after the previous publish.
                assert current["seen_id"] is None, f"created although a value was read, {where}"
                assert current["seen_at"] > previous["published"], f"stale miss, {where}"
                gap = current["start_wall"] - previous["end_wall"]
                assert gap >= EXPIRATION, f"recreated {gap:.3f}s after creation, {where}"
                continue
            assert current["seen_id"] is not None, f"decided on a miss, {where}"
            earlier = {c["id"] for c in made[: made.index(current)]}
            assert current["seen_id"] in earlier, f"read a value never created, {where}"
            if current["seen_id"] == previous["id"]:
                gap = current["start_wall"] - previous["end_wall"]
                assert gap >= EXPIRATION, f"recreated {gap:.3f}s after creation, {where}"
            else:
                # dogpile decided on a read that began before the newest value existed.
                assert current["seen_at"] < previous["published"], f"stale read, {where}"
                racy += 1
        due = [c for c in made[1:] if c["seen_id"] in (None, made[made.index(c) - 1]["id"])]
        assert len(due) + 1 <= windows + 1, f"{key}: {len(made)} creations in {elapsed:.1f}s"
    print(f"{len(creations)} creations, {racy} after dogpile's check-then-lock race")
