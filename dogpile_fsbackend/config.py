"""Backend arguments: one table of defaults, one parser per argument.

Values may come from Python code or, through ``configure_from_config``, from an
ini file as strings; every parser accepts both.  A bad value raises
:class:`ConfigError` naming the argument; an unknown argument is only logged,
because dogpile's conformance suite passes arbitrary extra ones, and only once
per process and name: wrappers such as oslo.cache inject arguments the user
cannot remove, and a warning on every backend created would drown the logs.
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

from . import forking
from .exceptions import ConfigError

log = logging.getLogger(__name__)

GiB = 1024**3

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_DURATION_UNITS = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600),
    **dict.fromkeys(("d", "day", "days"), 86400),
    **dict.fromkeys(("w", "week", "weeks"), 7 * 86400),
}
_DURATION = re.compile(r"(?:\s*\d+(?:\.\d+)?\s*[a-z]+)+\s*")  # "90s", "1h30m", "2 days"
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]+)")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", "none", ""}
_warned_unknown: set[str] = set()  # argument names already logged in this process
_warned_unknown_guard = threading.Lock()


@forking.call_in_children
def _new_warned_unknown_guard() -> None:
    """A forked child gets an unheld guard: the parent's thread that held it is not there."""
    global _warned_unknown_guard
    _warned_unknown_guard = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Settings:
    """Validated arguments of one backend instance (see the backend docstrings)."""

    base_dir: str
    cache_size: int = GiB
    max_entries: int | None = None  # an entry-count limit besides cache_size
    expiration_time: float | None = None
    distributed_lock: bool = True
    file_movable: bool = False
    shard_depth: int = 2
    shard_width: int = 1
    lock_slots: int = 2**32  # sparse: an unlocked byte of the lock file costs nothing
    file_mode: int = 0o600
    dir_mode: int = 0o700
    fsync: bool = False
    eviction_low_water: float = 0.9
    reconcile_interval: float | None = 3600.0
    temp_max_age: float = 3600.0
    write_errors: str = "raise"  # or "log": a failed write is logged and counted, not raised
    read_only: bool = False  # serve an existing cache; change nothing, create nothing


def parse_size(name: str, value: Any) -> int:
    """Bytes as an int, or a string such as ``"1073741824"``, ``"512MiB"``, ``"2 GB"``."""
    size = value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        size = float(match.group(1)) * _SIZE_UNITS[unit] if match and unit in _SIZE_UNITS else None
    # at least one whole byte (0.5 would truncate to 0), and finite (int() of nan/inf raises)
    if isinstance(size, bool) or not isinstance(size, (int, float)) or not 1 <= size < math.inf:
        raise ConfigError(name, "a positive number of bytes such as 1073741824 or '1GiB'", value)
    return int(size)


def parse_duration(name: str, value: Any) -> float:
    """Seconds from a number, a ``timedelta`` or a string: ``"3600"``, ``"90s"``, ``"15m"``,
    ``"1h"``, ``"7d"``, ``"2w"``, or several parts such as ``"1h30m"``."""
    seconds = value
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, str):
        seconds = _duration_seconds(value.strip().lower())
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not 0 < seconds < math.inf
    ):
        raise ConfigError(
            name, "a positive duration: seconds, a timedelta, or '90s', '15m', '1h', '7d'", value
        )
    return float(seconds)


