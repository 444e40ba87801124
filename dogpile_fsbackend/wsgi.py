"""Serving raw cache entries over HTTP: a WSGI app, a middleware to mount it, and URLs.

A URL names an entry as ``<prefix>/<digest>/<token>``: the SHA-256 hex of its
key and the random token of its current write (the suffix of its data file).
The app serves a path only while the token matches the live entry, so a URL
cannot be derived from a key, no URL accepts a key, and every rewrite of a
key gets a new URL (the old one answers 404): under one URL the bytes never
change, which is what lets browsers cache them.

Responses carry Content-Type, Content-Length, Last-Modified and ETag (the
token), answer If-None-Match / If-Modified-Since with 304, a single Range with
206 or 416 (If-Range honoured), and HEAD.  A body that runs to the end of the
file goes to ``wsgi.file_wrapper`` when the server offers one, so a server
with sendfile support never copies it through Python; anything else is read
in 256 KiB chunks.  Either way memory stays flat whatever the file size.

Over ``dogpile_fsbackend.raw_tiered``, ``presign=True`` answers a request for
a file that is not on this host with a ``307 Temporary Redirect`` to a
presigned URL of its object, so the browser (or CDN) fetches it from the
bucket instead of this host downloading it first; ``presign="always"``
redirects every request.  307, not 302: the client must repeat the request
unchanged at the bucket (a HEAD stays a HEAD, a Range stays a Range), which is
what 307 promises and 302 does not.  Without ``presign`` the app fills the
local copy from the bucket and serves it as above.
"""

from __future__ import annotations

import email.utils
import hmac
import io
import os
import re
import stat
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import timezone
from typing import IO, TYPE_CHECKING, Any, NamedTuple

from dogpile.cache.api import NO_VALUE, CachedValue
from dogpile.cache.region import CacheRegion

from . import layout
from .backends import RawFSBackend
from .rawfiles import (
    CachedFile,
    CachedFileReader,
    content_disposition,
    guess_type,
    header_content_type,
)
from .rawtiered import RawTieredBackend
from .s3tier import parse_expires_in

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from dogpile.cache.api import NoValueType  # dogpile.cache 1.3.3+ only

_CHUNK = 256 * 1024
_PATH = re.compile(r"/([0-9a-f]{64})/([0-9a-f]{1,64})")
_RANGE = re.compile(r"\s*bytes\s*=\s*(\d{0,19})\s*-\s*(\d{0,19})\s*", re.IGNORECASE)
_SERVES = (
    "a cached raw value (CachedFileReader) or an open binary regular file: open(path, 'rb'), "
    "tempfile.NamedTemporaryFile(), or either wrapped in CachedFile(...), as a creator "
    "returns them on the first call"
)


class _Served(NamedTuple):
    """What the headers say about a file: its own record's, or what ``fstat`` tells."""

    size: int
    modified: float
    etag: str
    filename: str | None
    content_type: str | None


class _Plan(NamedTuple):
    status: str
    headers: list[tuple[str, str]]
    start: int
    length: int
    has_body: bool


class _RangeNotSatisfiable(Exception):
    pass


