"""The public surface: exactly ``__all__``, documented the way dogpile documents backends."""

from __future__ import annotations

import dataclasses
import importlib.resources
import inspect
import re
import types
from pathlib import Path

import pytest

import dogpile_fsbackend
from dogpile_fsbackend import PickleFSBackend, RawFSBackend, config, rawtiered, tiered

DEFAULT = re.compile(r"Defaults to ``([^`]+)``")
PARAM = re.compile(r"^\s*:param (\w+):", re.MULTILINE)
ROOT = Path(__file__).parent.parent
DOCS_URL = "https://github.com/dogpile-fsbackend/dogpile_fsbackend/blob/main/"


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


@pytest.mark.parametrize("module", [tiered, rawtiered])
def test_tiered_docstrings_have_one_param_per_argument(module):
    """docs/arguments.md is generated from these fields: none may be missing."""
    backend = module.TieredBackend if module is tiered else module.RawTieredBackend
    params = PARAM.findall(backend.__doc__)
    assert "Basic usage::" in backend.__doc__
    assert sorted(params) == sorted({*module.PARSERS, *module.TIERS})


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def test_the_readme_links_to_docs_pages_that_exist_and_works_on_pypi():
    """PyPI renders the README without the repository: every link and image is absolute."""
    targets = re.findall(r"\]\(([^)\s]+)\)", _readme())
    assert not [t for t in targets if not t.startswith("https://")]
    pages = [t.removeprefix(DOCS_URL).partition("#")[0] for t in targets if DOCS_URL in t]
    assert "docs/usage.md" in pages
    assert [page for page in pages if not (ROOT / page).is_file()] == []


def test_the_docs_include_the_readmes_guarantees_between_its_markers():
    """docs/guarantees.md and the signed-pickles recipe include them, never a copy."""
    text = _readme()
    markers = ["<!-- guarantees:start -->", "<!-- signed-pickles:start -->"]
    markers.append("<!-- guarantees:end -->")
    assert [text.count(marker) for marker in markers] == [1, 1, 1]
    start, pickles, end = (text.index(marker) for marker in markers)
    assert start < text.index("## Guarantees") < pickles < end
    assert "## Guarantees" not in (ROOT / "docs" / "guarantees.md").read_text()


def test_every_test_the_readme_and_the_docs_name_exists():
    """Each promise names the tests behind it: a renamed test must not leave a stale name."""
    defined = set()
    for module in (ROOT / "tests").glob("*.py"):
        defined.add(module.stem)
        defined.update(re.findall(r"^\s*def (test_\w+)", module.read_text(), re.MULTILINE))
    for document in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        named = set(re.findall(r"\btest_\w+", document.read_text()))
        assert sorted(named - defined) == [], document.name
