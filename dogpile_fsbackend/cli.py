"""Command line for operators and cron: ``python -m dogpile_fsbackend COMMAND DIR``.

``stats`` reads the shared counters (no scan); ``prune``, ``verify`` and
``clear`` scan the cache shard by shard and are safe while applications keep
using it.  The size limit and expiration time are application settings that
the cache directory does not record, so ``prune`` only evicts for size or
age when given ``--cache-size`` or ``--expiration-time``; without them it
removes damaged and abandoned files and recounts the accounting.

A directory is opened only if its marker file says it is a cache; nothing is
ever created in one that is not (exit status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from . import maintenance, marker
from .config import Settings, parse_seconds, parse_size
from .exceptions import BookkeepingError, ConfigError, FSBackendError, NotACacheError
from .layout import MARKER_NAME
from .maintenance import Progress
from .marker import KIND_NAMES
from .store import Store

PROG = "dogpile-fsbackend"
EXIT_ERROR = 1
EXIT_NOT_A_CACHE = 2
_NO_LIMIT = sys.maxsize  # prune without --cache-size never evicts for size

# (json-ready result, human-readable text) of one command run on an open cache.
Outcome = tuple[dict[str, Any], str]


def open_cache(
    base_dir: str, cache_size: int | None = None, expiration_time: float | None = None
) -> Store:
    """The Store of an existing cache directory, laid out as its marker says.

    Raises NotACacheError, and creates nothing, if ``base_dir`` is not a cache.
    """
    base_dir = os.path.abspath(base_dir)
    try:
        found = marker.read(base_dir)
        if found is None:
            raise FileNotFoundError
        marker_mode = os.stat(marker.path_of(base_dir)).st_mode
        dir_mode = os.stat(base_dir).st_mode
    except FileNotFoundError:
        raise NotACacheError(
            f"{base_dir} is not a dogpile_fsbackend cache (no {MARKER_NAME})"
        ) from None
    except (BookkeepingError, ConfigError) as exc:
        raise NotACacheError(f"{base_dir} cannot be opened as a cache: {exc}") from exc
    except OSError as exc:
        raise NotACacheError(f"{base_dir} cannot be opened as a cache: {exc.strerror}") from exc
    settings = Settings(
        base_dir=base_dir,
        cache_size=cache_size or _NO_LIMIT,
        expiration_time=expiration_time,
        reconcile_interval=None,
        file_mode=marker_mode & 0o777,  # anything (re)created matches what is there
        dir_mode=dir_mode & 0o777,
        shard_depth=found.shard_depth,
        shard_width=found.shard_width,
        lock_slots=found.lock_slots,
    )
    return Store(settings, found.kind)


# -- commands -------------------------------------------------------------------


def _stats(store: Store, args: argparse.Namespace, progress: Progress | None) -> Outcome:
    size, entries = store.totals()
    reconciled = store.accounting.last_reconcile
    data = {
        "directory": store.settings.base_dir,
        "kind": KIND_NAMES[store.kind],
        "entries": entries,
        "bytes": size,
        "limit": args.cache_size,
        "shards": store.layout.shard_count,
        "last_reconcile": reconciled or None,
    }
    if args.cache_size:
        limit = f"{_size(args.cache_size)}, {100 * size / args.cache_size:.0f}% used"
    else:
        limit = "not given (pass --cache-size to compare)"
    if reconciled:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(reconciled))
        recounted = f"{when} ({_duration(time.time() - reconciled)} ago)"
    else:
        recounted = "never (prune or verify recounts)"
    text = "\n".join(
        (
            f"cache       {data['directory']} ({data['kind']}, {data['shards']} shards)",
            f"entries     {entries}",
            f"size        {_size(size)} ({size} bytes)",
            f"limit       {limit}",
            f"recounted   {recounted}",
        )
    )
    return data, text


def _prune(store: Store, args: argparse.Namespace, progress: Progress | None) -> Outcome:
    result = maintenance.prune(store, progress)
    size, entries = store.totals()
    data = {
        "directory": store.settings.base_dir,
        "removed": result.removed,
        "removed_bytes": result.removed_bytes,
        "expired": result.expired,
        "evicted": result.removed - result.expired,
        "scan": dataclasses.asdict(result.scan),
        "entries": entries,
        "bytes": size,
        "limit": args.cache_size,
    }
    lines = [
        f"removed {_count(result.removed, 'entry', 'entries')} ({_size(result.removed_bytes)}):"
        f" {result.expired} expired, {data['evicted']} evicted for the size limit",
        _cleanup_line(result.scan),
        f"now {_count(entries, 'entry', 'entries')}, {_size(size)}"
        + (f" of {_size(args.cache_size)}" if args.cache_size else ""),
    ]
    if args.cache_size is None:
        lines.append("no --cache-size given: nothing was evicted for size")
    return data, "\n".join(lines)


def _verify(store: Store, args: argparse.Namespace, progress: Progress | None) -> Outcome:
    report = maintenance.verify(store, progress)
    data = {"directory": store.settings.base_dir, **dataclasses.asdict(report)}
    drift = report.accounting_drift
    text = "\n".join(
        (
            f"read back {_count(report.entries, 'entry', 'entries')} whole"
            f" ({_size(report.bytes)})",
            _cleanup_line(report),
            f"accounting was off by {drift:+d} bytes; recounted"
            if drift
            else "accounting matched the files",
        )
    )
    return data, text


def _clear(store: Store, args: argparse.Namespace, progress: Progress | None) -> Outcome:
    result = maintenance.clear(store, progress)
    data = {
        "directory": store.settings.base_dir,
        "removed": result.removed,
        "removed_bytes": result.removed_bytes,
    }
    text = f"removed {_count(result.removed, 'entry', 'entries')} ({_size(result.removed_bytes)})"
    return data, text


@dataclasses.dataclass(frozen=True)
class _Command:
    help: str
    run: Callable[[Store, argparse.Namespace, Progress | None], Outcome]
    options: tuple[str, ...] = ()  # names in _OPTIONS
    scans: bool = True  # visits every shard, so it can show progress


_MAINTENANCE = {
    "stats": _Command(
        "entries, size and limit, from the shared counters (no scan)",
        _stats,
        ("--cache-size",),
        scans=False,
    ),
    "prune": _Command(
        "remove expired and damaged entries, evict down to --cache-size, recount",
        _prune,
        ("--cache-size", "--expiration-time"),
    ),
    "verify": _Command("read and check every entry, remove damaged ones, recount", _verify),
    "clear": _Command("remove every entry (safe while applications use the cache)", _clear),
}

_OPTIONS: dict[str, dict[str, Any]] = {
    "--cache-size": {
        "type": lambda text: _parse_option(parse_size, "cache_size", text),
        "metavar": "SIZE",
        "help": "the applications' cache_size, e.g. 2GiB (prune evicts down to it)",
    },
    "--expiration-time": {
        "type": lambda text: _parse_option(parse_seconds, "expiration_time", text),
        "metavar": "SECONDS",
        "help": "the applications' expiration_time (prune removes older entries)",
    },
    "--progress": {
        "action": argparse.BooleanOptionalAction,
        "help": "show progress on stderr (default: when stderr is a terminal)",
    },
}


def _run_maintenance(args: argparse.Namespace) -> int:
    command = _MAINTENANCE[args.command]
    show_progress = command.scans and (
        sys.stderr.isatty() if args.progress is None else args.progress
    )
    try:
        store = open_cache(args.directory, args.cache_size, args.expiration_time)
        with _progress(args.command, store.layout.shard_count, show_progress) as progress:
            data, text = command.run(store, args, progress)
    except NotACacheError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_NOT_A_CACHE
    except (FSBackendError, OSError) as exc:
        print(f"{PROG}: {args.command} failed: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(data, indent=2) if args.json else text)
    return 0


# -- parser ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Maintain a dogpile_fsbackend cache directory, or run the demo.",
        epilog=f"Exit status: 0 done, {EXIT_ERROR} failed, "
        f"{EXIT_NOT_A_CACHE} not a cache directory or bad usage.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in _MAINTENANCE.items():
        sub = commands.add_parser(name, help=command.help, description=command.help)
        sub.add_argument("directory", metavar="DIR", help="the cache's base_dir")
        sub.add_argument("--json", action="store_true", help="print the result as JSON")
        options = (*command.options, "--progress") if command.scans else command.options
        for option in options:
            sub.add_argument(option, **_OPTIONS[option])
        sub.set_defaults(
            run=_run_maintenance, cache_size=None, expiration_time=None, progress=None
        )
    demo = commands.add_parser(
        "demo", help="tour both backends in a temp directory, printing hits, misses and timings"
    )
    demo.add_argument(
        "--size-mb", type=int, default=256, help="size of the generated file (default 256)"
    )
    demo.set_defaults(run=_run_demo)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from . import demo  # only the demo needs multiprocessing and friends

    demo.run(args.size_mb)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dogpile_fsbackend`` and ``dogpile-fsbackend``."""
    args = build_parser().parse_args(argv)
    return args.run(args)


