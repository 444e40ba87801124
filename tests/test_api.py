"""The public surface: exactly ``__all__``, documented the way dogpile documents backends."""

from __future__ import annotations

import dataclasses
import importlib.resources
import inspect
import re
import types

import pytest

import dogpile_fsbackend
from dogpile_fsbackend import PickleFSBackend, RawFSBackend, config

DEFAULT = re.compile(r"Defaults to ``([^`]+)``")


def test_the_public_api_is_exactly_all():
    public = {
        name
        for name, value in vars(dogpile_fsbackend).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(dogpile_fsbackend.__all__)
    assert {"PruneResult", "ScanReport", "CachedFileReader", "mount"} <= public  # documented


@pytest.mark.parametrize("name", dogpile_fsbackend.__all__)
def test_every_public_name_has_a_docstring(name):
    value = getattr(dogpile_fsbackend, name)
    assert inspect.getdoc(value), name
    assert value.__module__.startswith("dogpile_fsbackend.")


def test_argument_docs_cover_every_argument_in_settings_order():
    assert list(config.ARGUMENT_DOCS) == [f.name for f in dataclasses.fields(config.Settings)]


@pytest.mark.parametrize("backend", [PickleFSBackend, RawFSBackend])
def test_backend_docstrings_have_usage_and_one_param_per_argument_with_its_default(backend):
    doc = backend.__doc__
    assert "Basic usage::" in doc
    params = dict(re.findall(r"^:param (\w+): (.*)$", doc, re.MULTILINE))
    assert set(params) == backend._accepted_arguments
    assert len(re.findall(r"^:param ", doc, re.MULTILINE)) == len(params)
    defaults = {f.name: f.default for f in dataclasses.fields(config.Settings)}
    for name, text in params.items():
        if name == "base_dir":
            assert text.endswith("Required.")
            continue
        (literal,) = DEFAULT.findall(text)
        assert eval(literal) == defaults[name], name  # the literals of our own docstrings


def test_py_typed_is_shipped():
    assert importlib.resources.files("dogpile_fsbackend").joinpath("py.typed").is_file()
