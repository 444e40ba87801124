"""Shared fixtures: a fresh cache directory per test, and process helpers."""

from __future__ import annotations

import multiprocessing
import shutil
import tempfile

import pytest
from dogpile.cache import make_region

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
