"""Outages under raw_tiered: the S3 server (moto) and the lock's redis-server killed,
paused and restarted, and a connection cut in the middle of a download.

* ``remote_errors="degrade"`` serves and writes locally, with local locks,
  logs the outage once, and uses the bucket again once it is back;
* ``"raise"`` raises RemoteError naming the bucket (or the lock backend), and
  still drops the local copy on a delete;
* a download cut short is never published and leaves no temp file;
* a hung bucket costs a bounded time.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time

import pytest
import s3kit
from conftest import WAIT
from dogpile.cache.api import NO_VALUE
from s3kit import BUCKET, FAST_BACKOFF, MiB

from dogpile_fsbackend import CachedFile, RemoteError
from dogpile_fsbackend.layout import encode_key, key_digest


def tier(server, tmp_path, redis_url, name="a", **top):
    return s3kit.region(server.s3_arguments, str(tmp_path / name), redis_url, **top)


def read(value) -> bytes:
    with value:
        return value.read()


def wait_for_backoff(region) -> None:
    """Let the guard's back-off (FAST_BACKOFF: at most 0.5 s) run out."""
    time.sleep(FAST_BACKOFF["remote_backoff_max"] + 0.1)


def temp_files(base_dir: str) -> list[str]:
    return [
        name
        for _, _, names in os.walk(os.path.join(base_dir, "data"))
        for name in names
        if name.startswith(".tmp-")
    ]


def test_degrade_serves_and_writes_locally_while_the_bucket_is_down(
    private_s3, redis_url, tmp_path, caplog
):
    region = tier(private_s3, tmp_path, redis_url, remote_errors="degrade", **FAST_BACKOFF)
    region.set("cached", io.BytesIO(b"before"))
    private_s3.kill()
    with caplog.at_level(logging.WARNING, logger="dogpile_fsbackend.remote"):
        assert read(region.get("cached")) == b"before"
        region.set("written", io.BytesIO(b"during"))  # the upload skipped, the local copy kept
        assert read(region.get("written")) == b"during"
        assert region.get("missing") is NO_VALUE
        made = region.get_or_create("made", lambda: io.BytesIO(b"locally"))
        assert read(made) == b"locally"
        region.delete("cached")
        assert region.get("cached") is NO_VALUE
    outage = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(outage) == 1, outage  # logged once, not per call
    assert f"'{BUCKET}'" in outage[0] and "serving and writing locally" in outage[0]
    assert not region.backend.guard.healthy

    private_s3.start()  # moto comes back empty, as a bucket restored from nothing would
    private_s3.client().create_bucket(Bucket=BUCKET)
    wait_for_backoff(region)
    region.set("after", io.BytesIO(b"shared again"))
    assert region.backend.guard.healthy
    other = tier(private_s3, tmp_path, redis_url, "b", remote_errors="degrade")
    assert read(other.get("after")) == b"shared again"


def test_degrade_serves_an_old_copy_it_cannot_check(private_s3, redis_url, tmp_path):
    region = tier(
        private_s3, tmp_path, redis_url, remote_errors="degrade", local_expiration_time=60
    )
    region.set("k", io.BytesIO(b"old but here"))
    value = region.backend.local.peek("k")
    with value.payload as reader:  # a copy older than local_expiration_time
        os.utime(reader.name, (time.time() - 120, time.time() - 120))
    private_s3.kill()
    assert read(region.get("k")) == b"old but here"
    assert region.backend.stats()["revalidations"] == 0  # it could not check


def test_raise_raises_remote_error_naming_the_bucket(private_s3, redis_url, tmp_path):
    region = tier(private_s3, tmp_path, redis_url, **FAST_BACKOFF)
    region.set("cached", io.BytesIO(b"v"))
    private_s3.kill()
    assert read(region.get("cached")) == b"v"  # a local hit needs no bucket
    with pytest.raises(RemoteError, match=f"S3 bucket '{BUCKET}' at {private_s3.endpoint_url}"):
        region.get("missing")
    with pytest.raises(RemoteError, match="failed recently"):  # during the back-off: at once
        region.set("new", io.BytesIO(b"n"))
    with pytest.raises(RemoteError):
        region.delete("cached")
    assert region.backend.local.peek("cached") is NO_VALUE  # dropped all the same
    private_s3.start()
    private_s3.client().create_bucket(Bucket=BUCKET)
    wait_for_backoff(region)
    region.set("new", io.BytesIO(b"n"))
    name = region.backend.bucket.object_name(key_digest(encode_key("new")))
    assert private_s3.client().head_object(Bucket=BUCKET, Key=name)["ContentLength"] == 1


