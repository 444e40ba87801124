"""dogpile.cache's own conformance suites against ``dogpile_fsbackend.tiered`` and a real Redis.

The suites read ``config_args`` at class level, before any fixture runs, so the
classes name a placeholder URL that a module-scoped fixture fills in with the
private redis-server's address (each class on its own Redis database).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile

import pytest
from dogpile.testing.fixtures import (
    _GenericBackendTestSuite,
    _GenericMutexTestSuite,
    _GenericSerializerTestSuite,
)

from dogpile_fsbackend import TieredProxy

_ROOT = tempfile.mkdtemp(prefix="dogpile-fsbackend-tiered-conformance-")
atexit.register(shutil.rmtree, _ROOT, True)
_REMOTES: list[dict] = []  # every "remote" dict below, given its URL by the fixture


def _remote(db: int, **extra) -> dict:
    remote = {"db": db, "distributed_lock": True, "lock_timeout": 30, **extra}
    _REMOTES.append(remote)
    return remote


def _tiered(name: str, db: int, remote_extra: dict | None = None, **arguments) -> dict:
    return {
        "arguments": {
            "local": {"base_dir": f"{_ROOT}/{name}", "cache_size": 64 * 1024**2},
            "remote_backend": "dogpile.cache.redis",
            "remote": _remote(db, **(remote_extra or {})),
            **arguments,
        }
    }


@pytest.fixture(scope="module", autouse=True)
def _point_at_redis(redis_server):
    for remote in _REMOTES:
        remote["url"] = f"redis://127.0.0.1:{redis_server.port}/{remote['db']}"
    redis_server.client().flushall()


class TieredBackendTest(_GenericBackendTestSuite):
    backend = "dogpile_fsbackend.tiered"
    config_args = _tiered("backend", 1)


class TieredMutexTest(_GenericMutexTestSuite):
    backend = "dogpile_fsbackend.tiered"
    config_args = _tiered("mutex", 2)


class TieredSerializerTest(_GenericSerializerTestSuite, _GenericBackendTestSuite):
    backend = "dogpile_fsbackend.tiered"
    config_args = _tiered("serializer", 3)


class TieredRemoteLockTest(_GenericBackendTestSuite, _GenericMutexTestSuite):
    """lock="remote": only Redis's lock, polled every 10 ms."""

    backend = "dogpile_fsbackend.tiered"
    config_args = _tiered("remote-lock", 4, {"lock_sleep": 0.01}, lock="remote")


class TieredLocalLockTest(_GenericMutexTestSuite):
    backend = "dogpile_fsbackend.tiered"
    config_args = _tiered("local-lock", 5, lock="local")


class TieredNoPubsubTest(_GenericBackendTestSuite):
    """No invalidation channel: local copies live for local_expiration_time."""

    backend = "dogpile_fsbackend.tiered"
    config_args = _tiered("no-pubsub", 6, invalidation=None, local_expiration_time=60)


class TieredDegradeTest(_GenericMutexTestSuite):
    """remote_errors="degrade" changes nothing while Redis is up."""

    backend = "dogpile_fsbackend.tiered"
    config_args = _tiered("degrade", 7, remote_errors="degrade")


class _SuiteProxy(TieredProxy):
    def __init__(self) -> None:
        super().__init__(local={"base_dir": f"{_ROOT}/proxy", "cache_size": 64 * 1024**2})


class TieredProxyTest(_GenericBackendTestSuite):
    """The region-level tests through a TieredProxy around dogpile's own Redis backend
    (the suite's backend-level tests meet the bare Redis backend)."""

    backend = "dogpile.cache.redis"
    config_args = {
        "arguments": _remote(8, thread_local_lock=False, socket_timeout=1),
        "wrap": [_SuiteProxy],
    }


class _PickledSuiteProxy(TieredProxy):
    def __init__(self) -> None:
        super().__init__(
            local={"base_dir": f"{_ROOT}/proxy-local", "cache_size": 64 * 1024**2},
            local_expiration_time=60,
        )


class TieredProxyAroundPickledTest(_GenericBackendTestSuite, _GenericMutexTestSuite):
    """A TieredProxy around ``dogpile_fsbackend.pickled`` (a shared directory as the
    remote), whose region has no serializer: the proxy pickles as dogpile's default would."""

    backend = "dogpile_fsbackend.pickled"
    config_args = {
        "arguments": {"base_dir": f"{_ROOT}/proxy-shared"},
        "wrap": [_PickledSuiteProxy],
    }
