"""dogpile.cache's mutex suite against ``dogpile_fsbackend.raw_tiered`` (moto + Redis).

The value suites store str and bytes, which a raw backend does not take
(it stores files), so raw_tiered gets the mutex suite, as the raw backend's
design says; its value round trips are in test_raw_tiered.py.  The suite's one
test that stores values, test_reentrant_dogpile, runs here with files.
The suites read ``config_args`` at class level, before any fixture runs, so a
module-scoped fixture fills in the servers' addresses.
"""

from __future__ import annotations

import atexit
import io
import shutil
import tempfile

import pytest
from dogpile.testing.fixtures import _GenericMutexTestSuite
from servers import S3_CREDENTIALS

_ROOT = tempfile.mkdtemp(prefix="dogpile-fsbackend-raw-tiered-conformance-")
atexit.register(shutil.rmtree, _ROOT, True)
_S3: list[dict] = []
_LOCKS: list[dict] = []


def _raw_tiered(name: str, db: int, **top) -> dict:
    s3 = dict(S3_CREDENTIALS)
    lock = {"db": db, "lock_timeout": 30, "lock_sleep": 0.01}
    _S3.append(s3)
    _LOCKS.append(lock)
    return {
        "arguments": {
            "local": {"base_dir": f"{_ROOT}/{name}", "cache_size": 64 * 1024**2},
            "bucket": "test-bucket",
            "prefix": f"{name}/",
            "s3": s3,
            "lock_backend": "dogpile.cache.redis",
            "lock": lock,
            **top,
        }
    }


@pytest.fixture(scope="module", autouse=True)
def _point_at_the_servers(moto_server, redis_server):
    for s3 in _S3:
        s3["endpoint_url"] = moto_server.endpoint_url
    for lock in _LOCKS:
        lock["url"] = f"redis://127.0.0.1:{redis_server.port}/{lock['db']}"
    moto_server.reset()
    moto_server.client().create_bucket(Bucket="test-bucket")


class _WithFiles:
    def test_reentrant_dogpile(self):
        """dogpile's test, with file values: a creator that calls get_or_create inside."""
        region = self._region()

        def create_foo():
            with region.get_or_create("bar", create_bar) as bar:
                return io.BytesIO(b"foo" + bar.read())

        def create_bar():
            return io.BytesIO(b"bar")

        for _ in range(2):
            with region.get_or_create("foo", create_foo) as foo:
                assert foo.read() == b"foobar"


class RawTieredMutexTest(_WithFiles, _GenericMutexTestSuite):
    backend = "dogpile_fsbackend.raw_tiered"
    config_args = _raw_tiered("mutex", 9)


class RawTieredDegradeMutexTest(_WithFiles, _GenericMutexTestSuite):
    """remote_errors="degrade" changes nothing while the servers are up."""

    backend = "dogpile_fsbackend.raw_tiered"
    config_args = _raw_tiered("degrade", 10, remote_errors="degrade")
