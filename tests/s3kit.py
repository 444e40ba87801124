"""Helpers of the raw_tiered tests: regions on a real S3 endpoint, big files, simulated hosts.

A simulated host is a spawned process with a ``base_dir`` of its own; hosts share
the bucket (moto's S3 server) and, for the cross-host lock, a redis-server.
Big files are made of 1 MiB blocks, each the block's number followed by bytes
drawn from a seed, so any process can recompute any byte range without keeping
the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
import time
from typing import Any

import hostkit
from conftest import WAIT
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE
from dogpile.cache.region import CacheRegion

from dogpile_fsbackend import CachedFile

MiB = 1024**2
BUCKET = "test-bucket"
FAST_BACKOFF = {"remote_backoff": 0.2, "remote_backoff_max": 0.5}
MISS = "<miss>"


def arguments(
    s3_arguments: dict,
    base_dir: str,
    redis_url: str | None = None,
    local: dict | None = None,
    **top: Any,
) -> dict[str, Any]:
    """raw_tiered arguments that raise no pitfall warning (the suite turns them into errors)."""
    found: dict[str, Any] = {
        "local": {"base_dir": base_dir, "cache_size": "4GiB", **(local or {})},
        "bucket": BUCKET,
        "prefix": "files/",
        "s3": dict(s3_arguments),
        **top,
    }
    if redis_url is not None:
        found["lock_backend"] = "dogpile.cache.redis"
        found["lock"] = {"url": redis_url, "lock_timeout": 60, "lock_sleep": 0.01}
    return found


def region(
    s3_arguments: dict,
    base_dir: str,
    redis_url: str | None = None,
    expiration_time: float | None = None,
    **top: Any,
) -> CacheRegion:
    return make_region().configure(
        "dogpile_fsbackend.raw_tiered",
        expiration_time=expiration_time,
        arguments=arguments(s3_arguments, base_dir, redis_url, **top),
    )


# -- big files of recomputable blocks ---------------------------------------------------


def base_block(seed: int) -> bytes:
    return random.Random(seed).randbytes(MiB)


def block(base: bytes, index: int) -> bytes:
    return index.to_bytes(8, "big") + base[8:]


def write_blocks(path: str, blocks: int, seed: int) -> str:
    """Write ``blocks`` MiB to ``path``; the SHA-256 hex of the whole file."""
    base, whole = base_block(seed), hashlib.sha256()
    with open(path, "wb") as out:
        for index in range(blocks):
            data = block(base, index)
            out.write(data)
            whole.update(data)
    return whole.hexdigest()


def expected_bytes(seed: int, start: int, stop: int) -> bytes:
    base = base_block(seed)
    first, last = start // MiB, (stop - 1) // MiB
    blocks = b"".join(block(base, i) for i in range(first, last + 1))
    return blocks[start - first * MiB : stop - first * MiB]


def sha256_of(reader: Any) -> tuple[str, int]:
    """(SHA-256 hex, bytes) of a file from its start, read in 1 MiB chunks."""
    reader.seek(0)
    digest, size = hashlib.sha256(), 0
    while chunk := reader.read(MiB):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def describe(value: Any) -> dict[str, Any] | str:
    """What a get returned, as a picklable dict: the reader's attributes and content digest."""
    if value is NO_VALUE:
        return MISS
    position = value.tell()
    with value:
        digest, size = sha256_of(value)
        return {
            "filename": value.filename,
            "content_type": value.content_type,
            "content_length": value.content_length,
            "last_modified": value.last_modified,
            "etag": value.etag,
            "position": position,
            "sha256": digest,
            "size": size,
        }


def status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


# -- simulated hosts --------------------------------------------------------------------


def _creator(base_dir: str, blocks: int, seed: int, filename: str, log_path: str, pause: float):
    def create() -> CachedFile:
        with open(log_path, "a") as log:
            log.write(json.dumps([os.getpid(), time.time()]) + "\n")
        time.sleep(pause)  # so that the other hosts' processes come while it runs
        out = tempfile.NamedTemporaryFile(dir=base_dir, delete=False)  # noqa: SIM115
        out.close()
        write_blocks(out.name, blocks, seed)
        return CachedFile(open(out.name, "rb"), filename=filename)

    return create


