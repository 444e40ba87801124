"""A forked child's fresh start: what a thread of the parent held is not held in the child.

``fork()`` copies one thread, the caller.  A lock that another thread of the
parent held at that moment is copied locked, and no thread of the child will
ever release it; a thread the parent ran (a listener, a probe) does not run in
the child.  So each module whose in-process state would trap a child asks here
for it to be reset, and this module's one ``os.register_at_fork`` hook resets it
in every child, before the child's own code goes on.

Resets run in the order they were asked for: the functions (module state, asked
for at import) first, then the objects (asked for as they are made).  None
depends on another: each replaces locks and state of its own and takes no lock.

This module imports nothing from the package, so that every module can use it.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Protocol, TypeVar


class Resettable(Protocol):
    def _reset_after_fork(self) -> None: ...


F = TypeVar("F", bound=Callable[[], object])

_functions: list[Callable[[], object]] = []
# Weak, so that asking keeps nothing alive; a dict, so that resets keep their order.
_objects: weakref.WeakKeyDictionary[Resettable, None] = weakref.WeakKeyDictionary()


def call_in_children(function: F) -> F:
    """Call ``function()`` in every child forked from now on (usable as a decorator)."""
    _functions.append(function)
    return function


def reset_in_children(obj: Resettable) -> None:
    """Call ``obj._reset_after_fork()`` in every child forked while ``obj`` lives."""
    _objects[obj] = None


def _reset_in_child() -> None:
    for function in _functions:
        function()
    for obj in list(_objects):
        obj._reset_after_fork()


os.register_at_fork(after_in_child=_reset_in_child)
