"""The shared tier for large files: one S3-compatible bucket, through boto3's plain S3 API.

A raw entry is one object, ``<prefix><sha256 hex of the key>``, holding exactly
the file's bytes, so that a presigned URL serves it as it is.  What the raw
record says about the bytes travels in one user-metadata header,
``x-amz-meta-dogpile-fsbackend``: a base64url JSON :class:`Description` of the
token, size, creator's position, dogpile's metadata, file name, content type,
creation time, the CRC32 of every byte and the key.  Base64 keeps any file
name (non-ASCII included) within what S3 allows in a header, and the header
within S3's 2 KB of user metadata: a key too long for it is left out (the
object's name still says which key it belongs to), and a file name or
content type too long for it is refused before anything is stored.  The
object also gets ``Content-Type`` and ``Content-Disposition`` (the file name),
for whoever fetches it through a presigned URL.

**Checks.**  The CRC32 is computed from the cached file before the upload
(the object's metadata is fixed when the upload starts), and every download
recomputes it and counts the bytes; the entry is published only if both
match.  On top of that, botocore's own checksums (CRC32 on every upload since
botocore 1.36, checked by the store; checked on downloads where the store
returns a whole-object checksum) apply as configured.

Uploads stream the cached file with boto3's managed transfer: multipart above
``part_size``, ``concurrency`` parts at once, each read from the file, so
memory stays flat whatever the size.  Downloads stream one GET in 1 MiB reads.

Nothing here imports boto3 before a bucket is configured.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import json
import logging
import math
import os
import threading
import zlib
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from . import forking
from .config import parse_size
from .exceptions import ConfigError
from .rawfiles import content_disposition, header_content_type
from .records import DamagedRecord, RawMeta
from .remote import require_extra

log = logging.getLogger(__name__)

METADATA_NAME = "dogpile-fsbackend"  # sent as x-amz-meta-dogpile-fsbackend
METADATA_LIMIT = 2048  # S3: user metadata, names and values, at most 2 KB of UTF-8
FORMAT_VERSION = 1
MIN_PART_SIZE = 5 * 1024**2  # S3's smallest multipart part
CHUNK = 1 << 20
# The client's defaults under the user's own: fail fast (a tier degrades instead of
# waiting), one retry, and SigV4, which every S3-compatible store accepts for
# presigned URLs (boto3 presigns with SigV2 otherwise, which new AWS regions refuse).
CLIENT_DEFAULTS: dict[str, Any] = {
    "signature_version": "s3v4",
    "connect_timeout": 2,
    "read_timeout": 30,
    "retries": {"max_attempts": 2, "mode": "standard"},
}
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # SigV4's limit


class DamagedObject(Exception):
    """An object's bytes do not match its description (length or CRC32)."""


@dataclasses.dataclass(frozen=True)
class Description:
    """What an object says about its bytes: the raw record's fields, plus a checksum."""

    meta: RawMeta
    created: float
    crc32: int
    key: bytes | None  # None when too long for the metadata header

    def to_header(self) -> str:
        """The header value: with the key if it fits in S3's limit, without if not.

        Raises ValueError naming what is too long when even that does not fit.
        """
        header = _encode(self)
        if not _fits(header) and self.key is not None:
            header = _encode(dataclasses.replace(self, key=None))
        if _fits(header):
            return header
        raise ValueError(
            "a raw_tiered value's file name and content type must fit in the bucket's "
            f"{METADATA_LIMIT} bytes of object metadata (S3's limit), with base64 "
            f"encoding: filename {self.meta.filename!r:.120} and content_type "
            f"{self.meta.content_type!r:.120} take {len(header)} bytes"
        )

    @classmethod
    def from_header(cls, value: str) -> Description:
        """Parse a header value; DamagedRecord if it is not one of ours."""
        try:
            fields = json.loads(base64.urlsafe_b64decode(value.encode("ascii")))
            if not isinstance(fields, dict) or fields.get("v") != FORMAT_VERSION:
                raise DamagedRecord("not a description of this format version")
            meta = RawMeta.from_bytes(json.dumps(fields["e"]).encode())
            created, crc32, key = fields["c"], fields["crc32"], fields.get("k")
            key_bytes = None if key is None else base64.b64decode(key, validate=True)
        except (ValueError, TypeError, KeyError, UnicodeError, binascii.Error) as exc:
            raise DamagedRecord(f"unreadable object description: {exc}") from exc
        if (
            isinstance(created, bool)
            or not isinstance(created, (int, float))
            or not 0.0 <= created < 1e11
            or isinstance(crc32, bool)
            or not isinstance(crc32, int)
            or not 0 <= crc32 < 2**32
        ):
            raise DamagedRecord("object description out of range")
        return cls(meta, float(created), crc32, key_bytes)


