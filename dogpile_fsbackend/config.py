"""Backend arguments: one table of defaults, one parser per argument.

Values may come from Python code or, through ``configure_from_config``, from an
ini file as strings; every parser accepts both.  A bad value raises
:class:`ConfigError` naming the argument; an unknown argument is only logged,
because dogpile's conformance suite passes arbitrary extra ones.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

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
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", "none", ""}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Validated arguments of one backend instance (see the backend docstrings)."""

    base_dir: str
    cache_size: int = GiB
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


def parse_size(name: str, value: Any) -> int:
    """Bytes as an int, or a string such as ``"1073741824"``, ``"512MiB"``, ``"2 GB"``."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            value = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
        else:
            raise ConfigError(
                name, "a positive number of bytes such as 1073741824 or '1GiB'", value
            )
    # at least one whole byte (0.5 would truncate to 0), and finite (int() of nan/inf raises)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value < math.inf:
        raise ConfigError(name, "a positive number of bytes such as 1073741824 or '1GiB'", value)
    return int(value)


def parse_seconds(name: str, value: Any) -> float | None:
    """Seconds as a number, numeric string or ``timedelta``; ``None`` means never."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
    elif isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(name, "a positive number of seconds, a timedelta or None", value)
    return float(value)


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
    if isinstance(value, str):
        try:
            value = int(value.strip().removeprefix("0o"), 8)
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ConfigError(name, "permission bits from 0o000 to 0o777, e.g. 0o600 or '600'", value)
    return value


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


def _positive_seconds(name: str, value: Any) -> float:
    seconds = parse_seconds(name, value)
    if seconds is None:
        raise ConfigError(name, "a positive number of seconds", value)
    return seconds


PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "base_dir": parse_base_dir,
    "cache_size": parse_size,
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
    "temp_max_age": _positive_seconds,
    "write_errors": _one_of("raise", "log"),
}


def parse_arguments(arguments: Mapping[str, Any], accepted: frozenset[str]) -> Settings:
    """Validate ``arguments`` (never modified) into :class:`Settings`."""
    if "base_dir" not in arguments:
        raise ConfigError("base_dir", "given: the directory that holds the cache", None)
    unknown = sorted(set(arguments) - accepted)
    if unknown:
        log.warning("dogpile_fsbackend ignores unknown arguments: %s", ", ".join(unknown))
    values = {
        name: PARSERS[name](name, value) for name, value in arguments.items() if name in accepted
    }
    return Settings(**values)


SETTING_NAMES = frozenset(field.name for field in dataclasses.fields(Settings))