def _duration_seconds(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        pass
    if not _DURATION.fullmatch(text):
        return None
    parts = _DURATION_PART.findall(text)
    if any(unit not in _DURATION_UNITS for _, unit in parts):
        return None
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def parse_seconds(name: str, value: Any) -> float | None:
    """A duration as :func:`parse_duration` reads it, or ``None`` (or ``"none"``): never."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    return parse_duration(name, value)


def parse_count(name: str, value: Any) -> int | None:
    """A whole number of at least 1 (an int or a string such as ``"100000"``), or ``None``
    (or ``"none"``): no limit."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        text = value.strip().replace("_", "")
        number = int(text) if text.isdigit() else None
    if number is None or number < 1:
        raise ConfigError(name, "a whole number of entries, at least 1 (or None: no limit)", value)
    return number


def parse_bool(name: str, value: Any) -> bool:
    """``True``/``False``/``None`` or an ini-style string such as ``"yes"``/``"false"``."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(name, "a boolean (True/False, or 'true'/'false' in ini files)", value)


def _int_in(low: int, high: int) -> Callable[[str, Any], int]:
    def parse(name: str, value: Any) -> int:
        try:
            number = int(value) if not isinstance(value, (bool, float)) else None
        except (TypeError, ValueError):
            number = None
        if number is None or not low <= number <= high:
            raise ConfigError(name, f"an integer from {low} to {high}", value)
        return number

    return parse


def parse_mode(name: str, value: Any) -> int:
    """Permission bits as an int (``0o640``) or an octal string (``"640"``, ``"0o640"``)."""
    mode = value
    if isinstance(value, str):
        try:
            mode = int(value.strip().removeprefix("0o"), 8)
        except ValueError:
            mode = None
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
        raise ConfigError(name, "permission bits from 0o000 to 0o777, e.g. 0o600 or '600'", value)
    return mode


def parse_ratio(name: str, value: Any) -> float:
    try:
        ratio = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        ratio = None
    if ratio is None or not 0.0 < ratio <= 1.0:
        raise ConfigError(name, "a fraction of cache_size above 0 and at most 1, e.g. 0.9", value)
    return ratio


def _one_of(*choices: str) -> Callable[[str, Any], str]:
    def parse(name: str, value: Any) -> str:
        text = value.strip().lower() if isinstance(value, str) else value
        if text not in choices:
            raise ConfigError(name, " or ".join(repr(choice) for choice in choices), value)
        return text

    return parse


def parse_base_dir(name: str, value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ConfigError(name, "a directory path (str or os.PathLike)", value)
    return os.path.abspath(os.fspath(value))


PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "base_dir": parse_base_dir,
    "cache_size": parse_size,
    "max_entries": parse_count,
    "expiration_time": parse_seconds,
    "distributed_lock": parse_bool,
    "file_movable": parse_bool,
    "shard_depth": _int_in(1, 4),
    "shard_width": _int_in(1, 3),
    "lock_slots": _int_in(1, 1 << 48),
    "file_mode": parse_mode,
    "dir_mode": parse_mode,
    "fsync": parse_bool,
    "eviction_low_water": parse_ratio,
    "reconcile_interval": parse_seconds,
    "temp_max_age": parse_duration,
    "write_errors": _one_of("raise", "log"),
    "read_only": parse_bool,
}


def parse_arguments(arguments: Mapping[str, Any], accepted: frozenset[str]) -> Settings:
    """Validate ``arguments`` (never modified) into :class:`Settings`."""
    if "base_dir" not in arguments:
        raise ConfigError("base_dir", "given: the directory that holds the cache", None)
    _warn_unknown(set(arguments) - accepted)
    values = {
        name: PARSERS[name](name, value) for name, value in arguments.items() if name in accepted
    }
    return Settings(**values)


def _warn_unknown(names: set[str]) -> None:
    with _warned_unknown_guard:
        new = sorted(names - _warned_unknown)
        _warned_unknown.update(new)
    if new:
        log.warning(
            "dogpile_fsbackend ignores unknown arguments: %s (said once per process)",
            ", ".join(new),
        )


SETTING_NAMES = frozenset(field.name for field in dataclasses.fields(Settings))

# One entry per argument, in Settings order: the backends' ``:param:`` documentation.
ARGUMENT_DOCS = {
    "base_dir": "directory of the cache (str or path), created with its parents; one "
    "directory per backend kind.  Required.",
    "cache_size": "size limit: the total bytes of the entry files, an int or a string with "
    "units such as ``'512MiB'`` or ``'2GB'``.  Defaults to ``1073741824`` (1 GiB).",
    "max_entries": "entry-count limit, enforced like ``cache_size`` and together with it "
    "(whichever is reached first): an int, or ``None`` for no limit.  Many small values "
    "take an inode and a block each, and filesystems run out of inodes too.  Defaults to "
    "``None``.",
    "expiration_time": "a duration (seconds, a ``timedelta``, or ``'90s'``, ``'15m'``, "
    "``'1h'``, ``'7d'``) after which an entry is a miss and goes first on eviction; "
    "independent of the region's ``expiration_time``.  Defaults to ``None`` (never).",
    "distributed_lock": "``get_mutex`` returns a mutex across processes (a byte of the lock "
    "file); ``False`` or ``None``: a mutex among this process's threads only, as dogpile's "
    "own fallback.  Defaults to ``True``.",
    "file_movable": "raw backend only: rename a caller's named file on the cache's "
    "filesystem (one without other hard links) into the cache instead of copying it; the "
    "file then belongs to the cache "
    "(writing to it afterwards changes what later hits read).  Defaults to ``False``.",
    "shard_depth": "levels of shard directories, 1 to 4; fixed when the directory is "
    "created.  Defaults to ``2``.",
    "shard_width": "hex digits per shard level, 1 to 3 (``16**width`` directories per "
    "level; with the default depth, 256 leaf directories, like git's objects); fixed at "
    "creation.  Defaults to ``1``.",
    "lock_slots": "bytes of the lock file that key mutexes hash onto (the file stays "
    "sparse: an unlocked byte costs nothing, so distinct keys practically never share one); "
    "fixed at creation.  Defaults to ``2**32``.",
    "file_mode": "permissions of entry files, an int or an octal string such as ``'640'``.  "
    "Defaults to ``0o600``.",
    "dir_mode": "permissions of shard directories.  Defaults to ``0o700``.",
    "fsync": "``fsync`` every entry before publishing it (durable across power loss, "
    "slower).  Defaults to ``False``.",
    "eviction_low_water": "once a write takes the cache over a limit, the following writes "
    "evict a few entries each until the cache is down to this fraction of ``cache_size`` "
    "(and of ``max_entries``); ``prune()`` evicts down to it at once.  Defaults to ``0.9``.",
    "reconcile_interval": "duration between automatic recounts of the size accounting from "
    "the files; ``None``: only on eviction or ``prune()``.  Defaults to ``3600``.",
    "temp_max_age": "duration after which a temp file whose writer cannot be identified (one "
    "named by an older release) is reclaimed; a live writer's temp file never is.  Defaults "
    "to ``3600``.",
    "write_errors": "what a write that fails with an ``OSError`` does after its one retry "
    "(a full disk is retried once after evicting a batch): ``'raise'`` raises it to the "
    "caller of ``set()`` / ``get_or_create()``; ``'log'`` logs a warning, counts it in "
    "``stats()['write_errors']`` and leaves the value uncached.  Defaults to ``'raise'``.",
    "read_only": "open an existing cache (shipped in an image, on a read-only mount, or "
    "another user's with read permission) without creating or changing any file: hits are "
    "not stamped, nothing damaged is removed, ``get_mutex`` excludes this process's threads "
    "only.  ``get_or_create`` still returns the value it created, without storing it; any "
    "other set, a delete, ``delete_matching``, ``prune``, ``verify`` and ``clear`` raise "
    ":class:`ReadOnlyError`.  A directory that is not a cache raises :class:`ConfigError`, "
    "and a filesystem mounted read-only has the same effect as ``True``.  Defaults to "
    "``False``.",
}


def documented(docstring: str | None, accepted: frozenset[str]) -> str:
    """A backend's docstring with one ``:param:`` per argument it accepts, in order."""
    params = "\n".join(
        f":param {name}: {ARGUMENT_DOCS[name]}" for name in ARGUMENT_DOCS if name in accepted
    )
    return f"{inspect.cleandoc(docstring or '')}\n\n{params}\n"