def _encode(description: Description) -> str:
    fields: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "e": dataclasses.asdict(description.meta),
        "c": description.created,
        "crc32": description.crc32,
    }
    if description.key is not None:
        fields["k"] = base64.b64encode(description.key).decode("ascii")
    text = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode("utf-8", "surrogatepass")).decode("ascii")


def _fits(header: str) -> bool:
    return len(METADATA_NAME) + len(header) <= METADATA_LIMIT


def check_describable(
    filename: str | None, content_type: str | None, metadata: dict[str, Any] | None
) -> None:
    """ValueError now if a value with these could never be described in the bucket.

    Checked before anything is stored, with the largest token, sizes and times
    an entry can have.
    """
    largest = Description(
        RawMeta("f" * 64, 2**63, 2**63, metadata, filename, content_type), 1e11, 2**32 - 1, None
    )
    largest.to_header()


def file_crc32(fd: int, size: int) -> int:
    """The CRC32 of the first ``size`` bytes of ``fd``, read without moving its position."""
    crc, offset, buffer = 0, 0, bytearray(CHUNK)
    view = memoryview(buffer)
    while offset < size:
        count = os.preadv(fd, [view[: min(CHUNK, size - offset)]], offset)
        if count == 0:
            raise DamagedObject(f"the cached file ended after {offset} of {size} bytes")
        crc = zlib.crc32(view[:count], crc)
        offset += count
    return crc