def test_the_bucket_killed_under_busy_hosts(private_s3, redis_url, tmp_path):
    """Two hosts keep reading and writing while the bucket dies and comes back."""
    errors: dict[str, list[str]] = {"degrade": [], "raise": []}
    stop = threading.Event()
    regions = {
        mode: tier(private_s3, tmp_path, redis_url, mode, remote_errors=mode, **FAST_BACKOFF)
        for mode in errors
    }
    for region in regions.values():
        region.set("shared", io.BytesIO(b"x" * 1000))

    def busy(mode: str) -> None:
        region = regions[mode]
        i = 0
        while not stop.is_set():
            i += 1
            try:
                region.set(f"{mode}-{i % 7}", io.BytesIO(os.urandom(1000)))
                value = region.get(f"{mode}-{(i + 3) % 7}")
                if value is not NO_VALUE:
                    value.close()
                read(region.get("shared"))
            except RemoteError as exc:
                errors[mode].append(str(exc))
            except Exception as exc:  # anything else is a failure of the test
                errors[mode].append(f"UNEXPECTED {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=busy, args=(mode,)) for mode in errors]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        private_s3.kill()
        time.sleep(1.0)
        private_s3.start()
        private_s3.client().create_bucket(Bucket=BUCKET)
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(WAIT)
    assert errors["degrade"] == []  # not one call failed
    assert errors["raise"], "the raising host never noticed the outage"
    assert all(f"S3 bucket '{BUCKET}'" in error for error in errors["raise"]), errors["raise"]
    for mode, region in regions.items():
        assert region.backend.guard.healthy, mode  # both use the bucket again
        region.set("after", io.BytesIO(b"back"))


@pytest.mark.parametrize("mode", ["degrade", "raise"])
def test_a_download_cut_short_is_never_published(s3, redis_url, tmp_path, mode):
    writer = tier(s3, tmp_path, redis_url)
    writer.set("big", CachedFile(io.BytesIO(os.urandom(8 * MiB)), filename="big.bin"))
    proxy = s3kit.CuttingProxy(s3.port, limit=3 * MiB)
    try:
        arguments = {**s3.s3_arguments, "endpoint_url": proxy.endpoint_url}
        reader = s3kit.region(arguments, str(tmp_path / "b"), redis_url, remote_errors=mode)
        if mode == "degrade":
            assert reader.get("big") is NO_VALUE
        else:
            with pytest.raises(RemoteError):
                reader.get("big")
        assert proxy.cuts >= 1
    finally:
        proxy.close()
    base_dir = str(tmp_path / "b")
    assert reader.backend.local.peek("big") is NO_VALUE
    assert temp_files(base_dir) == []
    assert reader.backend.stats()["entries"] == 0


def test_a_hung_bucket_costs_a_bounded_time(private_s3, redis_url, tmp_path):
    region = tier(
        private_s3,
        tmp_path,
        redis_url,
        remote_errors="degrade",
        s3={**private_s3.s3_arguments, "config": {"read_timeout": 0.5, "connect_timeout": 0.5}},
    )
    with private_s3.paused():
        started = time.monotonic()
        assert region.get("missing") is NO_VALUE
        elapsed = time.monotonic() - started
        assert region.get("missing") is NO_VALUE  # during the back-off: no wait at all
        assert time.monotonic() - started - elapsed < 0.1
    assert elapsed < 5.0, elapsed  # two attempts of 0.5 s, plus botocore's retry pause


def test_the_lock_backend_down(private_redis, s3, tmp_path):
    degrading = s3kit.region(
        s3.s3_arguments, str(tmp_path / "a"), private_redis.url, remote_errors="degrade"
    )
    raising = s3kit.region(s3.s3_arguments, str(tmp_path / "b"), private_redis.url)
    private_redis.kill()
    made = degrading.get_or_create("k", lambda: io.BytesIO(b"with the local lock"))
    assert read(made) == b"with the local lock"
    mutex = degrading.backend.get_mutex("other")
    assert mutex.acquire()
    assert not mutex.acquire(False)  # still exclusive: this host's lock
    mutex.release()
    assert degrading.backend.stats()["lock_healthy"] is False
    with pytest.raises(RemoteError, match=r"dogpile\.cache\.redis at redis://127\.0\.0\.1"):
        raising.get_or_create("k2", lambda: io.BytesIO(b"never"))
