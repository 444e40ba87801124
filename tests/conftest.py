"""Shared fixtures: a fresh cache directory per test, and process helpers."""

from __future__ import annotations

import multiprocessing
import shutil
import tempfile

import pytest
from dogpile.cache import make_region
from dogpile.cache.backends import redis as dogpile_redis
from servers import (
    MotoServer,
    RedisClusterServer,
    RedisServer,
    moto_installed,
    redis_server_binary,
)

# Spawned children inherit no locks or threads from the test runner.
SPAWN = multiprocessing.get_context("spawn")
WAIT = 60  # generous bound for every cross-process wait, in seconds


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "cache")


@pytest.fixture
def pickled_region(cache_dir):
    def make(**arguments):
        return make_region().configure(
            "dogpile_fsbackend.pickled", arguments={"base_dir": cache_dir, **arguments}
        )

    return make


@pytest.fixture
def raw_region(cache_dir):
    def make(**arguments):
        return make_region().configure(
            "dogpile_fsbackend.raw", arguments={"base_dir": cache_dir, **arguments}
        )

    return make


@pytest.fixture(scope="session")
def session_dir():
    path = tempfile.mkdtemp(prefix="dogpile-fsbackend-tests-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def pytest_addoption(parser):
    parser.addoption(
        "--soak-ops",
        type=int,
        default=None,
        help="operations per soak test and kill rounds of the crash tests "
        "(default: a short run for CI; e.g. --soak-ops 200000 for a long soak)",
    )


@pytest.fixture
def soak_ops(request):
    """The --soak-ops value, or None for the short CI default."""
    return request.config.getoption("--soak-ops")


def _redis_binary() -> str:
    binary = redis_server_binary()
    if binary is None:
        pytest.skip(
            "redis-server is not installed (Debian: apt-get install redis-server); "
            "the tiered backend's tests need a real Redis"
        )
    return binary


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A private redis-server shared by the tests that do not stop it (flushed per test)."""
    server = RedisServer(_redis_binary(), str(tmp_path_factory.mktemp("redis"))).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """The shared server's URL, emptied before the test."""
    if not redis_server.process or redis_server.process.poll() is not None:
        redis_server.start()  # a test killed it after all
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server of the test's own, to kill, pause and restart."""
    server = RedisServer(_redis_binary(), str(tmp_path / "redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_cluster(tmp_path):
    """A one-node Redis Cluster of the test's own (dogpile.cache.redis_cluster)."""
    if not hasattr(dogpile_redis, "RedisClusterBackend"):
        pytest.skip("dogpile.cache.redis_cluster arrived in dogpile.cache 1.3.2")
    server = RedisClusterServer(_redis_binary(), str(tmp_path / "redis-cluster")).start()
    yield server
    server.stop()


def _require_moto() -> None:
    if not moto_installed():
        pytest.skip(
            "moto is not installed (pip install 'moto[server]', part of the test extra); "
            "the raw_tiered backend's tests need a real S3 endpoint"
        )


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """moto's S3 server, shared by the tests that do not stop it (reset per test)."""
    _require_moto()
    server = MotoServer(str(tmp_path_factory.mktemp("moto"))).start()
    yield server
    server.stop()


@pytest.fixture
def s3(moto_server):
    """The shared S3 server, emptied, with the bucket ``test-bucket`` made."""
    if not moto_server.process or moto_server.process.poll() is not None:
        moto_server.start()  # a test stopped it after all
    moto_server.reset()
    moto_server.client().create_bucket(Bucket="test-bucket")
    return moto_server


@pytest.fixture
def private_s3(tmp_path):
    """An S3 server of the test's own, to kill, pause and restart (with ``test-bucket``)."""
    _require_moto()
    server = MotoServer(str(tmp_path / "moto")).start()
    server.client().create_bucket(Bucket="test-bucket")
    yield server
    server.stop()
