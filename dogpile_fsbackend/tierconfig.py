"""Arguments of a tier over a remote backend: nested tier arguments, ini keys, choices.

A tiered backend takes its own arguments at the top level and each tier's
arguments nested under a name (``"local"``, ``"remote"``).  From Python they
are dicts; from an ini file (``configure_from_config``) they are dotted keys,
``cache.arguments.local.base_dir = ...``, which each tier's own
``from_config_dict`` turns into values, so each tier coerces its own strings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from .config import parse_seconds
from .exceptions import ConfigError
from .remote import REMOTE_ERRORS
from .tierlock import LOCK_MODES

log = logging.getLogger(__name__)

Parser = Callable[[str, Any], Any]
Tier = TypeVar("Tier")


def parse_choice(choices: Iterable[str | None]) -> Parser:
    """A parser accepting exactly one of ``choices`` (``None`` also as the string "none")."""
    allowed = tuple(choices)

    def parse(name: str, value: Any) -> str | None:
        if isinstance(value, str) and value.strip().lower() == "none" and None in allowed:
            value = None
        if value not in allowed:
            shown = ", ".join(repr(choice) for choice in allowed)
            raise ConfigError(name, f"one of {shown}", value)
        return value  # type: ignore[no-any-return]

    return parse


def _positive_seconds(name: str, value: Any) -> float:
    seconds = parse_seconds(name, value)
    if seconds is None:
        raise ConfigError(name, "a positive number of seconds", value)
    return seconds


parse_lock_mode = parse_choice(LOCK_MODES)

OUTAGE_PARSERS: dict[str, Parser] = {
    "remote_errors": parse_choice(REMOTE_ERRORS),
    "remote_backoff": _positive_seconds,
    "remote_backoff_max": _positive_seconds,
}
"""How any tier over a remote lives through its outages (see remote.RemoteGuard)."""

OUTAGE_DEFAULTS: dict[str, Any] = {
    "remote_errors": "raise",
    "remote_backoff": 1.0,
    "remote_backoff_max": 30.0,
}


def parse_top_level(
    arguments: Mapping[str, Any],
    parsers: Mapping[str, Parser],
    defaults: Mapping[str, Any],
    tiers: Iterable[str],
) -> dict[str, Any]:
    """Validated top-level arguments (defaults filled in); unknown names are logged."""
    tier_names = set(tiers)
    unknown = sorted(
        name
        for name in arguments
        if name not in parsers
        and name not in tier_names
        and name.split(".", 1)[0] not in tier_names
    )
    if unknown:
        log.warning("dogpile_fsbackend ignores unknown arguments: %s", ", ".join(unknown))
    values = dict(defaults)
    values.update(
        {
            name: parse(name, arguments[name])
            for name, parse in parsers.items()
            if name in arguments
        }
    )
    return values


def tier_arguments(arguments: Mapping[str, Any], tier: str) -> dict[str, Any]:
    """A copy of one tier's arguments: ``arguments[tier]`` and any ``"tier.x"`` keys."""
    nested = arguments.get(tier, {})
    if not isinstance(nested, Mapping):
        raise ConfigError(tier, f"a dict of the {tier} tier's arguments", nested)
    found = dict(nested)
    prefix = f"{tier}."
    found.update({k[len(prefix) :]: v for k, v in arguments.items() if k.startswith(prefix)})
    return found


def top_level_of_config(config_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The un-nested ``prefix``-ed keys of an ini config dict, prefix removed."""
    return {
        key[len(prefix) :]: value
        for key, value in config_dict.items()
        if key.startswith(prefix) and "." not in key[len(prefix) :]
    }


def sub_config(config_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The keys of an ini config dict below ``prefix``, prefix removed."""
    return {k[len(prefix) :]: v for k, v in config_dict.items() if k.startswith(prefix)}


def as_config(arguments: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``arguments`` as an ini config dict below ``prefix`` (for ``from_config_dict``)."""
    return {f"{prefix}{key}": value for key, value in arguments.items()}


def has_tier(arguments: Mapping[str, Any], tier: str) -> bool:
    """True if ``arguments`` give the tier ``tier``: a nested dict or ``"tier.x"`` keys."""
    return tier in arguments or any(key.startswith(f"{tier}.") for key in arguments)


def local_tier(build: Callable[[], Tier]) -> Tier:
    """The local tier ``build()`` makes, its ConfigError named as ``local.<argument>``."""
    try:
        return build()
    except ConfigError as exc:
        raise exc.within("local") from exc


def nest_dotted(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"config.s3.addressing_style": "path"}`` as ``{"config": {"s3": {...: "path"}}}``.

    For a tier whose arguments are themselves nested (boto3's ``config``), given
    as dotted ini keys.
    """
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, name = dotted.split(".")
        level = nested
        for parent in parents:
            child = level.setdefault(parent, {})
            if not isinstance(child, dict):
                raise ConfigError(dotted, f"not given both as a value and as {parent}.*", value)
            level = child
        if isinstance(level.get(name), dict):
            raise ConfigError(dotted, f"not given both as a value and as {dotted}.*", value)
        level[name] = value
    return nested