class RemoteObject:
    """An object being downloaded: its description, then its verified bytes (once)."""

    def __init__(self, name: str, description: Description, body: Any, errors: Any) -> None:
        self.name = name
        self.description = description
        self._body = body
        self._errors = errors

    def copy_to(self, fd: int) -> None:
        """Write the object's bytes to ``fd``; DamagedObject unless every byte checks out."""
        expected = self.description.meta.size
        crc = size = 0
        try:
            while chunk := self._body.read(CHUNK):
                size += len(chunk)
                if size > expected:
                    break
                crc = zlib.crc32(chunk, crc)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
        except self._errors.FlexibleChecksumError as exc:  # botocore's own check failed
            raise DamagedObject(f"{self.name}: {exc}") from exc
        if size != expected:
            raise DamagedObject(
                f"{self.name}: {size} bytes arrived, its description says {expected}"
            )
        if crc != self.description.crc32:
            raise DamagedObject(
                f"{self.name}: CRC32 {crc:08x} of the bytes that arrived, its description "
                f"says {self.description.crc32:08x}"
            )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()

    def __enter__(self) -> RemoteObject:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class Bucket:
    """One bucket and prefix, as a raw tier uses it: upload, describe, download, delete, presign.

    :param name: the bucket (it must exist; the tier never creates one).
    :param prefix: put before every object name (``"files/"``).
    :param client_arguments: boto3's ``client("s3", ...)`` arguments
     (``endpoint_url``, ``region_name``, credentials, ``config``: a botocore
     ``Config`` or a dict of its arguments, merged over :data:`CLIENT_DEFAULTS`).
    :param part_size: bytes per multipart part (and the size from which uploads are multipart).
    :param concurrency: parts uploaded at once.
    """

    def __init__(
        self,
        name: str,
        prefix: str,
        client_arguments: Mapping[str, Any],
        part_size: int,
        concurrency: int,
    ) -> None:
        self.name = name
        self.prefix = prefix
        self.concurrency = concurrency
        self._boto3 = require_extra("boto3", "s3", "dogpile_fsbackend.raw_tiered")
        import botocore.config
        import botocore.exceptions
        from boto3.s3.transfer import TransferConfig

        self._errors = botocore.exceptions
        arguments = dict(client_arguments)
        user_config = arguments.pop("config", None)
        config = botocore.config.Config(**CLIENT_DEFAULTS)
        if isinstance(user_config, Mapping):
            user_config = botocore.config.Config(**user_config)
        if user_config is not None:
            if not isinstance(user_config, botocore.config.Config):
                raise ConfigError(
                    "s3.config", "a botocore.config.Config or a dict of its arguments", user_config
                )
            config = config.merge(user_config)
        self._client_arguments = {**arguments, "config": config}
        self.endpoint = arguments.get("endpoint_url")
        self._transfer = TransferConfig(
            multipart_threshold=part_size,
            multipart_chunksize=part_size,
            max_concurrency=concurrency,
            use_threads=concurrency > 1,
        )
        self._client: Any = None
        self._pid = 0
        try:
            self.client  # noqa: B018 -- made now, so that a bad argument fails at configure time
        except (TypeError, ValueError, self._errors.BotoCoreError) as exc:
            raise ConfigError(
                "s3", f"boto3 client arguments that work ({exc})", arguments
            ) from exc

    def __repr__(self) -> str:
        where = f" at {self.endpoint}" if self.endpoint else ""
        return f"S3 bucket {self.name!r}{where}"

    @property
    def client(self) -> Any:
        """This process's S3 client (a forked child makes its own: sockets are not shared)."""
        if self._client is None or self._pid != os.getpid():
            with _SESSION_LOCK:
                if self._client is None or self._pid != os.getpid():
                    session = _session(self._boto3)
                    self._client = session.client("s3", **self._client_arguments)
                    self._pid = os.getpid()
        return self._client

    def error_types(self) -> tuple[type[BaseException], ...]:
        """Exceptions that mean "the bucket is out" (or refuses us), not a bug of ours."""
        errors = self._errors
        return (
            errors.ConnectionError,  # refused, timed out, DNS, TLS, proxy
            errors.HTTPClientError,  # read timeouts, connections closed mid-transfer
            errors.IncompleteReadError,
            errors.NoCredentialsError,
            errors.ClientError,  # any error reply but "not found" (which is a miss)
            self._boto3.exceptions.S3UploadFailedError,  # boto3's wrapper of the above
        )

    def object_name(self, digest: str) -> str:
        return f"{self.prefix}{digest}"

    # -- operations ---------------------------------------------------------------------

    def upload(self, digest: str, fd: int, description: Description) -> None:
        """Stream the file open on ``fd`` (a cached data file) to the object of ``digest``.

        The parts are read through ``/proc/self/fd``: each part opens the file
        itself, so nothing is held in memory, and an eviction of the cached copy
        during the upload (an unlink) cannot cut it short.
        """
        meta = description.meta
        extra: dict[str, Any] = {
            "Metadata": {METADATA_NAME: description.to_header()},
            "ContentType": header_content_type(meta.content_type),
        }
        if meta.filename:
            extra["ContentDisposition"] = content_disposition(meta.filename)
        self.client.upload_file(
            f"/proc/self/fd/{fd}",
            self.name,
            self.object_name(digest),
            ExtraArgs=extra,
            Config=self._transfer,
        )

    def describe(self, digest: str, key: bytes | None = None) -> Description | None:
        """The object's description (a HEAD request); None if it is missing or not ours."""
        name = self.object_name(digest)
        try:
            response = self.client.head_object(Bucket=self.name, Key=name)
        except self._errors.ClientError as exc:
            if _is_not_found(exc):
                return None
            raise
        return self._description(name, response, key)

    def open(self, digest: str, key: bytes | None = None) -> RemoteObject | None:
        """The object, ready to be copied (a GET); None if it is missing or not ours."""
        name = self.object_name(digest)
        try:
            response = self.client.get_object(Bucket=self.name, Key=name)
        except self._errors.ClientError as exc:
            if _is_not_found(exc):
                return None
            raise
        description = self._description(name, response, key)
        if description is None:
            response["Body"].close()
            return None
        return RemoteObject(name, description, response["Body"], self._errors)

    def delete(self, digest: str) -> None:
        self.client.delete_object(Bucket=self.name, Key=self.object_name(digest))

    def presigned_url(
        self, digest: str, method: str, expires_in: int, cache_control: str | None = None
    ) -> str:
        """A URL that lets anyone holding it GET (or HEAD) the object for ``expires_in`` s.

        A SigV4 URL signs the method and the host only, so a client may add
        ``Range`` and conditional headers.  ``cache_control`` becomes the
        response's ``Cache-Control`` (``response-cache-control``, signed).
        """
        params = {"Bucket": self.name, "Key": self.object_name(digest)}
        if cache_control:
            params["ResponseCacheControl"] = cache_control
        operation = "head_object" if method == "HEAD" else "get_object"
        url: str = self.client.generate_presigned_url(
            operation, Params=params, ExpiresIn=expires_in
        )
        return url

    def _description(
        self, name: str, response: Mapping[str, Any], key: bytes | None
    ) -> Description | None:
        """The description of a HEAD or GET response; None (logged) for a foreign object."""
        header = (response.get("Metadata") or {}).get(METADATA_NAME)
        try:
            if header is None:
                raise DamagedRecord(f"no x-amz-meta-{METADATA_NAME} header")
            description = Description.from_header(header)
            if response.get("ContentLength") != description.meta.size:
                raise DamagedRecord(
                    f"{response.get('ContentLength')} bytes, its description says "
                    f"{description.meta.size}"
                )
            if key is not None and description.key not in (None, key):
                raise DamagedRecord("it belongs to another key")
        except DamagedRecord as exc:
            log.warning("s3://%s/%s is not a raw_tiered entry (%s); a miss", self.name, name, exc)
            return None
        return description


