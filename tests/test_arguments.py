"""Backend arguments: required and defaulted values, parsing, errors, and ini-style strings."""

from __future__ import annotations

import configparser
import copy
import datetime
import io
import logging
import multiprocessing
import os
import pathlib
import shutil
import stat
import tempfile
import time
import types

import pytest
from conftest import WAIT
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE

from dogpile_fsbackend import CacheSizeWarning, ConfigError, config, layout, records
from dogpile_fsbackend.config import SETTING_NAMES

BACKENDS = ["dogpile_fsbackend.pickled", "dogpile_fsbackend.raw"]


def configure(backend: str, arguments, **region_kw):
    return make_region().configure(backend, arguments=arguments, **region_kw)


# -- base_dir -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_base_dir_is_required(backend):
    with pytest.raises(ConfigError) as info:
        configure(backend, {})
    assert info.value.argument == "base_dir"
    assert "base_dir" in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_base_dir_is_created_with_parents(backend, tmp_path):
    base_dir = tmp_path / "several" / "missing" / "levels"
    configure(backend, {"base_dir": str(base_dir)})
    assert base_dir.is_dir()
    assert (base_dir / "data").is_dir()


def test_base_dir_accepts_pathlike(tmp_path):
    region = configure(BACKENDS[0], {"base_dir": tmp_path / "pathlike"})
    region.set("k", "v")
    assert region.get("k") == "v"
    assert region.backend.settings.base_dir == str(tmp_path / "pathlike")


def test_relative_base_dir_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    backend = configure(BACKENDS[0], {"base_dir": "relative/cache"}).backend
    assert backend.settings.base_dir == str(tmp_path / "relative" / "cache")
    monkeypatch.chdir("/")  # the instance keeps working from elsewhere
    backend.set_serialized("k", b"v")
    assert backend.get_serialized("k") == b"v"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["is_a_file", "below_a_file"])
def test_base_dir_that_is_a_file_is_a_config_error(backend, tmp_path, where):
    a_file = tmp_path / "a_file"
    a_file.write_bytes(b"not a directory")
    base_dir = a_file if where == "is_a_file" else a_file / "cache"
    with pytest.raises(ConfigError) as info:
        configure(backend, {"base_dir": str(base_dir)})
    assert isinstance(info.value, ValueError)
    assert info.value.argument == "base_dir"
    assert str(base_dir) in str(info.value)
    assert a_file.read_bytes() == b"not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
@pytest.mark.parametrize("backend", BACKENDS)
def test_base_dir_not_writable_is_a_config_error(backend, tmp_path):
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o500)
    try:
        for base_dir in (read_only, read_only / "cannot" / "create"):
            with pytest.raises(ConfigError) as info:
                configure(backend, {"base_dir": str(base_dir)})
            assert info.value.argument == "base_dir"
    finally:
        read_only.chmod(0o700)


NOBODY = 65534


def _configure_as_nobody(backend: str, base_dirs: list[str], results) -> None:
    """Fork target: drop root privileges, then try to configure each base_dir."""
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    for base_dir in base_dirs:
        try:
            configure(backend, {"base_dir": base_dir})
        except ConfigError as exc:
            results.put((base_dir, exc.argument, str(exc)))
        except BaseException as exc:
            results.put((base_dir, None, repr(exc)))
        else:
            results.put((base_dir, None, "configured without error"))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