def _host_main(s3_arguments, base_dir, redis_url, top, inbox, outbox) -> None:
    """A simulated host's process: runs the commands it is sent, answers each one."""
    tier = region(s3_arguments, base_dir, redis_url, **top)

    def measured(operation) -> dict[str, Any]:
        """What ``operation()`` returns, with its time and the peak RSS around it."""
        rss_before = status_kib("VmRSS")
        started = time.monotonic()
        answer = operation()
        return {
            **answer,
            "seconds": time.monotonic() - started,
            "rss_before_kib": rss_before,
            "hwm_kib": status_kib("VmHWM"),
        }

    def set_blocks(key: str, blocks: int, seed: int, filename: str) -> dict[str, Any]:
        """A movable file of ``blocks`` MiB stored under ``key``: its SHA-256, measured."""
        path = os.path.join(base_dir, f"new-{key}")
        os.makedirs(base_dir, exist_ok=True)
        digest = write_blocks(path, blocks, seed)

        def store() -> dict[str, Any]:
            with open(path, "rb") as handle:
                tier.set(key, CachedFile(handle, filename=filename))
            return {"sha256": digest}

        return measured(store)

    def handle(command: str, args: list[Any]) -> Any:
        if command == "get":
            return describe(tier.get(args[0]))
        if command == "get_or_create":  # key, blocks, seed, filename, log_path, pause
            key, *creator_args = args
            tier.get_or_create(key, _creator(base_dir, *creator_args)).close()
            return describe(tier.get(key))  # the first call returned the creator's own file
        if command == "set_blocks":
            return set_blocks(*args)
        if command == "get_measured":  # a get and a full read, measured
            return measured(lambda: describe(tier.get(args[0])))
        if command == "drop_local":  # this host's copy only, as an eviction would
            return tier.backend.local.delete(args[0])
        if command == "delete":
            return tier.delete(args[0])
        if command == "stats":
            return tier.backend.stats()
        raise hostkit.unknown(command)

    hostkit.serve(handle, inbox, outbox)


class Host(hostkit.ProcessHost):
    """A simulated host: a spawned process with a base_dir of its own."""

    def __init__(
        self, s3_arguments: dict, base_dir: str, redis_url: str | None = None, **top: Any
    ) -> None:
        super().__init__(_host_main, s3_arguments, base_dir, redis_url, top)


class CuttingProxy:
    """A TCP relay to ``port`` that cuts every connection after ``limit`` bytes of answer.

    A real network fault, not a fake S3: requests and answers are the server's
    own, until the connection is closed in the middle of a transfer.
    """

    def __init__(self, port: int, limit: int) -> None:
        import socket
        import threading

        self._target = port
        self.limit = limit
        self.cuts = 0
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(16)
        self._socket.settimeout(0.05)  # so that close() is seen: accept() does not wake up
        self._stop = threading.Event()
        self.port = self._socket.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        import socket
        import threading

        while not self._stop.is_set():
            try:
                client, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            server = socket.create_connection(("127.0.0.1", self._target), timeout=WAIT)
            for source, target, limit in ((client, server, None), (server, client, self.limit)):
                thread = threading.Thread(
                    target=self._relay, args=(source, target, limit, client, server), daemon=True
                )
                thread.start()
                self._threads.append(thread)

    def _relay(self, source, target, limit, *both) -> None:
        sent = 0
        try:
            while data := source.recv(65536):
                if limit is not None and sent + len(data) >= limit:
                    target.sendall(data[: limit - sent])
                    self.cuts += 1
                    break
                target.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for connection in both:  # one side ended: end the other
            with contextlib.suppress(OSError):
                connection.shutdown(2)
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        self._socket.close()
        for thread in self._threads:
            thread.join(WAIT)