_SESSION_LOCK = threading.Lock()  # boto3 sessions may not make clients in two threads at once
_sessions: dict[int, Any] = {}  # pid -> this process's boto3 session


@forking.call_in_children
def _new_session_lock() -> None:
    """A forked child gets an unheld lock: the parent's thread that held it is not there."""
    global _SESSION_LOCK
    _SESSION_LOCK = threading.Lock()


def _session(boto3: Any) -> Any:
    """One boto3 session per process, under _SESSION_LOCK: its loaders keep the parsed
    S3 model, so a client costs milliseconds instead of a fresh parse (0.1-0.2 s)."""
    pid = os.getpid()
    if pid not in _sessions:
        _sessions.clear()  # a forked child: the parent's session is not ours
        _sessions[pid] = boto3.session.Session()
    return _sessions[pid]


def _is_not_found(error: Any) -> bool:
    """True for "no such object" (a miss); a missing bucket (``NoSuchBucket``, also a
    404) is an outage.  A HEAD's answer has no body to tell them apart: its "404" is a
    miss, and the next GET tells."""
    response = getattr(error, "response", {}) or {}
    return str(response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound")


def parse_part_size(name: str, value: Any) -> int:
    """A multipart part size: bytes (or ``"16MiB"``), at least S3's 5 MiB."""
    size = parse_size(name, value)
    if size < MIN_PART_SIZE:
        raise ConfigError(name, "at least 5 MiB (S3's smallest part), e.g. '16MiB'", value)
    return size


def parse_expires_in(name: str, value: Any) -> int:
    """Seconds a presigned URL lives: 1 to 604800 (SigV4's seven days)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 1 <= value <= MAX_PRESIGN_SECONDS
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        raise ConfigError(name, f"seconds from 1 to {MAX_PRESIGN_SECONDS} (seven days)", value)
    return int(value)