@pytest.mark.parametrize("backend", BACKENDS)
def test_base_dir_not_writable_as_unprivileged_user(backend, tmp_path, request):
    """The same check as above, run as root by dropping to 'nobody' in a forked child.

    A forked child (not spawned) is used because the interpreter's own files
    may be unreadable to 'nobody'; everything needed is imported already.
    """
    configure(backend, {"base_dir": str(tmp_path / "warm-up")})  # import everything lazy
    # pytest's tmp_path is private to root; /tmp itself is world-traversable.
    outer = pathlib.Path(tempfile.mkdtemp(prefix="dogpile-fsbackend-nobody-"))
    request.addfinalizer(lambda: shutil.rmtree(outer, ignore_errors=True))
    outer.chmod(0o755)
    read_only = outer / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    writable = outer / "writable"
    writable.mkdir()
    writable.chmod(0o777)
    base_dirs = [str(read_only), str(read_only / "cannot" / "create"), str(writable / "ok")]
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_configure_as_nobody, args=(backend, base_dirs, results))
    child.start()
    found = [results.get(timeout=WAIT) for _ in base_dirs]
    child.join(WAIT)
    assert child.exitcode == 0
    assert found[0][:2] == (base_dirs[0], "base_dir"), found[0]
    assert found[1][:2] == (base_dirs[1], "base_dir"), found[1]
    assert found[2] == (base_dirs[2], None, "configured without error")


# -- cache_size ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_size_defaults_to_one_gib(backend, cache_dir):
    found = configure(backend, {"base_dir": cache_dir}).backend
    assert found.settings.cache_size == 1024**3
    assert found.stats()["limit"] == 1024**3


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("512MiB", 512 * 1024**2),
        ("512 MiB", 512 * 1024**2),
        ("2GB", 2 * 1000**3),
        ("2 gib", 2 * 1024**3),
        ("1.5KiB", 1536),
        ("10k", 10_000),
        ("1TiB", 1024**4),
    ],
)
def test_cache_size_accepts_ints_and_strings(cache_dir, given, expected):
    backend = configure(BACKENDS[0], {"base_dir": cache_dir, "cache_size": given}).backend
    assert backend.settings.cache_size == expected


def test_cache_size_string_limits_the_cache(cache_dir):
    region = configure(BACKENDS[0], {"base_dir": cache_dir, "cache_size": "8KiB"})
    for index in range(40):
        region.set(f"key-{index}", b"x" * 1000)
    data_dir = os.path.join(cache_dir, "data")
    on_disk = sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(data_dir)
        for name in names
    )
    assert on_disk <= 8 * 1024
    assert region.get("key-39") == b"x" * 1000  # the newest entry survives eviction
    with pytest.warns(CacheSizeWarning, match="larger than cache_size"):
        region.set("huge", b"x" * 9000)
    assert region.get("huge") is NO_VALUE


# -- max_entries --------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_entries_defaults_to_no_limit(backend, cache_dir):
    found = configure(backend, {"base_dir": cache_dir}).backend
    assert found.settings.max_entries is None
    assert found.stats()["entry_limit"] is None


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (1, 1),
        (5000, 5000),
        ("5000", 5000),
        (" 1_000_000 ", 1_000_000),
        (None, None),
        ("none", None),
    ],
)
def test_max_entries_accepts_ints_and_strings(cache_dir, given, expected):
    backend = configure(BACKENDS[0], {"base_dir": cache_dir, "max_entries": given}).backend
    assert backend.settings.max_entries == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_entries_limits_the_number_of_entries(backend, cache_dir):
    """Enforced like cache_size: once a write goes over, the cache is back at the limit
    when it returns, and the following writes evict down to the low-water mark."""
    region = configure(backend, {"base_dir": cache_dir, "max_entries": 20})
    for index in range(100):
        if backend.endswith("raw"):
            region.set(f"key-{index}", io.BytesIO(b"x" * 10))
        else:
            region.set(f"key-{index}", b"x" * 10)
        assert region.backend.stats()["entries"] <= 20
    stats = region.backend.stats()
    assert 18 <= stats["entries"] <= 20  # between eviction_low_water (0.9) and the limit
    assert stats["evictions"] == 100 - stats["entries"]
    assert stats["entry_limit"] == 20
    found = region.get("key-99")  # the newest survives
    assert found is not NO_VALUE
    if backend.endswith("raw"):
        found.close()