class CacheFileApp:
    """A read-only WSGI app that serves raw cache entries at the URLs :meth:`url_for` makes.

    Basic usage::

        files = CacheFileApp(raw_region, prefix="/files")
        application = mount(application, files)

        url = files.url_for(key)  # "/files/<digest>/<token>", None on a miss

    :param cache: a region configured with the ``dogpile_fsbackend.raw`` or
     ``dogpile_fsbackend.raw_tiered`` backend, or such a backend.  With a
     region, its expiration time and
     :meth:`~dogpile.cache.region.CacheRegion.invalidate` apply as for
     ``region.get``: an entry the region would not return is a 404.
    :param prefix: the path the app is mounted at, ``""`` or ``"/some/path"``;
     :meth:`url_for` returns paths under it and :func:`mount` routes it.
    :param cache_control: the Cache-Control header, ``None`` for none.  The
     default lets browsers keep a copy but revalidate it (a cheap 304), so a
     deleted entry stops being served at once.  Since a URL's bytes never
     change, ``"public, max-age=31536000, immutable"`` is safe for content
     that is not private.  A presigned URL's response gets it too.
    :param presign: ``raw_tiered`` only.  ``False`` (default): every file is
     served by this app (a file that is not on this host is downloaded into
     its local tier first).  ``True``: a file that is not on this host is
     answered with a ``307`` redirect to a presigned URL of its object, and a
     file that is, is served from the local copy.  ``"always"``: every
     request is redirected.  The redirect itself is never cached
     (``Cache-Control: no-store``).
    :param expires_in: seconds a presigned URL stays valid, 1 to 604800
     (SigV4's seven days).  Defaults to ``3600``.
    """

    def __init__(
        self,
        cache: CacheRegion | RawFSBackend | RawTieredBackend,
        prefix: str = "",
        cache_control: str | None = "private, no-cache",
        presign: bool | str = False,
        expires_in: int = 3600,
    ) -> None:
        if prefix and (not prefix.startswith("/") or prefix.endswith("/")):
            raise ValueError(f"prefix must be '' or '/path' (no trailing '/'), not {prefix!r}")
        if presign not in (False, True, "always"):
            raise ValueError(f"presign must be False, True or 'always', not {presign!r}")
        self.cache = cache
        self.prefix = prefix
        self.cache_control = cache_control
        self.presign = presign
        self.expires_in = parse_expires_in("expires_in", expires_in)
        if not isinstance(cache, CacheRegion) or cache.is_configured:
            self._backend()  # fail now, not on the first request

    def url_for(self, key: str) -> str | None:
        """The URL path of the current entry of ``key``, or None if it is not cached.

        Looked up like ``cache.get(key)`` (key mangler, expiration; a hit
        counts as a use).  The path is relative to the WSGI application root.
        """
        if isinstance(self.cache, CacheRegion) and self.cache.key_mangler:
            key = self.cache.key_mangler(key)
        backend = self._backend()
        if self.presign and isinstance(backend, RawTieredBackend):
            # No download to make a URL: this host's copy, else the bucket's description.
            reader = self._live(backend.local.get(key))
            digest = layout.key_digest(layout.encode_key(key))
            if reader is None:
                description = backend.describe_remote(digest)
                if description is None or self._is_stale(description.meta.metadata):
                    return None
                return f"{self.prefix}/{digest}/{description.meta.token}"
        else:
            reader = self._live(backend.get(key))
            if reader is None:
                return None
            digest = layout.key_digest(layout.encode_key(key))
        with reader:
            token = reader.etag.strip('"')
        return f"{self.prefix}/{digest}/{token}"

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        match = _PATH.fullmatch(environ.get("PATH_INFO", ""))
        if match is None:
            return _error(environ, start_response, "404 Not Found")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _error(
                environ, start_response, "405 Method Not Allowed", [("Allow", "GET, HEAD")]
            )
        digest, token = match.groups()
        backend = self._backend()
        if self.presign and isinstance(backend, RawTieredBackend):
            reader = None
            if self.presign != "always":
                reader = self._matching(backend.local.get_by_digest(digest), token)
            if reader is None:
                return self._redirect(backend, digest, token, environ, start_response)
        elif isinstance(backend, RawTieredBackend):  # a newer write may be in the bucket
            reader = self._matching(backend.get_by_digest(digest, token), token)
        else:
            reader = self._matching(backend.get_by_digest(digest), token)
        if reader is None:
            return _error(environ, start_response, "404 Not Found")
        return self.serve(reader, environ, start_response)

    def serve(
        self,
        file: CachedFileReader | CachedFile | IO[bytes],
        environ: WSGIEnvironment,
        start_response: StartResponse,
    ) -> Iterable[bytes]:
        """Answer a GET or HEAD with a whole file; the response closes ``file``.

        This is what the app does after resolving a URL, for applications
        that look files up themselves, e.g. by key under routes of their own.
        ``file`` is what a raw region returns: a :class:`CachedFileReader` on a
        hit, but on the call that ran the creator, whatever the creator
        returned.  So any open binary regular file is taken (its size, mtime
        and inode give Content-Length, Last-Modified and ETag, its name the
        type), served from its first byte; anything else raises TypeError.
        """
        reader, served = _describe(file)
        try:
            plan = self._plan(served, environ)
            start_response(plan.status, plan.headers)
            if not plan.has_body or environ.get("REQUEST_METHOD") == "HEAD":
                reader.close()
                return []
            reader.seek(plan.start)
            file_wrapper = environ.get("wsgi.file_wrapper")
            if file_wrapper is not None and plan.start + plan.length == served.size:
                body: Iterable[bytes] = file_wrapper(reader, _CHUNK)
                return body
            return _Chunks(reader, plan.length)
        except BaseException:
            reader.close()
            raise

    def _backend(self) -> RawFSBackend | RawTieredBackend:
        cache = self.cache
        backend = cache.actual_backend if isinstance(cache, CacheRegion) else cache
        if not isinstance(backend, (RawFSBackend, RawTieredBackend)):
            raise TypeError(
                "CacheFileApp serves the dogpile_fsbackend.raw backend (or raw_tiered), "
                f"not {type(backend)!r}"
            )
        if self.presign and not isinstance(backend, RawTieredBackend):
            raise ValueError(
                "presign needs the dogpile_fsbackend.raw_tiered backend (files in a bucket), "
                f"not {type(backend).__name__}"
            )
        return backend

    def _matching(
        self, value: CachedValue | CachedFileReader | NoValueType, token: str
    ) -> CachedFileReader | None:
        """The live entry found if ``token`` names its current write, else None."""
        reader = self._live(value)
        if reader is not None and not hmac.compare_digest(reader.etag, f'"{token}"'):
            reader.close()
            return None
        return reader

    def _redirect(
        self,
        backend: RawTieredBackend,
        digest: str,
        token: str,
        environ: WSGIEnvironment,
        start_response: StartResponse,
    ) -> list[bytes]:
        """307 to a presigned URL of the object, if ``token`` names its current write."""
        description = backend.describe_remote(digest)
        if (
            description is None
            or not hmac.compare_digest(description.meta.token, token)
            or self._is_stale(description.meta.metadata)
        ):
            return _error(environ, start_response, "404 Not Found")
        method = "HEAD" if environ.get("REQUEST_METHOD") == "HEAD" else "GET"
        location = backend.presigned_url(
            digest, method, self.expires_in, cache_control=self.cache_control
        )
        headers = [("Location", location), ("Cache-Control", "no-store"), ("Content-Length", "0")]
        start_response("307 Temporary Redirect", headers)
        return []

    def _live(
        self, value: CachedValue | CachedFileReader | NoValueType
    ) -> CachedFileReader | None:
        """The file of a backend hit if ``region.get`` would return it; closed if not.

        A region drops a stale value without closing it, so it is checked
        here, as ``region.get`` does: expiration time, then invalidation.
        """
        if value is NO_VALUE:
            return None
        if not isinstance(value, CachedValue):
            return value
        if self._is_stale(value.metadata):
            value.payload.close()
            return None
        reader: CachedFileReader = value.payload
        return reader

    def _is_stale(self, metadata: Mapping[str, Any] | None) -> bool:
        """True if a region would not return a value with dogpile's ``metadata``."""
        region = self.cache
        if metadata is None or not isinstance(region, CacheRegion):
            return False
        created = metadata.get("ct")
        if isinstance(created, bool) or not isinstance(created, (int, float)):
            return True  # not dogpile's: a region would not take it either
        return bool(
            (region.expiration_time is not None and time.time() - created > region.expiration_time)
            or region.region_invalidator.is_invalidated(created)
        )

    def _plan(self, file: _Served, environ: WSGIEnvironment) -> _Plan:
        size = file.size
        modified = int(file.modified)
        headers = [
            ("ETag", file.etag),
            ("Last-Modified", email.utils.formatdate(modified, usegmt=True)),
            ("Accept-Ranges", "bytes"),
        ]
        if self.cache_control:
            headers.append(("Cache-Control", self.cache_control))
        if _not_modified(environ, file.etag, modified):
            return _Plan("304 Not Modified", headers, 0, 0, has_body=False)
        try:
            byte_range = _byte_range(environ, file.etag, modified, size)
        except _RangeNotSatisfiable:
            headers += [("Content-Range", f"bytes */{size}"), ("Content-Length", "0")]
            return _Plan("416 Range Not Satisfiable", headers, 0, 0, has_body=False)
        headers += [
            ("Content-Type", header_content_type(file.content_type)),
            ("X-Content-Type-Options", "nosniff"),
        ]
        if file.filename:
            headers.append(("Content-Disposition", content_disposition(file.filename)))
        if byte_range is None:
            headers.append(("Content-Length", str(size)))
            return _Plan("200 OK", headers, 0, size, has_body=True)
        start, stop = byte_range
        headers += [
            ("Content-Range", f"bytes {start}-{stop - 1}/{size}"),
            ("Content-Length", str(stop - start)),
        ]
        return _Plan("206 Partial Content", headers, start, stop - start, has_body=True)


