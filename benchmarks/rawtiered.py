"""Workload 8: large files across hosts, ``dogpile_fsbackend.raw_tiered`` on a local S3.

For each size (64 MiB and 1 GiB in a full run), side by side in one run:

* set: the tiered set of a movable file (a rename into the local tier, the
  CRC32 of the cached copy, the multipart upload) against boto3's own
  ``upload_file`` of the same file (the bucket's floor);
* first read on a host: a get on a host that does not have the file (one
  GET, checked, published locally) and a read of it to the end;
* local hit: a get and a full read on the host that has it;
* the bucket directly: boto3's ``get_object`` and a read to the end, nothing
  kept, nothing checked.

Every case runs in a fresh spawned child, so its peak RSS (VmHWM) is its own.
The S3 endpoint is moto's standalone server (tests/servers.py) on loopback, and
the lock backend a private redis-server: moto is a Python process, so bucket
transfers here are bounded by moto, not by the network or by S3, and only the
rows of one run compare.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from typing import Any

from common import (
    MiB,
    Params,
    Table,
    WorkloadResult,
    fmt_num,
    generate_file,
    median,
    read_status_kib,
    rotated,
    size_label,
)

from dogpile_fsbackend.layout import encode_key, key_digest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from servers import MotoServer, RedisServer, moto_installed, redis_server_binary

BUCKET = "bench-bucket"
SET, SET_DIRECT = "set (rename + upload)", "boto3 upload_file directly"
FIRST, HIT, DIRECT = (
    "first read on a host",
    "local hit (get + read)",
    "bucket directly (get_object)",
)
READS = [FIRST, HIT, DIRECT]
PART = 16 * MiB  # raw_tiered's default part_size, for both uploads
OBJECT = key_digest(encode_key("big"))  # the object of key "big" (no prefix)


def _region(s3_arguments: dict[str, Any], redis_url: str, base_dir: str, size: int) -> Any:
    from dogpile.cache import make_region

    return make_region().configure(
        "dogpile_fsbackend.raw_tiered",
        arguments={
            "local": {
                "base_dir": base_dir,
                "cache_size": 3 * size + 64 * MiB,
                "file_movable": True,
            },
            "bucket": BUCKET,
            "s3": s3_arguments,
            "lock_backend": "dogpile.cache.redis",
            "lock": {"url": redis_url, "lock_timeout": 600},
        },
    )


def _read_all(handle: Any) -> int:
    total = 0
    while chunk := handle.read(MiB):
        total += len(chunk)
    return total


def _run_case(
    case: str, s3_arguments: dict[str, Any], redis_url: str, size: int, workdir: str
) -> dict[str, Any]:
    """The timed part of one case, in this (child) process."""
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    client = boto3.client("s3", config=Config(signature_version="s3v4"), **s3_arguments)
    host = os.path.join(workdir, "host-a" if case in (SET, HIT) else "host-b")
    region = (
        _region(s3_arguments, redis_url, host, size) if case not in (SET_DIRECT, DIRECT) else None
    )
    source = os.path.join(workdir, "source")
    baseline = read_status_kib("VmRSS")
    if case == SET:
        assert region is not None
        link = os.path.join(host, "incoming")
        os.link(source, link)  # a fresh name to rename in, same bytes
        with open(link, "rb") as handle:
            start = time.perf_counter()
            region.set("big", handle)
    elif case == SET_DIRECT:
        start = time.perf_counter()
        transfer = TransferConfig(
            multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=4
        )
        client.upload_file(source, BUCKET, "direct", Config=transfer)
    elif case == DIRECT:
        start = time.perf_counter()
        body = client.get_object(Bucket=BUCKET, Key=OBJECT)["Body"]
        got = _read_all(body)
    else:  # FIRST or HIT: a get, then the whole file
        assert region is not None
        start = time.perf_counter()
        value = region.get("big")
        with value:
            got = _read_all(value)
    seconds = time.perf_counter() - start
    if case in READS and got != size:
        raise AssertionError(f"{case}: {got} bytes of {size}")
    if case == FIRST:
        assert region is not None
        region.backend.local.delete("big")  # the next first read starts from nothing again
    return {
        "seconds": seconds,
        "baseline_rss_kib": baseline,
        "peak_rss_kib": read_status_kib("VmHWM"),
    }


def _child(
    case: str, s3_arguments: dict[str, Any], redis_url: str, size: int, workdir: str, results: Any
) -> None:
    try:
        results.put(_run_case(case, s3_arguments, redis_url, size, workdir))
    except BaseException:
        results.put({"error": traceback.format_exc()})


def _in_child(case: str, *args: Any) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(case, *args, queue))
    child.start()
    outcome: dict[str, Any] = queue.get(timeout=1800)
    child.join(timeout=60)
    if "error" in outcome:
        raise RuntimeError(f"{case}: {outcome['error']}")
    return outcome


def raw_tiered(params: Params, workdir: str) -> WorkloadResult:
    binary = redis_server_binary()
    if binary is None or not moto_installed():
        raise RuntimeError(
            "workload 8 needs redis-server and moto[server] (pip install 'moto[server]')"
        )
    moto = MotoServer(os.path.join(workdir, "moto")).start()
    redis = RedisServer(binary, os.path.join(workdir, "redis")).start()
    results: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    try:
        moto.client().create_bucket(Bucket=BUCKET)
        for size in params.rawtiered_sizes:
            case_dir = os.path.join(workdir, f"size-{size}")
            for host in ("host-a", "host-b"):
                os.makedirs(os.path.join(case_dir, host))
            generate_file(os.path.join(case_dir, "source"), size)
            args = (moto.s3_arguments, redis.url, size, case_dir)
            for repeat in range(params.rawtiered_repeats):
                for case in rotated([SET, SET_DIRECT], repeat):
                    results[size, case].append(_in_child(case, *args))
                moto.client().delete_object(Bucket=BUCKET, Key="direct")
                for case in rotated(READS, repeat):
                    results[size, case].append(_in_child(case, *args))
            shutil.rmtree(case_dir, ignore_errors=True)
            moto.client().delete_object(Bucket=BUCKET, Key=OBJECT)
    finally:
        moto.stop()
        redis.stop()
    return _report(params, results)


def _report(
    params: Params, results: dict[tuple[int, str], list[dict[str, Any]]]
) -> WorkloadResult:
    table = Table(
        "Workload 8: large files across hosts, raw_tiered on a local S3 (moto) and Redis",
        [
            "case",
            "operation",
            "best ms",
            "median ms",
            "MiB/s (best)",
            "peak RSS MiB",
            "RSS growth MiB",
            "vs bucket directly",
        ],
    )
    records: list[dict[str, Any]] = []
    for size in params.rawtiered_sizes:
        label = size_label(size)
        floors = {
            SET: SET_DIRECT,
            SET_DIRECT: SET_DIRECT,
            FIRST: DIRECT,
            HIT: DIRECT,
            DIRECT: DIRECT,
        }
        for case in (SET, SET_DIRECT, FIRST, HIT, DIRECT):
            got = results[size, case]
            best = min(r["seconds"] for r in got)
            floor = min(r["seconds"] for r in results[size, floors[case]])
            peak = max(r["peak_rss_kib"] or 0 for r in got) / 1024
            growth = (
                max((r["peak_rss_kib"] or 0) - (r["baseline_rss_kib"] or 0) for r in got) / 1024
            )
            records.append(
                {
                    "size_bytes": size,
                    "case": case,
                    "best_ms": best * 1e3,
                    "median_ms": median([r["seconds"] for r in got]) * 1e3,
                    "all_ms": [r["seconds"] * 1e3 for r in got],
                    "mib_per_s": size / MiB / best,
                    "peak_rss_mib": peak,
                    "rss_growth_mib": growth,
                    "over_bucket_directly": best / floor,
                }
            )
            table.add(
                label,
                case,
                fmt_num(best * 1e3, 1),
                fmt_num(median([r["seconds"] for r in got]) * 1e3, 1),
                fmt_num(size / MiB / best, 0),
                fmt_num(peak),
                fmt_num(growth),
                "1 (floor)" if case == floors[case] else f"{best / floor:.2f}x",
            )
    table.notes += [
        f"{params.rawtiered_repeats} runs per case, each in a fresh spawned child; best and "
        "median wall time. 'vs bucket directly': best time over boto3's own transfer of the "
        "same bytes (upload_file for sets, get_object + read for reads), in the same loop.",
        "set: a movable file renamed into the local tier, its CRC32 computed from the cached "
        "copy, then uploaded with boto3's managed transfer (16 MiB parts, 4 at once: the same "
        "TransferConfig as the direct upload).",
        "first read on a host: one GET into a temp file in the cache directory (length and "
        "CRC32 checked), renamed into place, then read to the end; the host's copy is deleted "
        "after each run. local hit: a get and a read to the end, on the host that set the file.",
        "The endpoint is moto's S3 server, a Python process on loopback: transfers are bounded "
        "by moto's CPU, so bucket rows say little about S3 or MinIO; local hits do not touch it.",
        "peak RSS: the child's VmHWM (interpreter and boto3 included); RSS growth: VmHWM minus "
        "VmRSS just before the timed part. Flat RSS means these do not grow with the file size.",
    ]
    return WorkloadResult("raw_tiered", table, records)


if __name__ == "__main__":  # python benchmarks/rawtiered.py: this workload alone, quick sizes
    from common import QUICK

    with tempfile.TemporaryDirectory() as directory:
        print(raw_tiered(QUICK, directory).table.text())