def test_max_entries_and_cache_size_together(cache_dir):
    """Whichever limit is reached first holds."""
    region = configure(
        BACKENDS[0], {"base_dir": cache_dir, "max_entries": 30, "cache_size": "20KiB"}
    )
    for index in range(60):
        region.set(f"small-{index}", b"x" * 10)
    assert region.backend.stats()["entries"] <= 30
    for index in range(60):
        region.set(f"big-{index}", b"x" * 2000)
    stats = region.backend.stats()
    assert stats["bytes"] <= 20 * 1024
    assert stats["entries"] <= 30


# -- expiration_time ----------------------------------------------------------------


def _age_entry(backend, key: str, seconds: float) -> None:
    """Rewrite a pickled entry as if it had been created ``seconds`` earlier."""
    key_bytes = layout.encode_key(key)
    path = backend.store.layout.entry_path(layout.key_digest(key_bytes))
    with open(path, "rb") as handle:
        record = records.decode(handle.read(), records.KIND_PICKLED, key_bytes)
    data = records.encode(
        record.kind, key_bytes, record.payload, record.created - seconds, record.form
    )
    with open(path, "wb") as handle:
        handle.write(data)


@pytest.mark.parametrize(
    "expiration_time", [60, 60.0, "60", datetime.timedelta(minutes=1)], ids=repr
)
def test_expiration_time_makes_older_entries_misses(cache_dir, expiration_time):
    backend = configure(
        BACKENDS[0], {"base_dir": cache_dir, "expiration_time": expiration_time}
    ).backend
    assert backend.settings.expiration_time == 60.0
    backend.set_serialized("young", b"1")
    backend.set_serialized("old", b"2")
    _age_entry(backend, "young", 50)
    _age_entry(backend, "old", 70)
    assert backend.get_serialized("young") == b"1"
    assert backend.get_serialized("old") is NO_VALUE
    path = backend.store.layout.entry_path(layout.key_digest(b"old"))
    assert not os.path.exists(path)  # an expired entry is removed on the way


def test_expiration_time_in_real_time(cache_dir):
    backend = configure(
        BACKENDS[0], {"base_dir": cache_dir, "expiration_time": datetime.timedelta(seconds=0.2)}
    ).backend
    backend.set_serialized("k", b"v")
    time.sleep(0.3)  # not a synchronisation: the entry must merely be older than 0.2 s
    assert backend.get_serialized("k") is NO_VALUE


DURATIONS = [
    (600, 600),
    (1.5, 1.5),
    ("600", 600),
    ("90s", 90),
    ("15m", 900),
    ("1h", 3600),
    ("7d", 7 * 86400),
    ("2w", 14 * 86400),
    ("1.5h", 5400),
    ("1h30m", 5400),
    ("1d 12h", 36 * 3600),
    (" 2 Days ", 2 * 86400),
    ("45 seconds", 45),
    ("10min", 600),
    (datetime.timedelta(hours=2), 7200),
]


@pytest.mark.parametrize("name", ["expiration_time", "reconcile_interval", "temp_max_age"])
@pytest.mark.parametrize(("value", "seconds"), DURATIONS, ids=repr)
def test_durations_accept_units_and_timedeltas(cache_dir, name, value, seconds):
    backend = configure(BACKENDS[1], {"base_dir": cache_dir, name: value}).backend
    assert getattr(backend.settings, name) == seconds


@pytest.mark.parametrize("name", ["expiration_time", "reconcile_interval", "temp_max_age"])
@pytest.mark.parametrize(
    "value", ["1y", "h", "1h-30m", "-1h", "0s", "1 parsec", "1hh", "inf", "h1", "1e3s"]
)
def test_bad_duration_names_the_argument_and_the_value_given(cache_dir, name, value):
    with pytest.raises(ConfigError) as info:
        configure(BACKENDS[1], {"base_dir": cache_dir, name: value})
    assert info.value.argument == name
    assert f"got {value!r}" in str(info.value)
    assert "'1h'" in str(info.value)  # says what is allowed


@pytest.mark.parametrize("expiration_time", [None, "none", ""], ids=repr)
def test_no_expiration_time_keeps_entries(cache_dir, expiration_time):
    backend = configure(
        BACKENDS[0], {"base_dir": cache_dir, "expiration_time": expiration_time}
    ).backend
    assert backend.settings.expiration_time is None
    backend.set_serialized("k", b"v")
    _age_entry(backend, "k", 10 * 365 * 86400)
    assert backend.get_serialized("k") == b"v"


