"""The command line, run as operators and cron run it: a separate process per command."""

from __future__ import annotations

import fcntl
import importlib.util
import io
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

import faultkit
import pytest
from conftest import WAIT
from dogpile.cache import make_region

from dogpile_fsbackend import layout, locking, maintenance, records

COMMANDS = ("stats", "prune", "verify", "clear", "keys")


def _cli(
    *args: str, stderr: int = subprocess.PIPE, stdin: int | None = subprocess.DEVNULL
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dogpile_fsbackend", *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        timeout=WAIT,
        check=False,
    )


def _json(*args: str) -> dict:
    done = _cli(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _backend(base_dir: str, kind: str = "pickled", **arguments):
    region = make_region().configure(
        f"dogpile_fsbackend.{kind}", arguments={"base_dir": base_dir, **arguments}
    )
    return region.backend


@pytest.fixture
def filled(cache_dir):
    """A pickled cache holding 40 entries of 1000-byte values."""
    backend = _backend(cache_dir)
    for i in range(40):
        backend.set_serialized(f"k{i:02d}", b"v" * 1000)
    return backend


def _entry_path(backend, key: str) -> str:
    return backend.store.layout.entry_path(layout.key_digest(key.encode()))


def test_stats_reads_the_shared_counters(filled, cache_dir):
    data = _json("stats", cache_dir)
    assert (data["entries"], data["bytes"]) == (40, filled.stats()["bytes"])
    assert data["kind"] == "pickled"
    assert data["limit"] is None
    assert _json("stats", cache_dir, "--cache-size", "1MiB")["limit"] == 1024**2
    text = _cli("stats", cache_dir, "--cache-size", "1MiB").stdout
    assert "entries     40" in text
    assert "% used" in text


def test_stats_of_a_raw_cache(cache_dir):
    _backend(cache_dir, "raw").set("file", io.BytesIO(b"x" * 5000))
    data = _json("stats", cache_dir)
    assert (data["kind"], data["entries"]) == ("raw", 1)
    assert data["bytes"] > 5000  # the data file and its record


def test_prune_evicts_down_to_the_given_size(filled, cache_dir):
    limit = 20 * 1100
    data = _json("prune", cache_dir, "--cache-size", str(limit))
    assert data["removed"] == data["evicted"] > 0
    assert data["expired"] == 0
    assert data["bytes"] <= 0.9 * limit
    assert data["entries"] == 40 - data["removed"]
    assert data["scan"]["entries"] == 40  # what the scan counted before evicting
    assert filled.stats()["bytes"] == data["bytes"]


def test_prune_evicts_down_to_the_given_entry_count(filled, cache_dir):
    for i in range(40):  # a known LRU order: k00 least recently used
        when = time.time_ns() - (100 - i) * 10**9
        os.utime(_entry_path(filled, f"k{i:02d}"), ns=(when, when))
    data = _json("prune", cache_dir, "--max-entries", "20")
    assert (data["removed"], data["evicted"], data["entries"]) == (22, 22, 18)  # 90% of 20
    assert data["entry_limit"] == 20
    assert [os.path.exists(_entry_path(filled, f"k{i:02d}")) for i in range(40)] == [
        False
    ] * 22 + [True] * 18
    assert "of 20" in _cli("prune", cache_dir, "--max-entries", "20").stdout
    assert _json("stats", cache_dir, "--max-entries", "36")["entry_limit"] == 36
    assert "entry limit 36, 50% used" in _cli("stats", cache_dir, "--max-entries", "36").stdout
    done = _cli("prune", cache_dir, "--max-entries", "0")
    assert done.returncode == 2 and "max_entries" in done.stderr


def test_prune_removes_expired_entries_when_told_the_expiration_time(filled, cache_dir):
    old = _entry_path(filled, "k00")
    two_hours_ago = time.time_ns() - 7200 * 10**9
    os.utime(old, ns=(two_hours_ago, two_hours_ago))  # atime is an entry's creation time
    data = _json("prune", cache_dir, "--expiration-time", "3600")
    assert (data["removed"], data["expired"], data["evicted"]) == (1, 1, 0)
    assert not os.path.exists(old)


@pytest.mark.parametrize("duration", ["1h", "60m", "3600s", "1h0m"])
def test_prune_takes_the_expiration_time_with_units(filled, cache_dir, duration):
    old = _entry_path(filled, "k00")
    two_hours_ago = time.time_ns() - 7200 * 10**9
    os.utime(old, ns=(two_hours_ago, two_hours_ago))
    data = _json("prune", cache_dir, "--expiration-time", duration)
    assert (data["removed"], data["expired"]) == (1, 1)


@pytest.mark.parametrize(
    ("option", "value"), [("--expiration-time", "1y"), ("--cache-size", "2 parsecs")]
)
def test_a_bad_option_value_is_quoted_in_the_error(filled, cache_dir, option, value):
    done = _cli("prune", cache_dir, option, value)
    assert done.returncode == 2
    assert f"got {value!r}" in done.stderr
    assert os.path.exists(_entry_path(filled, "k00"))


def test_prune_without_limits_only_cleans_up(filled, cache_dir):
    directory = os.path.dirname(_entry_path(filled, "k00"))
    debris = [
        os.path.join(directory, layout.TEMP_PREFIX + "nopid"),  # left by a crashed writer
        os.path.join(directory, "not-an-entry"),
    ]
    for path in debris:
        with open(path, "wb") as handle:
            handle.write(b"debris")
    data = _json("prune", cache_dir)
    assert (data["removed"], data["entries"], data["limit"]) == (0, 40, None)
    assert (data["scan"]["temp_files_removed"], data["scan"]["damaged_removed"]) == (1, 1)
    assert not any(os.path.exists(path) for path in debris)
    assert "nothing was evicted for size" in _cli("prune", cache_dir).stdout


def test_verify_removes_damaged_entries_and_fixes_the_accounting(filled, cache_dir):
    with open(_entry_path(filled, "k00"), "r+b") as handle:
        handle.truncate(records.HEADER_SIZE)
    os.unlink(_entry_path(filled, "k01"))  # behind the counters' back
    data = _json("verify", cache_dir)
    assert data["damaged_removed"] == 1
    assert data["entries"] == 38
    assert data["accounting_drift"] < 0
    stats = _json("stats", cache_dir)
    assert (stats["entries"], stats["bytes"]) == (38, data["bytes"])
    assert "accounting matched the files" in _cli("verify", cache_dir).stdout


def test_clear_removes_every_entry(filled, cache_dir):
    size = filled.stats()["bytes"]
    assert _json("clear", cache_dir) == {
        "directory": cache_dir,
        "removed": 40,
        "removed_bytes": size,
    }
    assert (filled.stats()["entries"], filled.stats()["bytes"]) == (0, 0)
    assert _cli("clear", cache_dir).stdout.strip() == "removed 0 entries (0 B)"


def test_clear_dry_run_removes_nothing_and_says_what_would_go(filled, cache_dir):
    size = filled.stats()["bytes"]
    assert _json("clear", cache_dir, "--dry-run") == {
        "directory": cache_dir,
        "dry_run": True,
        "entries": 40,
        "bytes": size,
    }
    done = _cli("clear", "--dry-run", cache_dir)
    assert done.stdout.startswith("would remove 40 entries (")
    assert "nothing was removed" in done.stdout
    assert done.stderr == ""
    assert filled.stats()["entries"] == 40
    assert all(filled.get_serialized(f"k{i:02d}") == b"v" * 1000 for i in range(40))


def test_keys_prints_one_key_per_line_or_json_lines(cache_dir):
    backend = _backend(cache_dir)
    keys = ["report:mon", "report:tue", "other", "ключ", "a\nline break", "lone \udc80"]
    for key in keys:
        backend.set_serialized(key, b"v")
    done = _cli("keys", cache_dir, "--json")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert all(line.isascii() for line in lines)  # exact, whatever the keys hold
    assert sorted(json.loads(line) for line in lines) == sorted(keys)
    assert sorted(_cli("keys", cache_dir, "--prefix", "report:").stdout.splitlines()) == [
        "report:mon",
        "report:tue",
    ]
    text = _cli("keys", cache_dir).stdout
    assert "ключ\n" in text and "lone \\udc80\n" in text  # a lone surrogate, escaped
    assert _cli("keys", cache_dir, "--prefix", "nothing").stdout == ""


def test_keys_leaves_out_expired_entries_when_told_the_expiration_time(filled, cache_dir):
    two_hours_ago = time.time_ns() - 7200 * 10**9
    os.utime(_entry_path(filled, "k00"), ns=(two_hours_ago, two_hours_ago))
    old = filled.store.peek_record(layout.key_digest(b"k00"))
    data = records.encode(records.KIND_PICKLED, b"k00", old.payload, time.time() - 7200, old.form)
    with open(_entry_path(filled, "k00"), "r+b") as handle:
        handle.write(data)
    assert len(_cli("keys", cache_dir).stdout.splitlines()) == 40
    listed = _cli("keys", cache_dir, "--expiration-time", "1h").stdout.splitlines()
    assert sorted(listed) == [f"k{i:02d}" for i in range(1, 40)]
    assert os.path.exists(_entry_path(filled, "k00"))  # listed or not, never removed


def test_keys_stops_quietly_when_its_reader_goes_away(cache_dir):
    backend = _backend(cache_dir)
    for index in range(2000):  # far more than a pipe holds
        backend.set_serialized(f"{index:04d}".ljust(100, "k"), b"v")
    listing = subprocess.Popen(
        [sys.executable, "-m", "dogpile_fsbackend", "keys", cache_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert listing.stdout is not None and listing.stderr is not None
    assert listing.stdout.readline().endswith(b"k\n")
    listing.stdout.close()  # as `| head -1` does
    assert listing.wait(WAIT) == 141
    assert listing.stderr.read() == b""  # no traceback, no "Exception ignored"
    listing.stderr.close()


def test_keys_shows_progress_only_when_asked_or_the_keys_go_elsewhere(filled, cache_dir):
    quiet = _cli("keys", cache_dir)
    assert quiet.stderr == ""  # stderr is no terminal here
    shown = _cli("keys", cache_dir, "--progress")
    shards = filled.store.layout.shard_count
    assert shown.stderr.splitlines()[-1] == f"keys: {shards}/{shards} shards (100%)"
    assert sorted(shown.stdout.splitlines()) == sorted(quiet.stdout.splitlines())


def test_keys_changes_nothing(filled, cache_dir):
    before = faultkit.tree_state(cache_dir)
    for options in ((), ("--json",), ("--prefix", "k1")):
        assert _cli("keys", cache_dir, *options).returncode == 0
    assert _cli("delete", cache_dir, "--prefix", "k1", "--dry-run").returncode == 0
    assert faultkit.tree_state(cache_dir) == before


def test_delete_removes_the_entries_of_matching_keys(filled, cache_dir):
    size = os.path.getsize(_entry_path(filled, "k10"))
    assert _json("delete", cache_dir, "--prefix", "k1") == {
        "directory": cache_dir,
        "prefix": "k1",
        "removed": 10,
        "removed_bytes": 10 * size,
        "interrupted": False,
    }
    assert sorted(filled.keys()) == [f"k{i:02d}" for i in range(40) if not 10 <= i < 20]
    assert (filled.stats()["entries"], filled.stats()["bytes"]) == (30, 30 * size)
    done = _cli("delete", cache_dir, "--prefix", "k2")
    assert done.stdout == f"removed 10 entries ({_human(10 * size)}) whose keys start with 'k2'\n"


def _human(size: int) -> str:
    return f"{size / 1024:.1f} KiB"


def test_delete_dry_run_counts_what_would_go_and_removes_nothing(cache_dir):
    raw = _backend(cache_dir, "raw")
    for index in range(5):
        raw.set(f"file {index}", io.BytesIO(b"x" * 1000))
    raw.set("other", io.BytesIO(b"y"))
    data = _json("delete", cache_dir, "--prefix", "file", "--dry-run")
    on_disk = sum(
        os.path.getsize(path)
        for key in (f"file {i}" for i in range(5))
        for path in [_entry_path(raw, key), *[p for p, _ in raw.store.data_files(_digest(key))]]
    )
    assert data == {
        "directory": cache_dir,
        "prefix": "file",
        "dry_run": True,
        "entries": 5,
        "bytes": on_disk,  # records and data files
    }
    text = _cli("delete", cache_dir, "--prefix", "file", "--dry-run").stdout
    assert text.startswith("would remove 5 entries (")
    assert "nothing was removed (--dry-run)" in text
    assert len(list(raw.keys())) == 6
    assert _json("delete", cache_dir, "--prefix", "file")["removed_bytes"] == on_disk
    assert list(raw.keys()) == ["other"]


def _digest(key: str) -> str:
    return layout.key_digest(layout.encode_key(key))


def test_delete_needs_a_non_empty_prefix(filled, cache_dir):
    for options in ((), ("--prefix", "")):
        done = _cli("delete", cache_dir, *options)
        assert done.returncode == 2
        assert "--prefix" in done.stderr
    assert "use clear" in _cli("delete", cache_dir, "--prefix", "").stderr
    assert filled.stats()["entries"] == 40


def test_delete_and_keys_refuse_what_is_not_a_cache(tmp_path):
    for command in (("keys",), ("delete", "--prefix", "k")):
        done = _cli(*command, str(tmp_path))
        assert done.returncode == 2
        assert done.stderr.startswith(f"dogpile-fsbackend: {tmp_path} is not a dogpile_fsbackend")
    assert os.listdir(tmp_path) == []


def test_delete_shows_progress(filled, cache_dir):
    done = _cli("delete", cache_dir, "--prefix", "k3", "--progress")
    shards = filled.store.layout.shard_count
    assert done.stderr.splitlines()[-1] == f"delete: {shards}/{shards} shards (100%)"
    dry = _cli("delete", cache_dir, "--prefix", "k2", "--dry-run", "--progress")
    assert dry.stderr.splitlines()[-1] == f"delete: {shards}/{shards} shards (100%)"


def _clear_on_a_terminal(cache_dir: str, answer: bytes | None, *options: str):
    """Run clear with its stdin on a pseudo-terminal, typing ``answer`` (None: end of input)."""
    master, slave = pty.openpty()
    try:
        os.write(master, answer if answer is not None else b"\x04")  # ^D: end of input
        return _cli("clear", cache_dir, *options, stdin=slave)
    finally:
        os.close(slave)
        os.close(master)


@pytest.mark.parametrize("answer", [b"n\n", b"\n", b"maybe\n", None], ids=repr)
def test_clear_on_a_terminal_removes_nothing_unless_confirmed(filled, cache_dir, answer):
    done = _clear_on_a_terminal(cache_dir, answer)
    assert done.returncode == 1
    assert f"clear {cache_dir}: remove every entry (40 entries, " in done.stderr
    assert "[y/N]" in done.stderr
    assert "cancelled; nothing was removed" in done.stderr
    assert done.stdout == ""
    assert filled.stats()["entries"] == 40


@pytest.mark.parametrize("answer", [b"y\n", b"YES\n"], ids=repr)
def test_clear_on_a_terminal_goes_ahead_when_confirmed(filled, cache_dir, answer):
    done = _clear_on_a_terminal(cache_dir, answer, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["removed"] == 40  # the question went to stderr
    assert filled.stats()["entries"] == 0


def test_clear_yes_does_not_ask_on_a_terminal(filled, cache_dir):
    done = _clear_on_a_terminal(cache_dir, b"n\n", "--yes")
    assert done.returncode == 0
    assert "[y/N]" not in done.stderr
    assert filled.stats()["entries"] == 0


@pytest.mark.parametrize(
    ("name", "marker"),
    [
        ("empty", None),
        ("foreign", '{"format": "something else"}'),
        ("damaged", "{not json"),
        ("newer", '{"format": "dogpile_fsbackend", "version": 99, "kind": "pickled"}'),
    ],
    ids=["empty", "foreign", "damaged", "newer"],
)
def test_a_directory_that_is_not_a_cache_is_refused(tmp_path, name, marker):
    directory = tmp_path / name
    directory.mkdir()
    if marker is not None:
        (directory / layout.MARKER_NAME).write_text(marker)
    before = sorted(os.listdir(directory))
    for command in COMMANDS:
        done = _cli(command, str(directory))
        assert done.returncode == 2, done
        assert done.stdout == ""
        assert done.stderr.startswith("dogpile-fsbackend: ")
        assert str(directory) in done.stderr
    assert sorted(os.listdir(directory)) == before  # nothing was created


def test_a_missing_directory_or_a_file_is_refused(tmp_path):
    missing, plain = tmp_path / "missing", tmp_path / "file"
    plain.write_text("x")
    for command in COMMANDS:
        done = _cli(command, str(missing))
        assert done.returncode == 2
        assert done.stderr == f"dogpile-fsbackend: {missing} does not exist\n"
        done = _cli(command, str(plain))
        assert done.returncode == 2
        assert done.stderr == f"dogpile-fsbackend: {plain} is not a directory\n"
    assert not missing.exists()


def test_bad_option_values_are_usage_errors(filled, cache_dir):
    done = _cli("prune", cache_dir, "--cache-size", "12 parsecs")
    assert done.returncode == 2
    assert "cache_size" in done.stderr
    assert _cli("frobnicate", cache_dir).returncode == 2


def _help(command: str) -> str:
    return " ".join(_cli(command, "--help").stdout.split())  # unwrapped


def test_each_commands_help_describes_its_own_options():
    stats_help = _help("stats")
    assert "to show how full it is" in stats_help
    assert "evict" not in stats_help
    assert "evict down to 90% of it" in _help("prune")
    keys_help = _help("keys")
    assert "JSON Lines, streamed" in keys_help and "constant memory" in keys_help
    assert "key_mangler" in keys_help
    delete_help = _help("delete")
    assert "not empty: to remove every entry, use clear" in delete_help
    assert "key_mangler" in delete_help
    clear_help = _help("clear")
    assert "--dry-run say how many entries would go" in clear_help
    assert "--yes do not ask for confirmation on a terminal" in clear_help


def test_demo_help_describes_it_and_size_must_be_positive():
    demo_help = _help("demo")
    assert "pickled backend" in demo_help and "free space" in demo_help
    for bad in ("-3", "0", "big", "1.5"):
        done = _cli("demo", "--size-mb", bad)
        assert done.returncode == 2
        assert f"got {bad!r}" in done.stderr


def test_demo_runs_counts_one_miss_per_creation_and_cleans_up(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "dogpile_fsbackend", "demo", "--size-mb", "2"],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    stats = [line for line in done.stdout.splitlines() if "stats:" in line]
    assert "'hits': 2, 'misses': 2," in stats[0]  # two squares, each computed once
    assert "'hits': 1, 'misses': 1," in stats[1]  # the generated file
    assert "2 MiB, sha256" in done.stdout
    assert "4 answers {'computed once'}" in done.stdout
    assert "the value was created 1 time(s)" in done.stdout
    assert os.listdir(tmp_path) == []


def test_version():
    from importlib.metadata import version

    import dogpile_fsbackend

    done = _cli("--version")
    assert done.returncode == 0
    assert done.stdout == f"dogpile-fsbackend {dogpile_fsbackend.__version__}\n"
    assert version("dogpile_fsbackend") == dogpile_fsbackend.__version__  # one source


def test_progress_is_plain_lines_when_asked_for_off_a_terminal(filled, cache_dir):
    quiet = _cli("verify", cache_dir)
    assert quiet.stderr == ""  # cron mails whatever a job prints: nothing unless asked
    shown = _cli("verify", cache_dir, "--progress")
    lines = shown.stderr.splitlines()
    assert "\r" not in shown.stderr
    shards = filled.store.layout.shard_count
    assert lines[-1] == f"verify: {shards}/{shards} shards (100%)"
    assert len(lines) == 10
    assert shown.stdout == quiet.stdout


def test_progress_on_a_terminal(filled, cache_dir):
    """On a terminal: a tqdm bar when tqdm is installed (it is optional), else plain lines."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    screen = []

    def read_screen() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO once the child has closed the terminal
                return
            if not chunk:
                return
            screen.append(chunk)

    reader = threading.Thread(target=read_screen)
    reader.start()
    try:
        done = _cli("verify", cache_dir, stderr=slave)
    finally:
        os.close(slave)
        reader.join(WAIT)
        os.close(master)
    assert done.returncode == 0
    assert done.stdout.startswith("read back 40 entries whole")
    drawn = b"".join(screen).decode()
    assert "verify" in drawn
    if importlib.util.find_spec("tqdm"):
        assert "\r" in drawn and "shard" in drawn


def test_console_script(cache_dir, filled):
    script = os.path.join(os.path.dirname(sys.executable), "dogpile-fsbackend")
    done = subprocess.run(
        [script, "stats", "--json", cache_dir],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["entries"] == 40


_INTERRUPTED_AT_THE_FIFTH_REMOVAL = """
import os, signal, sys
from dogpile_fsbackend import accounting, cli
real_add, calls = accounting.AccountingFile.add, []
def add(self, shard, size_delta, entries_delta):
    calls.append(shard)
    if len(calls) == 5:  # Ctrl-C between the removal of the files and their counting
        os.kill(os.getpid(), signal.SIGINT)
    return real_add(self, shard, size_delta, entries_delta)
accounting.AccountingFile.add = add
sys.exit(cli.main(sys.argv[1:]))
"""


_INTERRUPTED_AT_THE_THIRD_KEY = """
import os, signal, sys
from dogpile_fsbackend import cli, listing
# As on a terminal: a test run started in the background of a script ignores SIGINT.
signal.signal(signal.SIGINT, signal.default_int_handler)
real_entries = listing.entries
def entries(*args):
    for number, entry in enumerate(real_entries(*args), 1):
        if number == 3:
            os.kill(os.getpid(), signal.SIGINT)
        yield entry
listing.entries = entries
sys.exit(cli.main(sys.argv[1:]))
"""


def test_ctrl_c_stops_keys_quietly_after_the_keys_printed(filled, cache_dir):
    done = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_AT_THE_THIRD_KEY, "keys", cache_dir, "--json"],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert done.returncode == 130, done.stderr
    assert len(done.stdout.splitlines()) == 2  # the two keys listed before the SIGINT
    assert "Traceback" not in done.stderr and "interrupted" in done.stderr


def test_ctrl_c_stops_a_delete_between_entries_with_exact_counters(filled, cache_dir):
    """A real SIGINT arrives while an entry is being removed: that entry is finished
    and counted, the delete stops there, says how far it got, and exits 130."""
    size = os.path.getsize(_entry_path(filled, "k00"))
    command = ["delete", cache_dir, "--prefix", "k", "--json"]
    done = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_AT_THE_FIFTH_REMOVAL, *command],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert done.returncode == 130, done.stderr
    assert json.loads(done.stdout) == {
        "directory": cache_dir,
        "prefix": "k",
        "removed": 5,
        "removed_bytes": 5 * size,
        "interrupted": True,
    }
    assert "interrupted" in done.stderr
    assert len(list(filled.keys())) == 35
    assert (filled.stats()["bytes"], filled.stats()["entries"]) == faultkit.disk_usage(cache_dir)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rpartition(")")[2].split()[0]


@pytest.mark.parametrize(
    ("command", "output"),
    [
        (["verify"], "read back "),
        (["prune", "--cache-size", "1MiB"], "removed "),
        (["clear"], "removed "),
    ],
    ids=["verify", "prune", "clear"],
)
def test_ctrl_z_stops_a_scan_between_shards_holding_no_lock(cache_dir, command, output):
    """SIGTSTP (Ctrl-Z) stops verify, prune or clear at the next shard boundary: while it
    is stopped no shard lock is held, so every application write goes through; SIGCONT
    finishes it."""
    backend = _backend(cache_dir)
    for i in range(2000):
        backend.set_serialized(f"k{i}", b"v" * 100)
    name = command[0]
    scan = subprocess.Popen(
        [sys.executable, "-m", "dogpile_fsbackend", *command, cache_dir, "--progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert scan.stderr.readline().startswith(f"{name}: ")  # 10% done, 90% to go
        os.kill(scan.pid, signal.SIGSTOP)  # held where it is: far from done
        os.kill(scan.pid, signal.SIGCONT)  # (SIGCONT discards pending stops: this order)
        os.kill(scan.pid, signal.SIGTSTP)  # what Ctrl-Z sends: it stops itself soon
        deadline = time.monotonic() + WAIT
        while _state(scan.pid) != "T":
            assert time.monotonic() < deadline, "the scan never stopped"
            time.sleep(0.01)
        store = backend.store
        shards = store.layout.shard_count
        assert not any(
            store.lock_file.is_locked(("probe", s), locking.SHARD_BASE_OFFSET + s)
            for s in range(shards)
        )
        for i in range(300):  # writes to every shard go through while it is stopped
            backend.set_serialized(f"during-{i}", b"w" * 100)
        assert scan.poll() is None
        os.kill(scan.pid, signal.SIGCONT)
        out, err = scan.communicate(timeout=WAIT)
    finally:
        if scan.poll() is None:
            scan.kill()
            scan.wait(WAIT)
    assert scan.returncode == 0, err
    assert out.startswith(output)
    done = shards * (maintenance.PRUNE_PASSES if name == "prune" else 1)
    assert err.splitlines()[-1] == f"{name}: {done}/{done} shards (100%)"