def mount(app: WSGIApplication, cache_app: CacheFileApp) -> WSGIApplication:
    """WSGI middleware: requests under ``cache_app.prefix`` go to ``cache_app``, others to ``app``.

    The cache app sees the prefix moved from ``PATH_INFO`` to ``SCRIPT_NAME``.
    """
    prefix = cache_app.prefix
    if not prefix:
        raise ValueError("mount needs a CacheFileApp with a prefix, e.g. prefix='/files'")

    def dispatch(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if not path.startswith(prefix + "/"):
            return app(environ, start_response)
        environ = {
            **environ,
            "SCRIPT_NAME": environ.get("SCRIPT_NAME", "") + prefix,
            "PATH_INFO": path[len(prefix) :],
        }
        return cache_app(environ, start_response)

    return dispatch


class _Chunks:
    """The next ``length`` bytes of a file as a WSGI body; closing it closes the file.

    A class rather than a generator: a server may close a body it never
    started, and an unstarted generator would not run its ``finally``.
    """

    def __init__(self, reader: IO[bytes], length: int) -> None:
        self._reader = reader
        self._left = length

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._left <= 0:
            raise StopIteration
        chunk = self._reader.read(min(_CHUNK, self._left))
        if not chunk:  # cannot happen: data files are never rewritten in place
            raise StopIteration
        self._left -= len(chunk)
        return chunk

    def close(self) -> None:
        self._reader.close()


def _describe(value: Any) -> tuple[IO[bytes], _Served]:
    """The file to send and what its headers say; TypeError for what is not a file."""
    fileobj, filename, content_type = value, None, None
    if isinstance(value, CachedFile):
        fileobj, filename, content_type = value.fileobj, value.filename, value.content_type
    if isinstance(fileobj, CachedFileReader):
        return fileobj, _Served(
            fileobj.content_length,
            fileobj.last_modified,
            fileobj.etag,
            filename or fileobj.filename,
            content_type or fileobj.content_type,
        )
    try:
        is_binary = isinstance(fileobj.read(0), bytes)
        info = os.fstat(fileobj.fileno())
    except (AttributeError, TypeError, OSError, io.UnsupportedOperation):
        raise TypeError(f"serve() takes {_SERVES}; got {type(fileobj).__name__}") from None
    except ValueError as exc:  # closed
        raise ValueError(f"serve() cannot send a closed file: {exc}") from None
    if not is_binary or not stat.S_ISREG(info.st_mode):
        kind = "a text file" if not is_binary else "a file that is not a regular file"
        raise TypeError(f"serve() takes {_SERVES}; got {kind}")
    if content_type is None:
        content_type = guess_type(fileobj, filename)
    etag = f'"{info.st_ino:x}-{info.st_size:x}-{info.st_mtime_ns:x}"'
    return fileobj, _Served(info.st_size, info.st_mtime, etag, filename, content_type)


def _not_modified(environ: WSGIEnvironment, etag: str, modified: int) -> bool:
    """RFC 9110 13.2.2: If-None-Match (weak comparison) wins over If-Modified-Since."""
    if_none_match = environ.get("HTTP_IF_NONE_MATCH")
    if if_none_match is not None:
        tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
        return "*" in tags or etag in tags
    since = _http_date(environ.get("HTTP_IF_MODIFIED_SINCE"))
    return since is not None and modified <= since


def _byte_range(
    environ: WSGIEnvironment, etag: str, modified: int, size: int
) -> tuple[int, int] | None:
    """``(start, stop)`` of a single satisfiable byte range, None to send the whole file.

    Ranges are ignored on HEAD, when malformed, when several are asked for,
    and when If-Range names another version; _RangeNotSatisfiable if the
    range lies past the end.
    """
    header = environ.get("HTTP_RANGE")
    if header is None or environ.get("REQUEST_METHOD") != "GET":
        return None
    if_range = environ.get("HTTP_IF_RANGE", "").strip()
    if if_range:  # strong comparison: a weak tag never matches
        is_tag = if_range.startswith(('"', "W/"))
        if (if_range != etag) if is_tag else (_http_date(if_range) != modified):
            return None
    match = _RANGE.fullmatch(header)
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if not first:  # a suffix: the last N bytes
        if int(last) == 0 or size == 0:
            raise _RangeNotSatisfiable
        return max(0, size - int(last)), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise _RangeNotSatisfiable
    return start, min(size, int(last) + 1) if last else size


def _http_date(value: str | None) -> int | None:
    if not value:
        return None
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:  # "-0000": UTC, said without a zone
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp())


def _error(
    environ: WSGIEnvironment,
    start_response: StartResponse,
    status: str,
    extra: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    body = b"" if environ.get("REQUEST_METHOD") == "HEAD" else status.encode() + b"\n"
    headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(status) + 1))]
    start_response(status, headers + (extra or []))
    return [body]