# -- distributed_lock ---------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [True, "true", "yes", 1, "on", "default"], ids=repr)
def test_distributed_lock_on_returns_our_mutex(backend, cache_dir, value):
    arguments = {"base_dir": cache_dir}
    if value != "default":
        arguments["distributed_lock"] = value
    mutex = configure(backend, arguments).backend.get_mutex("key")
    mutex.acquire()
    try:  # a byte of the lock file: every backend on the directory sees it
        assert configure(backend, {"base_dir": cache_dir}).backend.get_mutex("key").locked()
    finally:
        mutex.release()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [False, None, "false", "no", "0", 0, "off"], ids=repr)
def test_distributed_lock_off_locks_among_this_backends_threads_only(backend, cache_dir, value):
    region = configure(backend, {"base_dir": cache_dir, "distributed_lock": value})
    mutex = region.backend.get_mutex("key")
    assert mutex.acquire()
    try:
        assert region.backend.get_mutex("key").locked()  # the same lock for the same key
        assert not region.backend.get_mutex("key").acquire(False)
        assert region.backend.get_mutex("other").acquire(False)
        region.backend.get_mutex("other").release()
        other_backend = configure(backend, {"base_dir": cache_dir}).backend
        assert other_backend.get_mutex("key").acquire(False)  # no lock file involved
        other_backend.get_mutex("key").release()
    finally:
        mutex.release()
    if backend.endswith("pickled"):
        assert region.get_or_create("key", lambda: "created") == "created"


# -- bad values ---------------------------------------------------------------------

BAD_VALUES = {
    "base_dir": [None, 42, "", b"/tmp/bytes", ["/tmp"]],
    "cache_size": [
        0,
        -1,
        0.5,
        float("nan"),
        float("inf"),
        "",
        "lots",
        "12 parsecs",
        "-5MiB",
        "0KiB",
        "0.5",
        True,
        None,
        [],
    ],
    "max_entries": [0, -1, "0", "-5", "many", 1.5, "1.5", "1e6", True, [], float("inf")],
    "expiration_time": [0, -1, "0", "-3", "soon", True, [], float("nan")],
    "distributed_lock": ["maybe", 2, 1.0, [], "tru"],
    "file_movable": ["perhaps", 2, 0.0, {}],
    "shard_depth": [0, 5, -1, "x", 1.5, "2.0", True, None],
    "shard_width": [0, 4, "wide", 2.0, False, None],
    "lock_slots": [0, -1, 2**48 + 1, "many", 3.0, True, None],
    "file_mode": [-1, 0o1000, "999", "rw-r--r--", True, None, 6.0],
    "dir_mode": [-1, 0o7777, "8", "rwx", False, None, 7.0],
    "fsync": ["sometimes", 2, [], 1.0],
    "eviction_low_water": [0, -0.1, 1.01, "half", True, None, float("nan")],
    "reconcile_interval": [0, -10, "hourly", True, []],
    "temp_max_age": [None, "", "none", 0, -1, "old", True],
    "write_errors": [None, "", "ignore", "warn", 1, True],
    "read_only": ["readonly", 2, 1.0, []],
}


def test_bad_values_cover_every_argument():
    assert set(BAD_VALUES) == SETTING_NAMES


@pytest.mark.parametrize(
    ("name", "value"),
    [(name, value) for name, values in BAD_VALUES.items() for value in values],
    ids=lambda v: repr(v) if not isinstance(v, str) else v,
)
def test_bad_value_raises_config_error_naming_the_argument(tmp_path, name, value):
    arguments = {"base_dir": str(tmp_path / "cache"), name: value}
    with pytest.raises(ConfigError) as info:
        configure("dogpile_fsbackend.raw", arguments)  # the raw backend accepts every argument
    assert isinstance(info.value, ValueError)
    assert info.value.argument == name
    assert repr(name) in str(info.value)
    assert str(info.value).endswith(f"got {value!r}")  # the value given, not a parsed one
    if name != "base_dir":
        assert not (tmp_path / "cache").exists()  # nothing touched before validation


