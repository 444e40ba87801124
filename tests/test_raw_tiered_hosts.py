"""Simulated hosts on one real S3 endpoint (moto's server) and one redis-server.

Each host is a spawned process with a ``base_dir`` of its own:

* host B gets host A's 64 MiB file without running the creator, byte for byte,
  with its file name, content type, time, ETag and position;
* the processes of two hosts racing for one key run its creator once;
* a 1 GiB file goes up from host A and down to host B with flat memory in both
  (peak RSS measured in each host's process).
"""

from __future__ import annotations

import json

import pytest
import s3kit
from s3kit import MiB

SEED = 1234


@pytest.fixture
def hosts(s3, redis_url, tmp_path):
    """``hosts(name, s3_arguments=None, **arguments)`` starts a simulated host; all are
    stopped afterwards."""
    started: list[s3kit.Host] = []

    def start(name: str, s3_arguments: dict | None = None, **top) -> s3kit.Host:
        arguments = s3.s3_arguments if s3_arguments is None else s3_arguments
        host = s3kit.Host(arguments, str(tmp_path / name), redis_url, **top)
        started.append(host)
        return host

    yield start
    for host in started:
        host.close()


def creations(log_path) -> list:
    with open(log_path) as log:
        return [json.loads(line) for line in log]


def test_host_b_gets_host_a_64mib_file_without_running_the_creator(hosts, tmp_path):
    log_path = tmp_path / "creations.log"
    log_path.touch()
    a, b = hosts("a"), hosts("b")
    made = a("get_or_create", "clip|7", 64, SEED, "clip-7 été.mp4", str(log_path), 0)
    fetched = b("get_or_create", "clip|7", 64, SEED + 1, "wrong.mp4", str(log_path), 0)
    assert [pid for pid, _ in creations(log_path)] == [a.pid]  # host B never ran it
    assert fetched == made  # bytes (SHA-256), filename, type, length, time, ETag, position
    assert made["filename"] == "clip-7 été.mp4" and made["content_type"] == "video/mp4"
    assert made["size"] == made["content_length"] == 64 * MiB
    whole = s3kit.write_blocks(str(tmp_path / "expected"), 64, SEED)
    assert made["sha256"] == whole
    stats = b("stats")
    assert (stats["remote_hits"], stats["entries"], stats["uploads"]) == (1, 1, 0)
    assert b("get", "clip|7") == made  # and now from host B's own disk
    assert b("stats")["local_hits"] == stats["local_hits"] + 1


def test_processes_of_two_hosts_run_a_creator_once(hosts, tmp_path):
    log_path = tmp_path / "creations.log"
    log_path.touch()
    processes = [hosts("a"), hosts("a"), hosts("b"), hosts("b")]
    for process in processes:  # all at once; the creator takes 0.3 s and more
        process.send("get_or_create", "report", 4, SEED, "report.pdf", str(log_path), 0.3)
    answers = [process.answer() for process in processes]
    assert len(creations(log_path)) == 1
    assert all(answer == answers[0] for answer in answers)
    assert answers[0]["filename"] == "report.pdf"


def test_1gib_round_trip_with_flat_memory(hosts, s3, tmp_path):
    # moto completes a multipart upload by joining its parts in memory, without the
    # whitespace S3 sends meanwhile: on a busy machine 1 GiB takes longer than the
    # client's 30 s read timeout, and the retry finds the upload gone (500).
    patient = {**s3.s3_arguments, "config": {"read_timeout": 600}}
    a, b = hosts("a", s3_arguments=patient), hosts("b", s3_arguments=patient)
    stored = a("set_blocks", "big", 1024, SEED, "big.bin", timeout=600)
    a("drop_local", "big")  # keeps the suite's disk use to the bucket's copy and host B's
    got = b("get_measured", "big", timeout=600)
    assert got["sha256"] == stored["sha256"] and got["size"] == 1024 * MiB
    assert got["filename"] == "big.bin"
    growth_up = (stored["hwm_kib"] - stored["rss_before_kib"]) * 1024
    growth_down = (got["hwm_kib"] - got["rss_before_kib"]) * 1024
    print(
        f"\n1 GiB: upload {stored['seconds']:.1f} s, peak RSS growth {growth_up / MiB:.1f} MiB "
        f"(host A at {stored['hwm_kib'] / 1024:.1f} MiB); download and read "
        f"{got['seconds']:.1f} s, growth {growth_down / MiB:.1f} MiB "
        f"(host B at {got['hwm_kib'] / 1024:.1f} MiB)"
    )
    assert growth_up < 100 * MiB
    assert growth_down < 100 * MiB
