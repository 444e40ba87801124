"""``backend-arguments``: one entry per argument of a backend, from its own docstring.

The backends document every argument as a ``:param:`` field (the pickled and raw
backends' come from ``config.ARGUMENT_DOCS``), so the arguments page is generated
from them and cannot drift from the code.  Usage, in reStructuredText (MyST:
inside ``{eval-rst}``)::

    .. backend-arguments:: dogpile_fsbackend.pickled

Each entry is a ``backend-argument`` object named ``<backend>.<argument>``
(``pickled.cache_size``), indexed, and linkable with ``:arg:`pickled.cache_size```.
"""

from __future__ import annotations

import inspect
import re
from importlib.metadata import entry_points
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.errors import ExtensionError
from sphinx.util.docutils import SphinxDirective

# A field ":param name: text", then its continuation lines (indented).
PARAM = re.compile(r"^:param (\w+):(.*(?:\n[ \t]+\S.*)*)", re.MULTILINE)


def backend_class(entry_point: str) -> type:
    """The class registered under ``entry_point`` in dogpile.cache's group."""
    (found,) = entry_points(group="dogpile.cache", name=entry_point) or [None]
    if found is None:
        raise ExtensionError(f"backend-arguments: no dogpile.cache backend {entry_point!r}")
    backend: type = found.load()
    return backend


def documented_arguments(backend: type) -> list[tuple[str, str]]:
    """``(name, text)`` of each ``:param:`` field of the backend's docstring, in order."""
    doc = inspect.cleandoc(backend.__doc__ or "")
    return [(name, inspect.cleandoc(text)) for name, text in PARAM.findall(doc)]


class BackendArguments(SphinxDirective):
    """Every argument of one backend, as ``backend-argument`` entries."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        entry_point = self.arguments[0]
        backend = backend_class(entry_point)
        arguments = documented_arguments(backend)
        if not arguments:
            raise self.error(f"{backend.__qualname__} documents no :param: field")
        short = entry_point.removeprefix("dogpile_fsbackend.")
        lines = StringList()
        source = f"docstring of {backend.__module__}.{backend.__qualname__}"
        for name, text in arguments:
            lines.append(f".. backend-argument:: {short}.{name}", source)
            lines.append("", source)
            for line in text.splitlines():
                lines.append(f"   {line}", source)
            lines.append("", source)
        container = nodes.container()
        self.state.nested_parse(lines, self.content_offset, container)
        return container.children


def parse_argument(env: BuildEnvironment, signature: str, node: addnodes.desc_signature) -> str:
    """Show ``cache_size`` for the object ``pickled.cache_size``."""
    node += addnodes.desc_name(signature, signature.rpartition(".")[2])
    return signature


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_object_type(
        "backend-argument",
        "arg",
        indextemplate="pair: %s; backend argument",
        parse_node=parse_argument,
    )
    app.add_directive("backend-arguments", BackendArguments)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