@pytest.mark.parametrize("name", sorted(SETTING_NAMES - {"file_movable"}))
def test_pickled_backend_validates_the_same_arguments(tmp_path, name):
    with pytest.raises(ConfigError) as info:
        configure(
            "dogpile_fsbackend.pickled",
            {"base_dir": str(tmp_path / "cache"), name: BAD_VALUES[name][-1]},
        )
    assert info.value.argument == name


def test_config_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(ConfigError("cache_size", "positive", -1)))
    assert isinstance(error, ConfigError)
    assert error.argument == "cache_size"
    assert str(error) == "'cache_size' must be positive; got -1"


@pytest.mark.parametrize("name", ["shard_depth", "shard_width", "lock_slots"])
def test_reopening_with_another_layout_is_a_config_error(cache_dir, name):
    configure(BACKENDS[0], {"base_dir": cache_dir})
    other = {"shard_depth": 3, "shard_width": 3, "lock_slots": 7}[name]
    with pytest.raises(ConfigError) as info:
        configure(BACKENDS[0], {"base_dir": cache_dir, name: other})
    assert info.value.argument == name


def test_directory_of_the_other_kind_is_a_config_error(cache_dir):
    configure("dogpile_fsbackend.pickled", {"base_dir": cache_dir})
    with pytest.raises(ConfigError) as info:
        configure("dogpile_fsbackend.raw", {"base_dir": cache_dir})
    assert info.value.argument == "base_dir"


# -- unknown arguments, immutability, ini files ---------------------------------------


@pytest.fixture
def fresh_process_warnings(monkeypatch):
    """Forget the unknown arguments other tests of this process were warned about."""
    monkeypatch.setattr(config, "_warned_unknown", set())


def _unknown_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "unknown argument" in r.getMessage()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_argument_is_a_warning_naming_it(
    backend, cache_dir, caplog, fresh_process_warnings
):
    with caplog.at_level(logging.WARNING, logger="dogpile_fsbackend"):
        region = configure(backend, {"base_dir": cache_dir, "colour_of_cache": "blue"})
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("colour_of_cache" in r.getMessage() for r in warnings), caplog.text
    assert region.backend.get_mutex("k") is not None  # the backend is usable


def test_unknown_argument_is_warned_once_per_process_and_name(
    cache_dir, caplog, fresh_process_warnings
):
    injected = {"memcached_expire_time": 600, "memcache_servers": "a:11211"}  # as oslo.cache
    with caplog.at_level(logging.WARNING, logger="dogpile_fsbackend"):
        for backend in BACKENDS * 3:
            configure(backend, {"base_dir": f"{cache_dir}-{backend}", **injected})
        assert _unknown_warnings(caplog) == [
            "dogpile_fsbackend ignores unknown arguments: memcache_servers, "
            "memcached_expire_time (said once per process)"
        ]
        caplog.clear()
        configure(BACKENDS[0], {"base_dir": cache_dir, **injected, "another_one": 1})
        assert _unknown_warnings(caplog) == [
            "dogpile_fsbackend ignores unknown arguments: another_one (said once per process)"
        ]


def test_file_movable_is_unknown_to_the_pickled_backend(cache_dir, caplog, fresh_process_warnings):
    with caplog.at_level(logging.WARNING, logger="dogpile_fsbackend"):
        configure("dogpile_fsbackend.pickled", {"base_dir": cache_dir, "file_movable": True})
    assert "file_movable" in caplog.text


