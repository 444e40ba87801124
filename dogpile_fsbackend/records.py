"""The entry file format: a fixed header, the original key, then the payload.

Header (little endian, 32 bytes)::

    magic "DFSB" | version u8 | kind u8 | reserved u16 | created f64
    | key length u32 | payload length u64 | crc32(header before it + key + payload) u32

The key makes a hash collision or a foreign file a miss, never a wrong value;
the lengths catch truncation and the CRC32 catches bit flips (zlib's CRC runs at
several GB/s, so it costs well under a microsecond on small values).
"""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

MAGIC = b"DFSB"
VERSION = 1
KIND_PICKLED = 1
KIND_RAW = 2

_HEADER = struct.Struct("<4sBBHdIQI")
HEADER_SIZE = _HEADER.size
_CRC_AT = HEADER_SIZE - 4  # the checksum covers every header byte before it


class DamagedRecord(Exception):
    """The file is truncated, corrupted, foreign, or belongs to another key."""


@dataclass(frozen=True)
class Record:
    kind: int
    created: float
    payload: bytes


def encode(kind: int, key: bytes, payload: bytes, created: float) -> bytes:
    fields = _HEADER.pack(MAGIC, VERSION, kind, 0, created, len(key), len(payload), 0)[:_CRC_AT]
    crc = zlib.crc32(payload, zlib.crc32(key, zlib.crc32(fields)))  # a flipped `created` too
    return b"".join((fields, crc.to_bytes(4, "little"), key, payload))


def decode(data: bytes, kind: int, key: bytes) -> Record:
    """Parse ``data`` read from an entry of ``key``; raise DamagedRecord if it is not one."""
    if len(data) < HEADER_SIZE:
        raise DamagedRecord("shorter than the header")
    magic, version, found_kind, _, created, key_len, payload_len, crc = _HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION or found_kind != kind:
        raise DamagedRecord("not an entry of this format and kind")
    if HEADER_SIZE + key_len + payload_len != len(data):
        raise DamagedRecord("length does not match the header")
    if not 0.0 <= created < 1e11:  # NaN, infinite or absurd: would crash utime and expiry
        raise DamagedRecord("creation time out of range")
    view = memoryview(data)
    found_key = view[HEADER_SIZE : HEADER_SIZE + key_len]
    if found_key != key:
        raise DamagedRecord("entry belongs to another key")
    payload = view[HEADER_SIZE + key_len :]
    if zlib.crc32(payload, zlib.crc32(found_key, zlib.crc32(view[:_CRC_AT]))) != crc:
        raise DamagedRecord("checksum mismatch")
    return Record(found_kind, created, bytes(payload))


_HEX_DIGITS = frozenset("0123456789abcdef")


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
            or not 0 < len(token) <= 64
            or not set(token) <= _HEX_DIGITS
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
