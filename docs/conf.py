"""Sphinx configuration: MyST markdown pages, autodoc of the public API, furo."""

from __future__ import annotations

import sys
from pathlib import Path

import dogpile_fsbackend

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "dogpile_fsbackend"
author = "the dogpile_fsbackend authors"
copyright = "the dogpile_fsbackend authors"
release = version = dogpile_fsbackend.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "backend_arguments",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 4  # "#eviction-and-the-size-limit" links, as on GitHub

autodoc_member_order = "bysource"
autodoc_typehints = "description"

html_theme = "furo"
html_title = f"dogpile_fsbackend {release}"
