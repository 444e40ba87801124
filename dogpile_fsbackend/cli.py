"""Command line for operators and cron: ``python -m dogpile_fsbackend COMMAND DIR``.

``stats`` reads the shared counters (no scan); ``prune``, ``verify``,
``clear`` and ``delete`` scan the cache shard by shard and are safe while
applications keep using it.  ``keys`` lists the stored keys as a stream, in
constant memory.  ``keys`` and every ``--dry-run`` open the cache read-only:
they create and change nothing, so they work on a read-only mount and as a
user who may only read the cache.

The limits and expiration time are application settings that the cache
directory does not record, so ``prune`` only evicts for size, count or age
when given ``--cache-size``, ``--max-entries`` or ``--expiration-time``;
without them it removes damaged and abandoned files and recounts the
accounting.  Ctrl-Z (SIGTSTP) stops a scan between two shards, holding no
lock, so nobody waits for it while it is stopped.

A directory is opened only if its marker file says it is a cache; nothing is
ever created in one that is not (exit status 2).

``invalidate`` records a soft or hard invalidation that every process using
``SharedInvalidation`` on the directory honours; it takes any existing
directory (a cache's, or one shared by several regions) and creates none.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TextIO

from . import __version__, listing, maintenance, marker
from .config import Settings, parse_count, parse_seconds, parse_size
from .exceptions import BookkeepingError, ConfigError, FSBackendError, NotACacheError
from .invalidation import InvalidationTimes, SharedInvalidation, read_times
from .layout import INVALIDATION_NAME, MARKER_NAME, encode_key
from .maintenance import Progress
from .marker import KIND_NAMES
from .store import Store

PROG = "dogpile-fsbackend"
EXIT_ERROR = 1
EXIT_NOT_A_CACHE = 2
EXIT_INTERRUPTED = 130  # what a shell reports for a process stopped by SIGINT (128 + 2)
EXIT_BROKEN_PIPE = 141  # what a shell reports for a process killed by SIGPIPE (128 + 13)
_NO_LIMIT = sys.maxsize  # prune without --cache-size never evicts for size

# (json-ready result, human-readable text) of one command run on an open cache.
Outcome = tuple[dict[str, Any], str]


def open_cache(
    base_dir: str,
    cache_size: int | None = None,
    expiration_time: float | None = None,
    max_entries: int | None = None,
    read_only: bool = False,
) -> Store:
    """The Store of an existing cache directory, laid out as its marker says.

    Raises NotACacheError, and creates nothing, if ``base_dir`` is not a cache.
    """
    base_dir = os.path.abspath(base_dir)
    if not os.path.lexists(base_dir):
        raise NotACacheError(f"{base_dir} does not exist")
    if not os.path.isdir(base_dir):
        raise NotACacheError(f"{base_dir} is not a directory")
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
        max_entries=max_entries,
        expiration_time=expiration_time,
        reconcile_interval=None,
        file_mode=marker_mode & 0o777,  # anything (re)created matches what is there
        dir_mode=dir_mode & 0o777,
        shard_depth=found.shard_depth,
        shard_width=found.shard_width,
        lock_slots=found.lock_slots,
        read_only=read_only,
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
        "entry_limit": args.max_entries,
        "shards": store.layout.shard_count,
        "last_reconcile": reconciled or None,
    }
    if args.cache_size:
        limit = f"{_size(args.cache_size)}, {100 * size / args.cache_size:.0f}% used"
    else:
        limit = "not given (pass --cache-size to compare)"
    recounted = _moment(reconciled) if reconciled else "never (prune or verify recounts)"
    times, problem = read_times(store.settings.base_dir)
    data.update(_invalidation_data(times, problem))
    text = "\n".join(
        (
            f"cache       {data['directory']} ({data['kind']}, {data['shards']} shards)",
            f"entries     {entries}",
            f"size        {_size(size)} ({size} bytes)",
            f"limit       {limit}",
            *(
                [f"entry limit {args.max_entries}, {100 * entries / args.max_entries:.0f}% used"]
                if args.max_entries
                else []
            ),
            f"recounted   {recounted}",
            f"invalidated {_invalidation_text(times, problem)}",
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
        "entry_limit": args.max_entries,
    }
    lines = [
        f"removed {_count(result.removed, 'entry', 'entries')} ({_size(result.removed_bytes)}):"
        f" {result.expired} expired, {data['evicted']} evicted for the limits",
        _cleanup_line(result.scan),
        f"now {_count(entries, 'entry', 'entries')}"
        + (f" of {args.max_entries}" if args.max_entries else "")
        + f", {_size(size)}"
        + (f" of {_size(args.cache_size)}" if args.cache_size else ""),
    ]
    if args.cache_size is None and args.max_entries is None:
        lines.append("no --cache-size or --max-entries given: nothing was evicted for size")
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
    directory = store.settings.base_dir
    if args.dry_run:
        size, entries = store.totals()
        data = {"directory": directory, "dry_run": True, "entries": entries, "bytes": size}
        text = (
            f"would remove {_count(entries, 'entry', 'entries')} ({_size(size)}), "
            "as the shared counters say; nothing was removed (--dry-run)"
        )
        return data, text
    result = maintenance.clear(store, progress)
    data = {
        "directory": directory,
        "removed": result.removed,
        "removed_bytes": result.removed_bytes,
    }
    text = f"removed {_count(result.removed, 'entry', 'entries')} ({_size(result.removed_bytes)})"
    return data, text


def _delete(store: Store, args: argparse.Namespace, progress: Progress | None) -> Outcome:
    directory, prefix = store.settings.base_dir, args.prefix
    if args.dry_run:
        entries = bytes_ = 0
        for entry in listing.entries(store, encode_key(prefix), progress, live=False):
            entries += 1
            bytes_ += entry.size
        data = {
            "directory": directory,
            "prefix": prefix,
            "dry_run": True,
            "entries": entries,
            "bytes": bytes_,
        }
        text = (
            f"would remove {_count(entries, 'entry', 'entries')} ({_size(bytes_)}) whose keys "
            f"start with {prefix!r}; nothing was removed (--dry-run)"
        )
        return data, text
    with _stop_asked_by_ctrl_c() as asked:
        deleted = listing.delete_matching(store, encode_key(prefix), progress, asked.is_set)
    data = {
        "directory": directory,
        "prefix": prefix,
        "removed": deleted.removed,
        "removed_bytes": deleted.removed_bytes,
        "interrupted": deleted.interrupted,
    }
    text = (
        f"removed {_count(deleted.removed, 'entry', 'entries')} "
        f"({_size(deleted.removed_bytes)}) whose keys start with {prefix!r}"
    )
    if deleted.interrupted:
        print(f"{PROG}: delete interrupted; run it again to remove the rest", file=sys.stderr)
    return data, text


@contextlib.contextmanager
def _stop_asked_by_ctrl_c() -> Iterator[threading.Event]:
    """Ctrl-C (SIGINT) sets the event: a delete finishes the entry at hand (its files
    and its counters) and stops there; a second Ctrl-C interrupts at once."""
    asked = threading.Event()

    def ask(signum: int, frame: Any) -> None:
        asked.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, ask)
    try:
        yield asked
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclasses.dataclass(frozen=True)
class _Command:
    help: str
    run: Callable[[Store, argparse.Namespace, Progress | None], Outcome]
    options: Mapping[str, str] = dataclasses.field(default_factory=dict)  # name -> its help
    scans: bool = True  # visits every shard, so it can show progress
    passes: int = 1  # how many times it visits every shard
    dry_run_scans: bool = False  # its --dry-run visits every shard too
    # Refused at once on a read-only cache.  A --dry-run opens the cache read-only; stats
    # opens it as the applications do (it reports a planted lock file, repairs a damaged
    # accounting file), which on a read-only filesystem is read-only too.
    changes: bool = True
    confirms: bool = False  # asks before it starts when run on a terminal


_MAINTENANCE = {
    "stats": _Command(
        "entries, size and limit, from the shared counters (no scan)",
        _stats,
        {
            "--cache-size": "the applications' cache_size, e.g. 2GiB, to show how full it is",
            "--max-entries": "the applications' max_entries, to show how full it is",
        },
        scans=False,
        changes=False,
    ),
    "prune": _Command(
        "remove expired and damaged entries, evict down to --cache-size, recount",
        _prune,
        {
            "--cache-size": "the applications' cache_size, e.g. 2GiB: evict down to 90%% of it",
            "--max-entries": "the applications' max_entries, e.g. 1000000: evict down to 90%% "
            "of it",
            "--expiration-time": "the applications' expiration_time, e.g. 86400, 90m, 1h or "
            "7d: remove older entries",
        },
        passes=maintenance.PRUNE_PASSES,
    ),
    "verify": _Command("read and check every entry, remove damaged ones, recount", _verify),
    "clear": _Command(
        "remove every entry (safe while applications use the cache)",
        _clear,
        {
            "--dry-run": "say how many entries would go, remove nothing",
            "--yes": "do not ask for confirmation on a terminal",
        },
        confirms=True,
    ),
    "delete": _Command(
        "remove every entry whose key starts with --prefix (safe while applications use "
        "the cache); keys are matched as stored, after the regions' key_mangler",
        _delete,
        {
            "--prefix": "the start of the keys to remove, e.g. 'myapp.reports:' (not empty: "
            "to remove every entry, use clear)",
            "--dry-run": "count the entries that would go, remove nothing (list them with "
            "keys --prefix)",
        },
        dry_run_scans=True,
    ),
}

_OPTIONS: dict[str, dict[str, Any]] = {
    "--cache-size": {
        "type": lambda text: _parse_option(parse_size, "cache_size", text),
        "metavar": "SIZE",
    },
    "--max-entries": {
        "type": lambda text: _parse_option(parse_count, "max_entries", text),
        "metavar": "N",
    },
    "--expiration-time": {
        "type": lambda text: _parse_option(parse_seconds, "expiration_time", text),
        "metavar": "DURATION",
    },
    "--dry-run": {"action": "store_true"},
    "--prefix": {"type": lambda text: _non_empty_prefix(text), "metavar": "P", "required": True},
    "--yes": {"action": "store_true"},
    "--progress": {
        "action": argparse.BooleanOptionalAction,
        "help": "show progress on stderr (default: when stderr is a terminal)",
    },
}


def _run_invalidate(args: argparse.Namespace) -> int:
    directory = os.path.abspath(args.directory)
    if not os.path.isdir(directory):  # a mistyped path must not become a new directory
        print(f"{PROG}: {directory} is not a directory (invalidate creates none)", file=sys.stderr)
        return EXIT_NOT_A_CACHE
    kind = "hard" if args.hard else "soft"
    try:
        strategy = SharedInvalidation(directory)
        strategy.invalidate(hard=args.hard)
        times = strategy.times()
    except (FSBackendError, OSError) as exc:
        print(f"{PROG}: invalidate failed: {exc}", file=sys.stderr)
        return EXIT_ERROR
    at = times.hard_at if args.hard else times.soft_at
    data = {"directory": directory, "kind": kind, "invalidated_at": at}
    data.update(_invalidation_data(times, None))
    text = (
        f"{kind} invalidation of {directory} at {_moment(at)}: every process using "
        f"SharedInvalidation on it treats values created before then as "
        + ("missing" if args.hard else "stale (served while one process regenerates)")
    )
    print(json.dumps(data, indent=2) if args.json else text)
    return 0


def _run_maintenance(args: argparse.Namespace) -> int:
    command = _MAINTENANCE[args.command]
    show_progress = (
        command.scans
        and (command.dry_run_scans or not args.dry_run)
        and (sys.stderr.isatty() if args.progress is None else args.progress)
    )
    try:
        store = open_cache(
            args.directory,
            args.cache_size,
            args.expiration_time,
            args.max_entries,
            read_only=args.dry_run,
        )
        if command.changes and not args.dry_run:
            store.check_writable(args.command)
        asks = command.confirms and not (args.dry_run or args.yes) and sys.stdin.isatty()
        if asks and not _confirm(args.command, store):
            print(f"{PROG}: {args.command} cancelled; nothing was removed", file=sys.stderr)
            return EXIT_ERROR
        total = store.layout.shard_count * command.passes
        with (
            _progress(args.command, total, show_progress) as shown,
            _stopping_between_shards(shown) as progress,
        ):
            data, text = command.run(store, args, progress)
    except NotACacheError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_NOT_A_CACHE
    except (FSBackendError, OSError) as exc:
        print(f"{PROG}: {args.command} failed: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(data, indent=2) if args.json else text)
    return EXIT_INTERRUPTED if data.get("interrupted") else 0


def _run_keys(args: argparse.Namespace) -> int:
    """Stream the stored keys to stdout as they are found: constant memory, any size."""
    # Progress would interleave with the keys on a terminal: by default only when they
    # go elsewhere (a file, a pipe) and stderr is a terminal.
    shown = sys.stderr.isatty() and not sys.stdout.isatty()
    try:
        store = open_cache(args.directory, expiration_time=args.expiration_time, read_only=True)
        prefix = encode_key(args.prefix or "")
        with _progress(
            "keys", store.layout.shard_count, shown if args.progress is None else args.progress
        ) as progress:
            for entry in listing.entries(store, prefix, progress):
                print(json.dumps(entry.key) if args.json else _printable(entry.key))
        sys.stdout.flush()
    except NotACacheError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_NOT_A_CACHE
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as ls would
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the flush at exit fails no more
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:  # a listing changes nothing: stopping anywhere is safe
        sys.stdout.flush()
        print(f"{PROG}: keys interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (FSBackendError, OSError) as exc:
        print(f"{PROG}: keys failed: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def _printable(key: str) -> str:
    """A key as text for a terminal: a lone surrogate (a key no UTF-8 can carry) as \\udcxx."""
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def _confirm(command: str, store: Store) -> bool:
    """Ask on the terminal before removing every entry; only "y" or "yes" goes ahead."""
    size, entries = store.totals()
    question = (
        f"{command} {store.settings.base_dir}: remove every entry "
        f"({_count(entries, 'entry', 'entries')}, {_size(size)})? [y/N] "
    )
    print(question, end="", file=sys.stderr, flush=True)  # stdout is for the result
    return sys.stdin.readline().strip().lower() in ("y", "yes")  # "" at end of input


# -- parser ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Maintain a dogpile_fsbackend cache directory, or run the demo.",
        epilog=f"Exit status: 0 done, {EXIT_ERROR} failed or not confirmed, "
        f"{EXIT_NOT_A_CACHE} no such directory, not a cache directory or bad usage.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in _MAINTENANCE.items():
        sub = commands.add_parser(name, help=command.help, description=command.help)
        sub.add_argument("directory", metavar="DIR", help="the cache's base_dir")
        sub.add_argument("--json", action="store_true", help="print the result as JSON")
        for option, help_text in command.options.items():
            sub.add_argument(option, **_OPTIONS[option], help=help_text)
        if command.scans:
            sub.add_argument("--progress", **_OPTIONS["--progress"])
        sub.set_defaults(
            run=_run_maintenance,
            cache_size=None,
            max_entries=None,
            expiration_time=None,
            progress=None,
            dry_run=False,
            yes=False,
        )
    keys_help = "list the stored keys, one per line, as they are found (constant memory)"
    keys = commands.add_parser(
        "keys",
        help=keys_help,
        description=f"{keys_help[0].upper()}{keys_help[1:]}. Only live entries are "
        "listed (damaged or foreign files are left out, and with --expiration-time expired "
        "entries too), in no particular order; nothing is changed. The keys are those the "
        "backend stores: after a region's key_mangler, if it has one.",
    )
    keys.add_argument("directory", metavar="DIR", help="the cache's base_dir")
    keys.add_argument("--prefix", metavar="P", help="only the keys that start with P")
    keys.add_argument(
        "--json",
        action="store_true",
        help="print each key as a JSON string on a line of its own (JSON Lines, streamed: "
        "exact for keys with line breaks or odd characters; read them with jq -r . or "
        "json.loads per line)",
    )
    keys.add_argument(
        "--expiration-time",
        **_OPTIONS["--expiration-time"],
        help="the applications' expiration_time, e.g. 1h: leave out older entries",
    )
    keys.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        help="show progress on stderr (default: when stderr is a terminal and the keys "
        "go to a file or pipe)",
    )
    keys.set_defaults(run=_run_keys)
    invalidate_help = "invalidate every region that uses SharedInvalidation on DIR"
    invalidate = commands.add_parser(
        "invalidate",
        help=invalidate_help,
        description=f"{invalidate_help}: soft by default, like region.invalidate(hard=False); "
        "soft needs an expiration_time on the regions (dogpile raises without one).",
    )
    invalidate.add_argument(
        "directory", metavar="DIR", help="the directory given to SharedInvalidation (base_dir)"
    )
    invalidate.add_argument(
        "--hard",
        action="store_true",
        help="hard: every process regenerates before using a value again",
    )
    invalidate.add_argument("--json", action="store_true", help="print the result as JSON")
    invalidate.set_defaults(run=_run_invalidate)
    demo_help = "tour both backends in a temp directory, printing hits, misses and timings"
    demo = commands.add_parser(
        "demo",
        help=demo_help,
        description=f"{demo_help[0].upper()}{demo_help[1:]}: a slow function memoized with "
        "the pickled backend, a generated file memoized with the raw backend, and four "
        "processes asking for one value at once. Needs SIZE_MB MiB (plus under 1 MiB) of "
        "free space in the temp directory ($TMPDIR); removes everything when done.",
    )
    demo.add_argument(
        "--size-mb",
        type=_positive_int,
        default=256,
        help="size of the generated file in MiB (default 256)",
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
    status: int = args.run(args)
    return status


# -- helpers --------------------------------------------------------------------


def _parse_option(parse: Callable[[str, Any], Any], name: str, text: str) -> Any:
    """Parse an option with the backend's own parser, so both accept the same spellings."""
    try:
        return parse(name, text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _non_empty_prefix(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError(
            "must not be empty (an empty prefix matches every key); to remove every entry, "
            "use clear"
        )
    return text


def _positive_int(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number above 0; got {text!r}")
    return number


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


@contextlib.contextmanager
def _stopping_between_shards(shown: Progress | None) -> Iterator[Progress]:
    """A progress callback that also stops the process, when Ctrl-Z (SIGTSTP) asked for it,
    between two shards: holding no shard lock, so that no application write waits for a
    stopped scan.  (A plain SIGSTOP stops it where it is; writers to the one shard it may
    hold then wait until it is continued.)"""
    asked: list[int] = []

    def progress(count: int) -> None:
        if shown:
            shown(count)
        if asked:
            asked.clear()
            os.kill(os.getpid(), signal.SIGSTOP)

    previous = signal.signal(signal.SIGTSTP, lambda signum, frame: asked.append(signum))
    try:
        yield progress
    finally:
        signal.signal(signal.SIGTSTP, previous)


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


def _invalidation_data(times: InvalidationTimes | None, problem: str | None) -> dict[str, Any]:
    return {
        "soft_invalidated": times.soft_at if times else None,
        "hard_invalidated": times.hard_at if times else None,
        "invalidation_problem": problem,
    }


def _invalidation_text(times: InvalidationTimes | None, problem: str | None) -> str:
    if problem:
        return f"unknown: {INVALIDATION_NAME} {problem} (processes honour it as hard)"
    if not times or not times.latest_ns:
        return "never"
    kinds = [(at, kind) for at, kind in ((times.hard_at, "hard"), (times.soft_at, "soft")) if at]
    return "; ".join(f"{kind} {_moment(at)}" for at, kind in sorted(kinds, reverse=True))


def _moment(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
    return f"{when} ({_duration(time.time() - timestamp)} ago)"


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