def test_known_arguments_log_no_warning(cache_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="dogpile_fsbackend"):
        configure("dogpile_fsbackend.raw", {"base_dir": cache_dir, "file_movable": True})
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("backend", BACKENDS)
def test_arguments_are_never_modified(backend, cache_dir):
    arguments = {
        "base_dir": cache_dir,
        "cache_size": "64MiB",
        "max_entries": "100_000",
        "expiration_time": datetime.timedelta(hours=1),
        "distributed_lock": "yes",
        "shard_depth": "3",
        "lock_slots": 64,
        "file_mode": "640",
        "fsync": "false",
        "eviction_low_water": "0.5",
        "reconcile_interval": None,
        "temp_max_age": 60,
        "write_errors": "log",
        "nested": {"unknown": ["argument"]},
    }
    if backend.endswith("raw"):
        arguments["file_movable"] = "true"
    snapshot = copy.deepcopy(arguments)
    region = configure(backend, arguments)
    assert arguments == snapshot
    # A read-only mapping works too, so nothing tries to write to it.
    configure(backend, types.MappingProxyType(arguments))
    assert region.backend.settings.shard_depth == 3


_INI = """
[app:main]
cache.backend = {backend}
cache.expiration_time = 600
cache.arguments.base_dir = {base_dir}
cache.arguments.cache_size = 512MiB
cache.arguments.max_entries = 250000
cache.arguments.expiration_time = 30
cache.arguments.distributed_lock = false
cache.arguments.fsync = yes
cache.arguments.file_mode = 640
cache.arguments.dir_mode = 0o750
cache.arguments.shard_depth = 3
cache.arguments.shard_width = 1
cache.arguments.lock_slots = 128
cache.arguments.eviction_low_water = 0.75
cache.arguments.reconcile_interval = none
cache.arguments.temp_max_age = 120
cache.arguments.write_errors = LOG
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_ini_style_strings_via_configure_from_config(backend, cache_dir):
    parser = configparser.ConfigParser(interpolation=None)
    ini = _INI.format(backend=backend, base_dir=cache_dir)
    if backend.endswith("raw"):
        ini += "cache.arguments.file_movable = true\n"
    parser.read_string(ini)
    region = make_region().configure_from_config(dict(parser["app:main"]), "cache.")
    settings = region.backend.settings
    assert region.expiration_time == 600
    assert settings.base_dir == cache_dir
    assert settings.cache_size == 512 * 1024**2
    assert settings.max_entries == 250_000
    assert settings.expiration_time == 30.0
    assert settings.distributed_lock is False
    assert settings.fsync is True
    assert settings.file_mode == 0o640
    assert settings.dir_mode == 0o750
    assert (settings.shard_depth, settings.shard_width, settings.lock_slots) == (3, 1, 128)
    assert settings.eviction_low_water == 0.75
    assert settings.reconcile_interval is None
    assert settings.temp_max_age == 120.0
    assert settings.write_errors == "log"
    if backend.endswith("raw"):
        assert settings.file_movable is True
    # The modes reach the files, whatever the umask.
    backend_obj = region.backend
    digest = layout.key_digest(b"k")
    if backend.endswith("pickled"):
        backend_obj.set_serialized("k", b"v")
    else:
        import io

        backend_obj.set("k", io.BytesIO(b"v"))
    entry = backend_obj.store.layout.entry_path(digest)
    assert stat.S_IMODE(os.stat(entry).st_mode) == 0o640
    assert entry.count(os.sep) - cache_dir.count(os.sep) == 5  # data/a/b/c/<digest>


@pytest.mark.parametrize(
    ("written", "expected"),
    [("640", 0o640), ("0640", 0o640), ("0o640", 0o640), ("440", 0o440), ("700", 0o700)],
)
def test_ini_permission_bits_are_octal(cache_dir, written, expected):
    """dogpile turns "440" into the int 440 before the backend sees it; it must mean 0o440."""
    config = {
        "cache.backend": "dogpile_fsbackend.pickled",
        "cache.arguments.base_dir": cache_dir,
        "cache.arguments.file_mode": written,
        "cache.arguments.dir_mode": "0750",  # a directory mode must stay usable
    }
    settings = make_region().configure_from_config(config, "cache.").backend.settings
    assert (settings.file_mode, settings.dir_mode) == (expected, 0o750)