# -- helpers --------------------------------------------------------------------


def _parse_option(parse: Callable[[str, Any], Any], name: str, text: str) -> Any:
    """Parse an option with the backend's own parser, so both accept the same spellings."""
    try:
        return parse(name, text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


@contextlib.contextmanager
def _progress(label: str, total: int, enabled: bool) -> Iterator[Progress | None]:
    """A per-shard progress callback: tqdm on a terminal, plain lines otherwise."""
    if not enabled:
        yield None
        return
    if sys.stderr.isatty():  # a redrawn tqdm line would only clutter a log file
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            with tqdm(total=total, desc=label, unit="shard", file=sys.stderr, leave=False) as bar:
                yield bar.update
            return
    yield _LineProgress(label, total, sys.stderr)


class _LineProgress:
    """One line per tenth of the shards done: readable in logs, no carriage returns."""

    def __init__(self, label: str, total: int, stream: TextIO) -> None:
        self.label, self.total, self.stream = label, total, stream
        self.done = self.shown = 0

    def __call__(self, count: int) -> None:
        self.done += count
        tenth = self.done * 10 // self.total
        if tenth > self.shown:
            self.shown = tenth
            print(
                f"{self.label}: {self.done}/{self.total} shards ({tenth * 10}%)",
                file=self.stream,
                flush=True,
            )


def _cleanup_line(report: maintenance.ScanReport) -> str:
    line = (
        f"also removed {report.damaged_removed} damaged or foreign, "
        f"{report.orphans_removed} orphaned data and "
        f"{report.temp_files_removed} abandoned temp file(s)"
    )
    if report.unreadable or report.foreign_kept:
        line += (
            f"; left alone {report.unreadable} unreadable and "
            f"{report.foreign_kept} foreign director(ies) or file(s) (see the log)"
        )
    return line


def _count(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"


def _size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _duration(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f} {unit}"
    return f"{max(seconds, 0):.0f} s"
