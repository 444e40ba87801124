"""Where things live on disk, and what names them: keys, digests, tokens, temp names.

The one module that owns entry names: ``<digest>`` for an entry,
``<digest>.<token>`` for a raw entry's bytes, ``.tmp-<writer token>-<n>``
for files being written, and ``<digest>/<token>`` in URLs.  Path arithmetic
only, no I/O.

A key of any length and any characters is hashed with SHA-256; the hex digest
names the entry and its first ``depth * width`` characters name the nested
shard directories, e.g. ``data/a/b/ab1234...``.  Nothing a caller passes
ever becomes part of a path, so no key can escape ``base_dir``.

Top-level layout of ``base_dir``::

    fsbackend.json     format marker: version, kind, shard layout, lock slots (marker.py)
    lock               byte-range lock file (see locking.py)
    accounting         per-shard byte and entry counters (see accounting.py)
    maintenance.lock   whole-file lock for a directory's first set-up (portalocker)
    invalidation       region invalidation times shared by every process (see
                       invalidation.py; only once ``SharedInvalidation`` wrote one),
                       with invalidation.lock (flock) and invalidation.tmp beside it
    data/a/b/<hash>    one entry (raw entries add <hash>.<token> for the bytes)

Scans and ``clear`` look only under ``data/``: the top-level files are never
deleted by them.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import re
from dataclasses import dataclass, field

from . import forking

MARKER_NAME = "fsbackend.json"
LOCK_NAME = "lock"
ACCOUNTING_NAME = "accounting"
MAINTENANCE_LOCK_NAME = "maintenance.lock"
INVALIDATION_NAME = "invalidation"
INVALIDATION_LOCK_NAME = "invalidation.lock"
INVALIDATION_TEMP_NAME = "invalidation.tmp"  # one writer at a time, under the lock
DATA_DIR = "data"
TEMP_PREFIX = ".tmp-"
HASH_HEX_LEN = 64
WRITER_TOKEN_LEN = 12  # hex digits of a writer's byte of the lock file (see locking.py)
TOKEN_LEN = 16  # hex digits of the token that names a raw entry's data file
MAX_TOKEN_LEN = 64  # what a record read from disk may carry (older releases: 16 too)
# A URL path of the WSGI app: /<digest>/<token>.
URL_PATH = re.compile(rf"/([0-9a-f]{{{HASH_HEX_LEN}}})/([0-9a-f]{{1,{MAX_TOKEN_LEN}}})")


def encode_key(key: str | bytes) -> bytes:
    """Bytes that identify ``key``; lone surrogates survive so no two keys collide."""
    if isinstance(key, bytes):
        return key
    return key.encode("utf-8", "surrogatepass")


def decode_key(key_bytes: bytes) -> str | None:
    """The key that ``encode_key`` made ``key_bytes`` from; None if no str encodes so."""
    try:
        return key_bytes.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None


def key_digest(key_bytes: bytes) -> str:
    return hashlib.sha256(key_bytes).hexdigest()


def digest_of(key: str) -> str:
    """The digest that names the entry of ``key`` (a str, as backends take them)."""
    return key_digest(encode_key(key))


class _Tokens:
    """Per-write tokens: unpredictable (they make URLs unguessable) yet no syscall each.

    Each process draws one secret from the OS (again after ``fork``, so parent
    and child never repeat each other) and derives a token per write from a
    counter with a keyed BLAKE2b.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._secret = os.urandom(16)
        self._counter = itertools.count()

    def new(self) -> str:
        number = next(self._counter).to_bytes(8, "little")
        return hashlib.blake2b(number, key=self._secret, digest_size=TOKEN_LEN // 2).hexdigest()


_tokens = _Tokens()
forking.call_in_children(_tokens.reset)


def new_token() -> str:
    """A fresh token for one write of a raw entry (its data file name, etag and URL)."""
    return _tokens.new()


def is_token(text: str) -> bool:
    """True for what may name a data file: 1 to 64 lowercase hex digits (never a path)."""
    return 0 < len(text) <= MAX_TOKEN_LEN and is_hex(text)


def data_file_name(digest: str, token: str) -> str:
    return f"{digest}.{token}"


def url_path(digest: str, token: str) -> str:
    return f"/{digest}/{token}"


def parse_url_path(path: str) -> tuple[str, str] | None:
    """``(digest, token)`` of a URL path made by ``url_path``; None for any other path."""
    match = URL_PATH.fullmatch(path)
    return None if match is None else (match[1], match[2])


@dataclass(frozen=True)
class Layout:
    """Maps digests to shard directories and files under ``base_dir``."""

    base_dir: str
    depth: int
    width: int
    # Derived once, as plain attributes (every get and set reads them; a property or
    # cached_property costs a descriptor lookup each time).
    data_dir: str = field(init=False, repr=False, compare=False)
    shard_levels: int = field(init=False, repr=False, compare=False)
    shard_count: int = field(init=False, repr=False, compare=False)
    _shard_digits: int = field(init=False, repr=False, compare=False)
    _default_shape: bool = field(init=False, repr=False, compare=False)
    _level_slices: tuple[slice, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        derive = functools.partial(object.__setattr__, self)  # frozen: set once, here
        width, depth = self.width, self.depth
        derive("data_dir", os.path.join(self.base_dir, DATA_DIR))
        # Directory levels that make up an accounting shard: enough for 256+ shards,
        # each with its own counters and byte lock.
        levels = min(depth, -(-2 // width))
        derive("shard_levels", levels)
        derive("_shard_digits", levels * width)  # hex digits of a digest naming its shard
        derive("shard_count", 1 << (4 * levels * width))  # 16 ** those digits
        # The default layout (two levels of one hex digit), spelled out on the hot path.
        derive("_default_shape", width == 1 and depth == 2)
        derive("_level_slices", tuple(slice(i * width, (i + 1) * width) for i in range(depth)))

    def shard_index(self, digest: str) -> int:
        return int(digest[: self._shard_digits], 16)

    def shard_dir(self, index: int) -> str:
        hex_index = format(index, f"0{self._shard_digits}x")
        return os.path.join(self.data_dir, *self._parts(hex_index, self.shard_levels))

    def entry_dir(self, digest: str) -> str:
        # On the hot path (POSIX paths only): the default layout spelled out, else plain
        # joins of precomputed slices.
        if self._default_shape:
            return f"{self.data_dir}/{digest[0]}/{digest[1]}"
        return "/".join([self.data_dir, *[digest[cut] for cut in self._level_slices]])

    def _parts(self, hex_text: str, levels: int) -> list[str]:
        return [hex_text[i * self.width : (i + 1) * self.width] for i in range(levels)]

    def entry_path(self, digest: str) -> str:
        if self._default_shape:  # entry_dir's, inlined: every get and set asks for it
            return f"{self.data_dir}/{digest[0]}/{digest[1]}/{digest}"
        return f"{self.entry_dir(digest)}/{digest}"

    def data_path(self, digest: str, token: str) -> str:
        """The path of a raw entry's bytes (see ``data_file_name``)."""
        return f"{self.entry_dir(digest)}/{digest}.{token}"

    def path(self, name: str) -> str:
        return os.path.join(self.base_dir, name)


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX)


def temp_name(writer_token: str, number: int) -> str:
    """``.tmp-<writer token>-<number>``: the writer's token tells scans if it is alive."""
    return f"{TEMP_PREFIX}{writer_token}-{number:x}"


def temp_writer(name: str) -> str | None:
    """The writer token of a temp file name (see ``temp_name``); None if it has none."""
    token = name[len(TEMP_PREFIX) :].split("-", 1)[0]
    return token if len(token) == WRITER_TOKEN_LEN and is_hex(token) else None


def bookkeeping_temp(name: str) -> str | None:
    """The temp part (``.tmp-...``) of ``accounting.tmp-...`` or ``fsbackend.json.tmp-...``,
    a new bookkeeping file being written; None for any other name."""
    for bookkeeping in (ACCOUNTING_NAME, MARKER_NAME):
        if name.startswith(bookkeeping + TEMP_PREFIX):
            return name[len(bookkeeping) :]
    return None


_BOOKKEEPING_NAMES = frozenset(
    {
        MARKER_NAME,
        LOCK_NAME,
        ACCOUNTING_NAME,
        MAINTENANCE_LOCK_NAME,
        INVALIDATION_NAME,
        INVALIDATION_LOCK_NAME,
        INVALIDATION_TEMP_NAME,
    }
)


def is_bookkeeping_name(name: str) -> bool:
    """True for the name of one of a cache directory's own files (or one being written)."""
    return name in _BOOKKEEPING_NAMES or bookkeeping_temp(name) is not None


def is_legacy_temp_name(name: str) -> bool:
    """True for ``.tmp-<pid>-<random>``, the temp names of releases before writer tokens."""
    return name[len(TEMP_PREFIX) :].split("-", 1)[0].isdigit()


def split_entry_name(name: str) -> tuple[str, str | None] | None:
    """``(digest, token)`` for ``<digest>`` or ``<digest>.<token>``; None if foreign."""
    digest, _, token = name.partition(".")
    if len(digest) != HASH_HEX_LEN or not is_hex(digest):
        return None
    if token and not is_hex(token):
        return None
    return digest, token or None


def is_hex(text: str) -> bool:
    return not text.strip("0123456789abcdef")  # scans call this per file: keep it in C
