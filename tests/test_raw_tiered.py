"""dogpile_fsbackend.raw_tiered on a real S3 endpoint (moto's server), in one process.

Two regions on two ``base_dir``s stand for two hosts here; tests/test_raw_tiered_hosts.py
runs them as separate processes.  What is checked: the object and its metadata
(non-ASCII names, S3's 2 KB limit), that every byte is checked on the way down
(a damaged, truncated or foreign object is a miss and is never published nor
deleted), deletes, per-host eviction, keys too long for the metadata, objects
too big for a host, freshness with ``local_expiration_time``, configuration
from Python and from an ini file, and the optional extra.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import zlib

import pytest
import s3kit
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE
from s3kit import BUCKET, MiB

from dogpile_fsbackend import (
    CachedFile,
    ConfigError,
    MissingExtraError,
    RawTieredBackend,
    RemoteError,
)
from dogpile_fsbackend.layout import encode_key, key_digest
from dogpile_fsbackend.s3tier import METADATA_NAME, DamagedObject, file_crc32


@pytest.fixture
def tiers(s3, redis_url, tmp_path):
    """``tiers(name, **arguments)``: a raw_tiered region on the shared S3 server."""

    def make(name: str = "a", **top):
        return s3kit.region(s3.s3_arguments, str(tmp_path / name), redis_url, **top)

    return make


def age_local_copy(region, key: str, seconds: float) -> None:
    """Date this host's copy of ``key`` ``seconds`` back (its data file's mtime is its age)."""
    value = region.backend.local.peek(key)
    with value.payload if hasattr(value, "payload") else value as reader:
        info = os.stat(reader.name)
        os.utime(reader.name, (info.st_atime, info.st_mtime - seconds))


def object_name(key: str) -> str:
    return f"files/{key_digest(encode_key(key))}"


def head(s3, key: str) -> dict:
    return s3.client().head_object(Bucket=BUCKET, Key=object_name(key))


def described(s3, key: str) -> dict:
    header = head(s3, key)["Metadata"][METADATA_NAME]
    return json.loads(base64.urlsafe_b64decode(header))


def content(value) -> bytes:
    with value:
        value.seek(0)
        return value.read()


def test_a_set_uploads_the_cached_copy_with_its_description(tiers, s3, tmp_path):
    a, b = tiers("a"), tiers("b")
    data = os.urandom(3 * MiB + 17)
    source = tmp_path / "report.pdf"
    source.write_bytes(data)
    with open(source, "rb") as handle:
        handle.seek(10)
        a.set("report|1", CachedFile(handle, filename="Überblick 2026 — 報告.pdf"))
    info = head(s3, "report|1")
    assert info["ContentLength"] == len(data)
    assert info["ContentType"] == "application/pdf"
    assert "filename*=UTF-8''%C3%9Cberblick%202026" in info["ContentDisposition"]
    fields = described(s3, "report|1")
    assert fields["e"]["filename"] == "Überblick 2026 — 報告.pdf"  # non-ASCII survives S3
    assert fields["e"]["position"] == 10 and fields["e"]["size"] == len(data)
    obj = s3.client().get_object(Bucket=BUCKET, Key=object_name("report|1"))
    assert obj["Body"].read() == data  # the object is exactly the file: presignable

    with a.get("report|1") as mine:
        attributes = (mine.etag, mine.last_modified, mine.filename, mine.content_type)
    theirs = b.get("report|1")  # another host: from the bucket
    assert (theirs.etag, theirs.last_modified, theirs.filename, theirs.content_type) == attributes
    assert theirs.tell() == 10 and theirs.content_length == len(data)
    assert content(theirs) == data
    assert b.backend.stats()["remote_hits"] == 1
    assert content(b.get("report|1")) == data  # now local on host b
    assert b.backend.stats()["local_hits"] == 1


def test_a_movable_file_is_renamed_in_and_then_uploaded(tiers, s3, tmp_path):
    a = tiers("a", local={"file_movable": True})
    base_dir = a.backend.local.settings.base_dir
    out = tempfile.NamedTemporaryFile(dir=base_dir, delete=False)  # noqa: SIM115
    out.write(b"x" * MiB)
    out.seek(0)
    a.set("moved", out)
    assert not os.path.exists(out.name)  # moved into the cache, not copied
    out.close()
    assert head(s3, "moved")["ContentLength"] == MiB
    assert content(tiers("b").get("moved")) == b"x" * MiB


def test_get_or_create_on_a_second_host_never_runs_the_creator(tiers):
    a, b = tiers("a"), tiers("b")
    calls = []

    def creator():
        calls.append(1)
        return CachedFile(io.BytesIO(b"made once"), filename="once.txt")

    a.get_or_create("k", creator).close()
    with b.get_or_create("k", creator) as value:
        assert value.read() == b"made once" and value.filename == "once.txt"
    assert calls == [1]


def test_a_value_with_dogpile_metadata_keeps_it_across_hosts(tiers):
    a, b = tiers("a", expiration_time=3600), tiers("b", expiration_time=3600)
    a.set("k", io.BytesIO(b"v"))
    found = b.backend.get("k")  # the backend's own answer: a CachedValue
    assert found.metadata == a.backend.local.peek("k").metadata
    assert found.metadata["ct"] > 0
    found.payload.close()


def test_a_damaged_object_is_a_miss_never_published_and_left_alone(tiers, s3, caplog):
    a, b = tiers("a"), tiers("b")
    a.set("k", io.BytesIO(b"the real bytes"))
    info = head(s3, "k")
    # Same length, same description, other bytes: only the checksum can tell.
    s3.client().put_object(
        Bucket=BUCKET, Key=object_name("k"), Body=b"the fake bytes", Metadata=info["Metadata"]
    )
    with caplog.at_level(logging.WARNING):
        assert b.get("k") is NO_VALUE
    assert "CRC32" in caplog.text and object_name("k") in caplog.text
    assert b.backend.stats()["damaged_objects"] == 1
    assert b.backend.local.peek("k") is NO_VALUE  # not published
    assert head(s3, "k")["ContentLength"] == 14  # and not deleted: the creator replaces it
    tiny = tiers("tiny", local={"cache_size": 8})  # would serve it from an unnamed file
    assert tiny.get("k") is NO_VALUE  # checked there too
    assert b.get_or_create("k", lambda: io.BytesIO(b"made again")).read() == b"made again"
    assert content(a.get("k")) == b"the real bytes"  # host a's copy is its own


def test_a_truncated_or_foreign_object_is_a_miss_and_never_deleted(tiers, s3, caplog):
    a, b = tiers("a"), tiers("b")
    a.set("short", io.BytesIO(b"0123456789"))
    metadata = head(s3, "short")["Metadata"]
    client = s3.client()
    # Another key's description under this key's name (as a hash collision would be).
    client.copy_object(
        Bucket=BUCKET,
        Key=object_name("stolen"),
        CopySource={"Bucket": BUCKET, "Key": object_name("short")},
    )
    client.put_object(Bucket=BUCKET, Key=object_name("short"), Body=b"01234", Metadata=metadata)
    client.put_object(Bucket=BUCKET, Key=object_name("foreign"), Body=b"someone else's")
    client.put_object(
        Bucket=BUCKET,
        Key=object_name("garbled"),
        Body=b"x",
        Metadata={METADATA_NAME: "not base64 json!"},
    )
    fields = json.loads(base64.urlsafe_b64decode(metadata[METADATA_NAME]))
    for key, change in (("newer", {"v": 2}), ("absurd", {"crc32": -1})):
        header = base64.urlsafe_b64encode(json.dumps({**fields, **change}).encode()).decode()
        client.put_object(
            Bucket=BUCKET,
            Key=object_name(key),
            Body=b"0123456789",
            Metadata={METADATA_NAME: header},
        )
    keys = ("short", "foreign", "garbled", "stolen", "newer", "absurd")
    with caplog.at_level(logging.WARNING):
        for key in keys:
            assert b.get(key) is NO_VALUE, key
    for reason in ("bytes, its description says", "no x-amz-meta", "unreadable", "another key"):
        assert reason in caplog.text
    assert "not a description of this format version" in caplog.text
    assert "out of range" in caplog.text
    for key in keys:
        assert head(s3, key)  # all still there
    assert b.backend.stats()["entries"] == 0


def test_delete_removes_the_object_and_this_hosts_copy(tiers, s3):
    a, b = tiers("a"), tiers("b")
    a.set("k", io.BytesIO(b"v"))
    b.get("k").close()
    b.delete("k")
    assert b.backend.local.peek("k") is NO_VALUE
    with pytest.raises(s3.client().exceptions.ClientError):
        head(s3, "k")
    assert tiers("c").get("k") is NO_VALUE
    assert content(a.get("k")) == b"v"  # host a keeps its copy (see local_expiration_time)


def test_eviction_stays_per_host_and_the_bucket_refills(tiers, s3):
    b = tiers("b", local={"cache_size": 3 * MiB})
    a = tiers("a")
    for i in range(4):
        a.set(f"k{i}", io.BytesIO(bytes([i]) * MiB))
    for i in range(4):  # host b holds ~2 of them at a time
        assert content(b.get(f"k{i}")) == bytes([i]) * MiB
    assert b.backend.stats()["evictions"] >= 1
    assert b.backend.stats()["entries"] < 4
    assert content(b.get("k0")) == bytes([0]) * MiB  # evicted here, fetched again
    assert a.backend.stats()["entries"] == 4  # host a's tier is its own


def test_a_key_too_long_for_the_metadata_still_works(tiers, s3):
    a, b = tiers("a"), tiers("b")
    key = "k" * 5000
    a.set(key, CachedFile(io.BytesIO(b"long key"), filename="f.txt"))
    assert "k" not in described(s3, key)  # left out of the 2 KB
    assert content(b.get(key)) == b"long key"  # the get knows its key
    digest = key_digest(encode_key(key))
    served = tiers("c").backend.get_by_digest(digest)  # a URL does not: served, not kept
    assert content(served.payload) == b"long key"
    assert tiers("c").backend.stats()["entries"] == 0


def test_an_object_too_big_for_a_host_is_served_without_being_kept(tiers):
    a, small = tiers("a"), tiers("small", local={"cache_size": MiB})
    data = os.urandom(2 * MiB)
    a.set("big", CachedFile(io.BytesIO(data), filename="big.bin"))
    value = small.get("big")
    assert os.fstat(value.fileno()).st_nlink == 0  # an unnamed file: gone when closed
    assert value.filename == "big.bin" and content(value) == data
    stats = small.backend.stats()
    assert (stats["uncached_hits"], stats["entries"]) == (1, 0)


def test_a_value_too_big_for_the_writer_is_not_uploaded_and_its_old_object_goes(tiers, s3):
    a = tiers("a", local={"cache_size": MiB})
    a.set("k", io.BytesIO(b"small"))
    with pytest.warns(UserWarning, match="was not cached"):
        a.set("k", io.BytesIO(b"x" * 2 * MiB))
    with pytest.raises(s3.client().exceptions.ClientError):
        head(s3, "k")  # the old value must not outlive the set that replaced it


def test_a_file_name_too_long_for_the_metadata_is_refused_before_anything_is_stored(tiers, s3):
    a = tiers("a")
    with pytest.raises(ValueError, match="2048 bytes of object metadata"):
        a.set("k", CachedFile(io.BytesIO(b"v"), filename="é" * 1500))
    assert a.backend.local.peek("k") is NO_VALUE
    assert s3.client().list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0
    # A long but ordinary name (255 characters, the most filesystems allow) fits.
    a.set("k", CachedFile(io.BytesIO(b"v"), filename="日本" * 127 + ".txt"))
    assert tiers("b").get("k").filename == "日本" * 127 + ".txt"


def test_with_local_expiration_time_an_older_copy_is_checked_against_the_bucket(tiers):
    a = tiers("a", local_expiration_time=60)
    b = tiers("b", local_expiration_time=60)
    a.set("k", io.BytesIO(b"v1"))
    assert content(b.get("k")) == b"v1"
    a.set("k", io.BytesIO(b"v2"))  # another host changed it
    assert content(b.get("k")) == b"v1"  # within 60 s: b's copy, no request
    assert b.backend.stats()["revalidations"] == 0
    age_local_copy(b, "k", 61)
    assert content(b.get("k")) == b"v2"  # checked: another write, fetched
    assert content(b.get("k")) == b"v2"  # fetched just now: fresh
    a.delete("k")
    age_local_copy(b, "k", 61)
    assert b.get("k") is NO_VALUE  # checked: gone from the bucket
    assert b.backend.local.peek("k") is NO_VALUE
    assert b.backend.stats()["revalidations"] == 2


def test_an_unchanged_copy_is_kept_after_the_check(tiers):
    a = tiers("a", local_expiration_time=60)
    a.set("k", io.BytesIO(b"v1"))
    with a.get("k") as first:
        etag = first.etag
    age_local_copy(a, "k", 61)
    with a.get("k") as again:
        assert again.etag == etag
    with a.get("k"):  # trusted again for 60 s: no second check
        pass
    stats = a.backend.stats()
    assert (stats["revalidations"], stats["remote_hits"]) == (1, 0)  # one HEAD, no download


def test_configure_from_an_ini_file(s3, redis_url, tmp_path):
    ini = f"""
