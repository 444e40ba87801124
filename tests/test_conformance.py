"""dogpile.cache's own conformance suites, run against our backends unchanged."""

from __future__ import annotations

import atexit
import pickle
import shutil
import tempfile

from dogpile.testing.fixtures import (
    _GenericBackendTestSuite,
    _GenericMutexTestSuite,
    _GenericSerializerTestSuite,
)

# The suites read config_args at class level, so each class gets its own directory.
_ROOT = tempfile.mkdtemp(prefix="dogpile-fsbackend-conformance-")
atexit.register(shutil.rmtree, _ROOT, True)


def _arguments(name: str) -> dict:
    return {"arguments": {"base_dir": f"{_ROOT}/{name}", "cache_size": 64 * 1024**2}}


class PickledBackendTest(_GenericBackendTestSuite):
    backend = "dogpile_fsbackend.pickled"
    config_args = _arguments("backend")


class PickledMutexTest(_GenericMutexTestSuite):
    backend = "dogpile_fsbackend.pickled"
    config_args = _arguments("mutex")


class PickledSerializerTest(_GenericSerializerTestSuite, _GenericBackendTestSuite):
    backend = "dogpile_fsbackend.pickled"
    config_args = _arguments("serializer")


class PickledNoDistributedLockTest(_GenericBackendTestSuite):
    """With distributed_lock=False the key mutexes exclude this process's threads only."""

    backend = "dogpile_fsbackend.pickled"
    config_args = {"arguments": {**_arguments("nolock")["arguments"], "distributed_lock": False}}


class PickledDeserializerOnlyTest(_GenericBackendTestSuite):
    """A region given a deserializer= alone (dogpile documents it): it reads bytes, while
    its writes reach the backend as CachedValue objects."""

    backend = "dogpile_fsbackend.pickled"
    config_args = _arguments("deserializer-only")
    region_args = {"deserializer": pickle.loads}
