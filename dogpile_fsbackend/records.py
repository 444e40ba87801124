"""The entry file format: a fixed header, the original key, then the payload.

Header (little endian, 32 bytes)::

    magic "DFSB" | version u8 | kind u8 | form u16 | created f64
    | key length u32 | payload length u64 | crc32(header before it + key + payload) u32

The key makes a hash collision or a foreign file a miss, never a wrong value;
the lengths catch truncation and the CRC32 catches bit flips (zlib's CRC runs at
several GB/s, so it costs well under a microsecond on small values).

Versions: pickled entries are version 2, whose ``form`` tells what the payload
is (``FORM_SERIALIZED``: the bytes a region serialized, dogpile's
``metadata|value``; ``FORM_VALUE``: the pickled ``(value, metadata)`` of a
``CachedValue``).  Version 1 pickled entries, all of the first form, are read
as damaged: a miss, removed and replaced by the next set.  Raw entries are
still version 1 (their record did not change, so their files stay valid).
"""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any, NamedTuple

from .layout import is_token

MAGIC = b"DFSB"
KIND_PICKLED = 1
KIND_RAW = 2
VERSIONS = {KIND_PICKLED: 2, KIND_RAW: 1}  # the current format of each kind
FORM_SERIALIZED = 0  # the payload is what a region's serializer made (and raw metadata)
FORM_VALUE = 1  # the payload is a pickled (value, metadata) tuple: no serializer ran

_HEADER = struct.Struct("<4sBBHdIQI")
HEADER_SIZE = _HEADER.size
_CRC_AT = HEADER_SIZE - 4  # the checksum covers every header byte before it


class DamagedRecord(Exception):
    """The file is truncated, corrupted, foreign, or belongs to another key."""


class OversizedRecord(DamagedRecord):
    """The file is larger than the cache's size limit: it is not read at all.

    Damage to a scan that repairs under this limit (``verify``); a hit leaves it
    alone, as a process configured with a larger ``cache_size`` may own it.
    """


class Record(NamedTuple):
    kind: int
    created: float
    payload: bytes
    form: int = FORM_SERIALIZED


# A NamedTuple without its Python-level __new__: decode runs on every hit.
_new_record = tuple.__new__
_unpack_header = _HEADER.unpack_from
_crc32 = zlib.crc32
_COPY_MAX = 4096  # up to this size, slicing bytes costs less than a memoryview


def encode(
    kind: int, key: bytes, payload: bytes, created: float, form: int = FORM_SERIALIZED
) -> bytes:
    fields = _HEADER.pack(MAGIC, VERSIONS[kind], kind, form, created, len(key), len(payload), 0)[
        :_CRC_AT
    ]
    crc = zlib.crc32(payload, zlib.crc32(key, zlib.crc32(fields)))  # a flipped `created` too
    return b"".join((fields, crc.to_bytes(4, "little"), key, payload))


def decode(data: bytes, kind: int, key: bytes) -> Record:
    """Parse ``data`` read from an entry of ``key``; raise DamagedRecord if it is not one."""
    size = len(data)
    if size < HEADER_SIZE:
        raise DamagedRecord("shorter than the header")
    magic, version, found_kind, form, created, key_len, payload_len, crc = _unpack_header(data)
    if magic != MAGIC or found_kind != kind or version != VERSIONS[kind]:
        raise DamagedRecord("not an entry of this format and kind")
    payload_at = HEADER_SIZE + key_len
    if payload_at + payload_len != size:
        raise DamagedRecord("length does not match the header")
    if not 0.0 <= created < 1e11:  # NaN, infinite or absurd: would crash utime and expiry
        raise DamagedRecord("creation time out of range")
    if data[HEADER_SIZE:payload_at] != key:
        raise DamagedRecord("entry belongs to another key")
    # The key and payload follow the header: one CRC call for both (copied if small).
    body = data[HEADER_SIZE:] if size <= _COPY_MAX else memoryview(data)[HEADER_SIZE:]
    if _crc32(body, _crc32(data[:_CRC_AT])) != crc:
        raise DamagedRecord("checksum mismatch")
    return _new_record(Record, (found_kind, created, data[payload_at:], form))


@dataclass(frozen=True)
class RawMeta:
    """What a raw entry's record carries besides the key: where and what its bytes are."""

    token: str  # names the data file <digest>.<token>
    size: int
    position: int  # where the creator left the file; cached gets start here
    metadata: dict[str, Any] | None  # dogpile's CachedValue metadata (None for a bare file)
    filename: str | None = None
    content_type: str | None = None

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, payload: bytes) -> RawMeta:
        try:
            fields = json.loads(payload)
            meta = cls(**fields)
        except (ValueError, TypeError) as exc:
            raise DamagedRecord("unreadable raw metadata") from exc
        token = meta.token
        if (
            # The token becomes part of a path: a crafted "x/../../etc/passwd" must not.
            not isinstance(token, str)
            or not is_token(token)
            or not isinstance(meta.size, int)
            or not isinstance(meta.position, int)
            or not 0 <= meta.position <= meta.size
            or not isinstance(meta.metadata, (dict, type(None)))
        ):
            raise DamagedRecord("raw metadata out of range")
        return meta


def header_kind(data: bytes) -> int | None:
    """The kind byte of an entry header (at least its first bytes); None if not one."""
    if len(data) < HEADER_SIZE or data[:4] != MAGIC:
        return None
    return data[5]


def declared_size(header: bytes) -> int | None:
    """The whole entry's length as its header states it; None if ``header`` is not one.

    Lets a reader bound what it reads by the header, not by the file's size:
    an entry extended (even sparsely, to gigabytes) is damage, never a read.
    """
    if len(header) < HEADER_SIZE or header[:4] != MAGIC:
        return None
    key_len, payload_len = _HEADER.unpack_from(header)[5:7]
    return HEADER_SIZE + int(key_len) + int(payload_len)


def stored_key(data: bytes) -> bytes | None:
    """The key recorded in an entry, for scans that do not know it; None if not a header."""
    if len(data) < HEADER_SIZE or data[:4] != MAGIC:
        return None
    key_len = _HEADER.unpack_from(data)[5]
    return data[HEADER_SIZE : HEADER_SIZE + key_len]