[cache]
backend = dogpile_fsbackend.raw_tiered
arguments.local.base_dir = {tmp_path / "ini"}
arguments.local.cache_size = 2GiB
arguments.local.file_mode = 640
arguments.bucket = {BUCKET}
arguments.prefix = files/
arguments.s3.endpoint_url = {s3.endpoint_url}
arguments.s3.region_name = us-east-1
arguments.s3.aws_access_key_id = testing
arguments.s3.aws_secret_access_key = testing
arguments.s3.config.s3.addressing_style = path
arguments.s3.config.connect_timeout = 3
arguments.lock_backend = dogpile.cache.redis
arguments.lock.url = {redis_url}
arguments.lock.lock_timeout = 600
arguments.remote_errors = degrade
arguments.part_size = 8MiB
"""
    import configparser

    parser = configparser.ConfigParser()
    parser.read_string(ini)
    config = {f"cache.{key}": value for key, value in parser.items("cache")}
    region = make_region().configure_from_config(config, "cache.")
    backend = region.backend
    assert isinstance(backend, RawTieredBackend)
    assert backend.local.settings.file_mode == 0o640  # octal, as the raw backend reads it
    assert backend.guard.mode == "degrade"
    assert backend.lock.lock_timeout == 600 and backend.lock.distributed_lock
    client_config = backend.bucket.client.meta.config
    assert client_config.s3 == {"addressing_style": "path"}
    assert client_config.connect_timeout == 3 and client_config.signature_version == "s3v4"
    region.set("k", io.BytesIO(b"from ini"))
    assert head(s3, "k")["ContentLength"] == 8


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        ({"bucket": None}, "bucket"),
        ({"bucket": "a/b"}, "bucket"),
        ({"part_size": "1MiB"}, "part_size"),
        ({"concurrency": 0}, "concurrency"),
        ({"remote_errors": "ignore"}, "remote_errors"),
        ({"lock_backend": "no.such.backend"}, "lock_backend"),
        ({"s3": {"config": 5}}, "s3.config"),
        ({"local": {"base_dir": 5}}, "local.base_dir"),
        ({"local": None}, "local"),
        ({"prefix": "p" * 901}, "prefix"),
        ({"concurrency": "many"}, "concurrency"),
        ({"s3": {"endpoint_url": "not a url"}}, "s3"),
    ],
)
def test_a_bad_argument_names_itself(s3, tmp_path, change, argument):
    arguments = s3kit.arguments(s3.s3_arguments, str(tmp_path / "a"))
    arguments.update(change)
    for name, value in change.items():
        if value is None:
            del arguments[name]
    with pytest.raises(ConfigError) as raised:
        RawTieredBackend(arguments)
    assert raised.value.argument == argument


def test_multi_operations_ini_style_values_and_the_lock_timeout(tiers):
    a, b = tiers("a", bucket=2024, concurrency="2"), tiers("b")  # as an ini file gives them
    assert (a.backend.bucket.name, a.backend.bucket.concurrency) == ("2024", 2)
    b.set_multi({"x": io.BytesIO(b"1"), "y": io.BytesIO(b"2")})
    assert [content(v) for v in tiers("c").get_multi(["x", "y"])] == [b"1", b"2"]
    b.delete_multi(["x", "y"])
    assert tiers("d").get_multi(["x", "y"]) == [NO_VALUE, NO_VALUE]
    assert b.backend.has_lock_timeout()  # Redis's lock_timeout: two creators are possible


def test_a_missing_bucket_is_an_outage_that_names_it(tiers):
    with pytest.raises(RemoteError, match=r"S3 bucket 'no-such-bucket'.*NoSuchBucket"):
        tiers("a", bucket="no-such-bucket").get("k")
    degrading = tiers("b", bucket="no-such-bucket", remote_errors="degrade")
    assert degrading.get("k") is NO_VALUE
    degrading.set("k", io.BytesIO(b"kept here"))
    assert content(degrading.get("k")) == b"kept here"


def test_a_file_that_shrinks_is_an_error_naming_the_bytes(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"12345")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert file_crc32(fd, 5) == zlib.crc32(b"12345")
        with pytest.raises(DamagedObject, match="ended after 5 of 6 bytes"):
            file_crc32(fd, 6)
    finally:
        os.close(fd)


def test_the_arguments_are_never_modified(s3, redis_url, tmp_path):
    arguments = s3kit.arguments(s3.s3_arguments, str(tmp_path / "a"), redis_url)
    copy = json.loads(json.dumps(arguments))
    RawTieredBackend(arguments)
    assert arguments == copy


def test_without_a_lock_backend_it_says_so_and_locks_per_host(s3, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        region = s3kit.region(s3.s3_arguments, str(tmp_path / "a"))
    assert "no lock_backend" in caplog.text
    mutex = region.backend.get_mutex("k")
    assert mutex.acquire()
    assert not mutex.acquire(False)  # this host's lock
    mutex.release()
    assert not region.backend.has_lock_timeout()
    region.set("k", io.BytesIO(b"v"))  # the bucket is used all the same
    assert content(s3kit.region(s3.s3_arguments, str(tmp_path / "b")).get("k")) == b"v"


def test_the_lock_backends_pitfalls_are_warned(s3, redis_url, tmp_path):
    arguments = s3kit.arguments(s3.s3_arguments, str(tmp_path / "a"), redis_url)
    del arguments["lock"]["lock_timeout"]
    with pytest.warns(UserWarning, match="no lock_timeout"):
        RawTieredBackend(arguments)


def test_the_lifecycle_rules_of_the_readme_are_accepted_by_s3(s3):
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as readme:
        text = readme.read()
    start = text.index("```json", text.index("<!-- lifecycle rules -->")) + len("```json")
    rules = json.loads(text[start : text.index("```", start)])
    client = s3.client()
    client.put_bucket_lifecycle_configuration(Bucket=BUCKET, LifecycleConfiguration=rules)
    found = client.get_bucket_lifecycle_configuration(Bucket=BUCKET)["Rules"]
    assert {rule["ID"] for rule in found} == {rule["ID"] for rule in rules["Rules"]}


def test_importing_the_package_never_imports_boto3():
    code = "import sys, dogpile_fsbackend; print(sorted(m for m in sys.modules if 'boto' in m))"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert found.returncode == 0 and found.stdout.strip() == "[]", found.stderr


def test_without_the_extra_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # what an uninstalled module looks like
    with pytest.raises(MissingExtraError, match=r"pip install dogpile_fsbackend\[s3\]"):
        RawTieredBackend({"local": {"base_dir": str(tmp_path / "a")}, "bucket": BUCKET})


def test_keys_must_be_str_before_anything_is_asked_of_the_bucket(tiers):
    region = tiers("a")
    backend = region.backend
    for call in (
        lambda: backend.get(5),
        lambda: backend.set(5, io.BytesIO(b"v")),
        lambda: backend.delete(5),
        lambda: backend.get_mutex(5),
    ):
        with pytest.raises(TypeError, match="keys must be str"):
            call()
    assert backend.guard.attempts == 0
