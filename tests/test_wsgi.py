"""The WSGI app: real wsgiref servers, a real HTTP client, a real 1 GiB file."""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import http.client
import io
import os
import re
import shutil
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from typing import NamedTuple
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer, make_server

import faultkit
import pytest
from conftest import SPAWN, WAIT
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE, CachedValue

from dogpile_fsbackend import CachedFile, CachedFileReader, CacheFileApp, RawFSBackend, mount
from dogpile_fsbackend.layout import encode_key, key_digest

MiB = 1 << 20
PNG = b"\x89PNG\r\n\x1a\n"


class Reply(NamedTuple):
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def fetch(port: int, path: str, method: str = "GET", **headers: str) -> Reply:
    """One request on a fresh connection (``If_None_Match=`` becomes ``If-None-Match:``)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        connection.request(
            method, path, headers={k.replace("_", "-"): v for k, v in headers.items()}
        )
        response = connection.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        connection.close()


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class SendfileServerHandler(ServerHandler):
    """Sends ``wsgi.file_wrapper`` bodies with os.sendfile, as gunicorn does.

    Like gunicorn it starts at the file's current offset and stops after
    Content-Length bytes; every call is recorded on the server.
    """

    def sendfile(self) -> bool:
        fd = self.result.filelike.fileno()
        offset = os.lseek(fd, 0, os.SEEK_CUR)
        remaining = int(self.headers["Content-Length"])
        self.send_headers()
        self._flush()
        self.request_handler.server.sendfile_calls.append((offset, remaining))
        socket_fd = self.request_handler.connection.fileno()
        while remaining:
            sent = os.sendfile(socket_fd, fd, offset, remaining)
            assert sent, "the file ended before Content-Length"
            offset += sent
            remaining -= sent
        return True


class SendfileRequestHandler(QuietHandler):
    def handle(self) -> None:  # WSGIRequestHandler.handle with our ServerHandler
        self.raw_requestline = self.rfile.readline(65537)
        if not self.parse_request():
            return
        handler = SendfileServerHandler(
            self.rfile, self.wfile, self.get_stderr(), self.get_environ(), multithread=False
        )
        handler.request_handler = self
        handler.run(self.server.get_app())


@contextlib.contextmanager
def running(app, handler_class: type[WSGIRequestHandler] = QuietHandler) -> Iterator[WSGIServer]:
    """A wsgiref server for ``app`` on a free port, in a thread."""
    server = make_server("127.0.0.1", 0, app, handler_class=handler_class)
    server.sendfile_calls = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(WAIT)
        server.server_close()


@pytest.fixture
def serve():
    """``serve(app)`` starts a server for the rest of the test and returns its port."""
    with contextlib.ExitStack() as stack:
        yield lambda app: stack.enter_context(running(app)).server_port


@pytest.fixture
def region(raw_region):
    return raw_region()


def store(region, key: str, data: bytes, filename: str | None = "chart.png") -> None:
    region.set(key, CachedFile(io.BytesIO(data), filename=filename))


def cached(region, key: str):
    """The metadata of a cached file, closing it again."""
    with region.get(key) as reader:
        return reader.etag, reader.last_modified, reader.content_length


DATA = bytes(range(256)) * 40  # 10240 bytes


# -- metadata on a raw get -------------------------------------------------------


def test_a_cached_get_carries_metadata(region, tmp_path):
    store(region, "chart|1", DATA)
    with region.get("chart|1") as reader:
        assert (reader.filename, reader.content_type) == ("chart.png", "image/png")
        assert reader.content_length == len(DATA)
        assert re.fullmatch(r'"[0-9a-f]+"', reader.etag)
        assert reader.tell() == 0 and not reader.writable()
    path = tmp_path / "report.pdf"
    path.write_bytes(b"%PDF-1.4")
    with open(path, "rb") as plain:
        region.set("report", plain)
    with region.get("report") as reader:
        assert (reader.filename, reader.content_type) == (None, "application/pdf")


# -- the app ---------------------------------------------------------------------


def test_browser_gets_file_then_304_then_ranges(region, serve):
    store(region, "chart|1", DATA)
    files = CacheFileApp(region)
    port = serve(files)
    etag, created, size = cached(region, "chart|1")
    url = files.url_for("chart|1")

    first = fetch(port, url)
    assert first.status == 200 and first.body == DATA
    assert first.headers["Content-Type"] == "image/png"
    assert first.headers["Content-Length"] == str(size)
    assert first.headers["ETag"] == etag
    assert first.headers["Last-Modified"] == email.utils.formatdate(int(created), usegmt=True)
    assert first.headers["Content-Disposition"] == 'inline; filename="chart.png"'
    assert first.headers["Accept-Ranges"] == "bytes"
    assert first.headers["Cache-Control"] == "private, no-cache"

    # A browser revalidates with both validators.
    again = fetch(port, url, If_None_Match=etag, If_Modified_Since=first.headers["Last-Modified"])
    assert (again.status, again.body, again.headers["ETag"]) == (304, b"", etag)

    part = fetch(port, url, Range="bytes=1000-1999", If_Range=etag)
    assert part.status == 206 and part.body == DATA[1000:2000]
    assert part.headers["Content-Range"] == f"bytes 1000-1999/{size}"
    assert part.headers["Content-Length"] == "1000"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"If_None_Match": "{etag}"}, 304),
        ({"If_None_Match": 'W/"x", W/{etag}'}, 304),  # weak comparison, a list
        ({"If_None_Match": "*"}, 304),
        ({"If_None_Match": '"other"'}, 200),
        ({"If_None_Match": '"other"', "If_Modified_Since": "{date}"}, 200),  # INM wins
        ({"If_Modified_Since": "{date}"}, 304),
        ({"If_Modified_Since": "{later}"}, 304),
        ({"If_Modified_Since": "Sun, 06 Nov 1994 08:49:37 GMT"}, 200),
        ({"If_Modified_Since": "Sun, 06 Nov 1994 08:49:37 -0000"}, 200),
        ({"If_Modified_Since": "not a date"}, 200),
    ],
)
def test_conditional_requests(region, serve, headers, status):
    store(region, "chart|1", DATA)
    files = CacheFileApp(region)
    port = serve(files)
    etag, created, _ = cached(region, "chart|1")
    values = {
        "etag": etag,
        "date": email.utils.formatdate(int(created), usegmt=True),
        "later": email.utils.formatdate(int(created) + 60, usegmt=True),
    }
    headers = {name: value.format(**values) for name, value in headers.items()}
    reply = fetch(port, files.url_for("chart|1"), **headers)
    assert reply.status == status
    assert reply.body == (DATA if status == 200 else b"")
    assert reply.headers["ETag"] == etag


@pytest.mark.parametrize(
    ("range_header", "status", "expected"),
    [
        ("bytes=0-0", 206, (0, 1)),
        ("bytes=10-19", 206, (10, 20)),
        ("bytes=10000-", 206, (10000, 10240)),
        ("bytes=10000-99999", 206, (10000, 10240)),  # clipped to the end
        ("bytes=-100", 206, (10140, 10240)),
        ("bytes=-99999", 206, (0, 10240)),
        ("BYTES = 5 - 6", 206, (5, 7)),
        ("bytes=10240-", 416, None),
        ("bytes=-0", 416, None),
        ("bytes=0-1,5-6", 200, (0, 10240)),  # several ranges: the whole file
        ("bytes=9-1", 200, (0, 10240)),  # invalid: ignored
        ("bytes=-", 200, (0, 10240)),
        ("items=0-1", 200, (0, 10240)),
        (f"bytes={'9' * 30}-", 200, (0, 10240)),
    ],
)
def test_ranges(region, serve, range_header, status, expected):
    store(region, "chart|1", DATA)
    files = CacheFileApp(region)
    port = serve(files)
    reply = fetch(port, files.url_for("chart|1"), Range=range_header)
    assert reply.status == status
    if status == 416:
        assert reply.body == b""
        assert reply.headers["Content-Range"] == f"bytes */{len(DATA)}"
        return
    start, stop = expected
    assert reply.body == DATA[start:stop]
    assert reply.headers["Content-Length"] == str(stop - start)
    if status == 206:
        assert reply.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{len(DATA)}"


def test_if_range_sends_whole_file_when_the_version_changed(region, serve):
    store(region, "chart|1", DATA)
    files = CacheFileApp(region)
    port = serve(files)
    url = files.url_for("chart|1")
    etag, created, _ = cached(region, "chart|1")
    date = email.utils.formatdate(int(created), usegmt=True)
    assert fetch(port, url, Range="bytes=0-9", If_Range=date).status == 206
    for stale in ('"0123"', f"W/{etag}", "Sun, 06 Nov 1994 08:49:37 GMT"):
        reply = fetch(port, url, Range="bytes=0-9", If_Range=stale)
        assert (reply.status, reply.body) == (200, DATA)


def test_head_and_methods(region, serve):
    store(region, "chart|1", DATA)
    files = CacheFileApp(region)
    port = serve(files)
    url = files.url_for("chart|1")
    head = fetch(port, url, "HEAD", Range="bytes=0-9")  # Range applies to GET only
    assert (head.status, head.body) == (200, b"")
    assert head.headers["Content-Length"] == str(len(DATA))
    assert head.headers["Content-Type"] == "image/png"
    post = fetch(port, url, "POST")
    assert post.status == 405 and post.headers["Allow"] == "GET, HEAD"
    assert fetch(port, "/nothing", "HEAD").status == 404


def test_empty_file(region, serve):
    store(region, "empty", b"", filename=None)
    files = CacheFileApp(region)
    port = serve(files)
    url = files.url_for("empty")
    reply = fetch(port, url)
    assert (reply.status, reply.body, reply.headers["Content-Length"]) == (200, b"", "0")
    assert reply.headers["Content-Type"] == "application/octet-stream"
    assert reply.headers["Content-Disposition"] is None
    assert fetch(port, url, Range="bytes=0-").status == 416


def test_header_values_from_the_caller_are_made_safe(region, serve):
    region.set(
        "odd",
        CachedFile(
            io.BytesIO(b"x"),
            filename='r\u00e9sum\u00e9 "final"\r\nX-Evil: 1.pdf',
            content_type="text/html\r\nX-Evil: 1",
        ),
    )
    files = CacheFileApp(region)
    reply = fetch(serve(files), files.url_for("odd"))
    assert reply.status == 200 and reply.headers["X-Evil"] is None
    assert reply.headers["Content-Type"] == "application/octet-stream"
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
    assert reply.headers["Content-Disposition"] == (
        "inline; filename=\"r?sum? _final_X-Evil: 1.pdf\"; filename*=UTF-8''"
        "r%C3%A9sum%C3%A9%20%22final%22X-Evil%3A%201.pdf"
    )


# -- URLs --------------------------------------------------------------------------


def test_urls_are_unguessable_and_change_on_rewrite(region, serve):
    store(region, "chart|1", DATA)
    files = CacheFileApp(region, prefix="/files")
    port = serve(files)
    url = files.url_for("chart|1")
    digest = key_digest(encode_key("chart|1"))
    etag = cached(region, "chart|1")[0]
    assert url == f"/files/{digest}/{etag.strip(chr(34))}"
    path = url.removeprefix("/files")
    assert fetch(port, path).status == 200

    # Knowing the key (hence its digest) is not enough; the key itself is never accepted.
    for probe in (
        f"/{digest}",
        f"/{digest}/",
        f"/{digest}/0000000000000000",
        f"/{digest}/{etag.strip(chr(34))}/x",
        "/chart|1",
        "/chart%7C1",
        f"/{digest.upper()}/{etag.strip(chr(34))}",
        f"/../{digest}/{etag.strip(chr(34))}",
    ):
        assert fetch(port, probe).status == 404, probe

    store(region, "chart|1", DATA[::-1])
    new_url = files.url_for("chart|1")
    assert new_url != url
    assert fetch(port, path).status == 404  # the old version is gone
    assert fetch(port, new_url.removeprefix("/files")).body == DATA[::-1]

    region.delete("chart|1")
    assert files.url_for("chart|1") is None
    assert fetch(port, new_url.removeprefix("/files")).status == 404


def test_a_hit_through_the_app_is_a_use(region, serve):
    store(region, "chart|1", DATA)
    backend = region.actual_backend
    files = CacheFileApp(region)
    port = serve(files)
    url = files.url_for("chart|1")
    entry = backend.store.layout.entry_path(key_digest(encode_key("chart|1")))
    os.utime(entry, (1_000_000_000, 1_000_000_000))  # "last used" in 2001
    hits = backend.stats()["hits"]
    assert fetch(port, url, If_None_Match=cached(region, "chart|1")[0]).status == 304
    assert backend.stats()["hits"] == hits + 2  # cached() plus the request
    os.utime(entry, (1_000_000_000, 1_000_000_000))
    assert fetch(port, url).status == 200
    assert os.stat(entry).st_mtime > 1_000_000_000


def test_a_read_only_cache_is_served_without_changing_it(region, raw_region, serve, cache_dir):
    """A cache prepared elsewhere, served with read_only=True: whole files, ranges and
    304s, and the tree (atimes included) stays exactly as it was."""
    store(region, "chart|1", DATA)
    files = CacheFileApp(raw_region(read_only=True))
    port = serve(files)
    url = files.url_for("chart|1")
    before = faultkit.tree_state(cache_dir)
    whole = fetch(port, url)
    assert (whole.status, whole.body) == (200, DATA)
    assert fetch(port, url, Range="bytes=10-19").body == DATA[10:20]
    assert fetch(port, url, If_None_Match=whole.headers["ETag"]).status == 304
    assert fetch(port, files.url_for("not cached")).status == 404
    assert faultkit.tree_state(cache_dir) == before


def test_region_invalidation_and_expiration_apply(raw_region, serve):
    region = raw_region()
    store(region, "chart|1", DATA)
    files = CacheFileApp(region)
    port = serve(files)
    url = files.url_for("chart|1")
    assert fetch(port, url).status == 200
    region.invalidate()
    assert files.url_for("chart|1") is None
    assert fetch(port, url).status == 404

    # Through the backend there is no region to consult: the file is served.
    backend_files = CacheFileApp(region.actual_backend)
    assert backend_files.url_for("chart|1") == url
    assert fetch(serve(backend_files), url).status == 200

    expiring = make_region(key_mangler=str.upper).configure(
        "dogpile_fsbackend.raw",
        expiration_time=3600,
        arguments={"base_dir": region.actual_backend.settings.base_dir},
    )
    expiring_files = CacheFileApp(expiring)
    hours_ago = time.time() - 7200  # written two hours ago, as far as the region can tell
    expiring.actual_backend.set("OLD", CachedValue(io.BytesIO(DATA), {"ct": hours_ago, "v": 2}))
    assert expiring_files.url_for("old") is None  # the mangler applies, the value is stale
    stale_url = CacheFileApp(expiring.actual_backend).url_for("OLD")
    port = serve(expiring_files)
    assert fetch(port, stale_url).status == 404
    expiring.set("old", CachedFile(io.BytesIO(DATA)))
    fresh_url = expiring_files.url_for("old")
    assert fresh_url != stale_url and fetch(port, fresh_url).body == DATA


def test_get_by_digest(region):
    store(region, "a", DATA)
    backend: RawFSBackend = region.actual_backend
    digest = key_digest(encode_key("a"))
    value = backend.get_by_digest(digest)
    with value.payload as reader:
        assert reader.read() == DATA
    for not_a_digest in ("", "../../etc/passwd", digest.upper(), digest + ".0", digest[:-1]):
        assert backend.get_by_digest(not_a_digest) is NO_VALUE

    # An entry file copied under another digest is damaged: a miss, and removed.
    other = key_digest(encode_key("b"))
    os.makedirs(backend.store.layout.entry_dir(other), exist_ok=True)
    shutil.copy(backend.store.layout.entry_path(digest), backend.store.layout.entry_path(other))
    assert backend.get_by_digest(other) is NO_VALUE
    assert not os.path.exists(backend.store.layout.entry_path(other))


def test_only_the_raw_backend_is_accepted(pickled_region):
    with pytest.raises(TypeError, match="raw backend"):
        CacheFileApp(pickled_region())
    with pytest.raises(ValueError, match="prefix"):
        CacheFileApp(make_region(), prefix="files/")


def test_an_unconfigured_region_is_resolved_later(cache_dir, serve):
    region = make_region()
    files = CacheFileApp(region, prefix="/files")
    region.configure("dogpile_fsbackend.raw", arguments={"base_dir": cache_dir})
    store(region, "k", DATA)
    assert fetch(serve(files), files.url_for("k").removeprefix("/files")).body == DATA


# -- mounting and serving by key -----------------------------------------------------


def hello(environ, start_response):
    body = f"{environ['SCRIPT_NAME']}|{environ['PATH_INFO']}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def test_mount_routes_the_prefix(region, serve):
    store(region, "chart|1", DATA)
    seen = []

    class Spy(CacheFileApp):
        def __call__(self, environ, start_response):
            seen.append((environ["SCRIPT_NAME"], environ["PATH_INFO"]))
            return super().__call__(environ, start_response)

    files = Spy(region, prefix="/static/files")
    port = serve(mount(hello, files))
    url = files.url_for("chart|1")
    assert fetch(port, url).body == DATA
    assert seen == [("/static/files", url.removeprefix("/static/files"))]
    assert fetch(port, "/static/filesx/y").body == b"|/static/filesx/y"
    assert fetch(port, "/other").body == b"|/other"
    assert fetch(port, "/static/files/nope").status == 404
    with pytest.raises(ValueError, match="prefix"):
        mount(hello, CacheFileApp(region))


def test_serve_lets_an_application_choose_its_own_urls(region, serve):
    """An app that wants key URLs (here: public reports by number) uses ``serve``."""
    store(region, "report|7", DATA)
    files = CacheFileApp(region)

    def reports(environ, start_response):
        number = environ["PATH_INFO"].strip("/")
        reader = region.get(f"report|{int(number)}") if number.isdigit() else NO_VALUE
        if reader is NO_VALUE:
            start_response("404 Not Found", [("Content-Length", "0")])
            return []
        return files.serve(reader, environ, start_response)

    port = serve(reports)
    assert fetch(port, "/7").body == DATA
    assert fetch(port, "/7", Range="bytes=-1").body == DATA[-1:]
    assert fetch(port, "/8").status == 404


def _creators(directory: str):
    """What raw creators return: the first call of a cached function gets this back."""

    def temporary(data):
        out = tempfile.NamedTemporaryFile(dir=directory, suffix=".pdf")  # noqa: SIM115
        out.write(data)
        out.seek(0)
        return out

    def plain(data):
        path = os.path.join(directory, f"plain-{len(data)}.pdf")
        with open(path, "wb") as out:
            out.write(data)
        return open(path, "rb")

    def wrapped(data):
        return CachedFile(temporary(data), filename="report.pdf")

    return {"named_temporary_file": temporary, "open_rb": plain, "cached_file": wrapped}


@pytest.mark.parametrize("movable", [True, False], ids=["movable", "copied"])
@pytest.mark.parametrize("kind", ["named_temporary_file", "open_rb", "cached_file"])
def test_serve_takes_the_creators_own_file_on_the_first_call(
    raw_region, cache_dir, serve, kind, movable
):
    region = raw_region(file_movable=movable)
    os.makedirs(cache_dir, exist_ok=True)
    create = _creators(cache_dir)[kind]
    files = CacheFileApp(region)
    firsts = []

    @region.cache_on_arguments()
    def report(number):
        return create(DATA[: 1000 * number])

    def reports(environ, start_response):
        value = report(int(environ["PATH_INFO"].strip("/")))
        firsts.append(not isinstance(getattr(value, "fileobj", value), CachedFileReader))
        return files.serve(value, environ, start_response)

    port = serve(reports)
    for path in ("/7", "/7", "/8", "/8"):
        size = 1000 * int(path[1:])
        whole = fetch(port, path)
        assert (whole.status, whole.body) == (200, DATA[:size])
        assert whole.headers["Content-Length"] == str(size)
        assert whole.headers["Content-Type"] == "application/pdf"
        assert whole.headers["Accept-Ranges"] == "bytes"
        part = fetch(port, path, Range="bytes=100-199")
        assert (part.status, part.body) == (206, DATA[100:200])
        assert part.headers["Content-Range"] == f"bytes 100-199/{size}"
        again = fetch(port, path, If_None_Match=part.headers["ETag"])
        assert again.status == 304
    assert firsts.count(True) == 2  # one creator's file for each report, then cached ones
    if kind == "cached_file":
        assert 'filename="report.pdf"' in whole.headers["Content-Disposition"]


def test_serve_refuses_what_is_not_an_open_binary_regular_file(region, tmp_path):
    files = CacheFileApp(region)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}
    path = tmp_path / "text.txt"
    path.write_text("text")
    read_end, write_end = os.pipe()
    with open(path) as text, os.fdopen(read_end, "rb") as pipe, os.fdopen(write_end, "wb"):
        for value, said in (
            (io.BytesIO(DATA), "got BytesIO"),
            (b"bytes", "got bytes"),
            (text, "got a text file"),
            (pipe, "got a file that is not a regular file"),
        ):
            with pytest.raises(TypeError) as info:
                files.serve(value, environ, lambda status, headers: None)
            assert "serve() takes a cached raw value (CachedFileReader) or an open binary" in str(
                info.value
            )
            assert said in str(info.value)
    closed = open(path, "rb")  # noqa: SIM115
    closed.close()
    with pytest.raises(ValueError, match="closed file"):
        files.serve(closed, environ, lambda status, headers: None)


# -- sendfile ---------------------------------------------------------------------------


def test_file_wrapper_lets_the_server_use_sendfile(region):
    store(region, "chart|1", DATA)
    files = CacheFileApp(region)
    url = files.url_for("chart|1")
    with running(files, handler_class=SendfileRequestHandler) as server:
        port = server.server_port
        assert fetch(port, url).body == DATA
        assert fetch(port, url, Range="bytes=4000-").body == DATA[4000:]
        assert fetch(port, url, Range="bytes=-10").body == DATA[-10:]
        # A range that stops short of the end is read in chunks: a server might
        # send the file to its end, whatever Content-Length says.
        assert fetch(port, url, Range="bytes=10-19").body == DATA[10:20]
        assert fetch(port, url, "HEAD").body == b""
    size = len(DATA)
    assert server.sendfile_calls == [(0, size), (4000, size - 4000), (size - 10, 10)]


# -- the README example ---------------------------------------------------------------


def png(width: int, height: int, shade: int) -> bytes:
    """A grey-gradient PNG, standard library only."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows = b"".join(
        b"\x00" + bytes((x * shade // max(width, 1)) % 256 for x in range(width))
        for _ in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return PNG + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


class Charts(NamedTuple):
    """The README example's region, app, memoized chart function and its key function."""

    region: object
    files: CacheFileApp
    chart: object
    chart_key: object
    renders: list[int]


def readme_charts(cache_dir: str, width: int, height: int) -> Charts:
    renders = []
    charts = make_region().configure(
        "dogpile_fsbackend.raw",
        arguments={"base_dir": cache_dir, "file_movable": True, "cache_size": "1GiB"},
    )

    @charts.cache_on_arguments()
    def chart(shade: int) -> CachedFile:
        renders.append(shade)
        out = tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".png")  # noqa: SIM115
        out.write(png(width, height, shade))
        out.seek(0)
        return CachedFile(out, filename=f"chart-{shade}.png")

    files = CacheFileApp(charts, prefix="/files")
    return Charts(charts, files, chart, charts.function_key_generator(None, chart), renders)


def test_readme_example(cache_dir, serve):
    _, files, chart, chart_key, renders = readme_charts(cache_dir, 64, 48)

    def site(environ, start_response):
        match = re.fullmatch(r"/chart/(\d+)", environ["PATH_INFO"])
        if match is None:
            start_response("404 Not Found", [("Content-Length", "0")])
            return []
        shade = int(match.group(1))
        chart(shade).close()  # make sure it is cached
        start_response("303 See Other", [("Location", files.url_for(chart_key(shade)))])
        return []

    port = serve(mount(site, files))
    first = fetch(port, "/chart/5")
    assert first.status == 303
    image = fetch(port, first.headers["Location"])
    assert image.status == 200 and image.body == png(64, 48, 5)
    assert image.headers["Content-Type"] == "image/png"
    assert fetch(port, "/chart/5").headers["Location"] == first.headers["Location"]
    assert (
        fetch(port, first.headers["Location"], If_None_Match=image.headers["ETag"]).status == 304
    )
    assert renders == [5]
    assert not [name for name in os.listdir(cache_dir) if name.endswith(".png")]  # moved in


def test_readme_flask_example(cache_dir, serve):
    """The README's Flask recipe, verbatim, behind a real HTTP server."""
    from flask import Flask, abort, redirect, request, send_file
    from werkzeug.exceptions import RequestedRangeNotSatisfiable

    charts, files, chart, chart_key, renders = readme_charts(cache_dir, 640, 480)

    # -- from the README --
    app = Flask(__name__)
    app.wsgi_app = mount(app.wsgi_app, files)  # /files/... as above

    @app.route("/chart/<int:shade>")
    def chart_page(shade):
        chart(shade).close()
        return redirect(request.script_root + files.url_for(chart_key(shade)))

    def send_cached(reader):
        """send_file for a CachedFileReader, with Content-Length, Range and 304."""
        reader.seek(0)  # a reader starts where the creator left its file
        response = send_file(
            reader,
            mimetype=reader.content_type or "application/octet-stream",
            download_name=reader.filename,
            etag=reader.etag.strip('"'),
            last_modified=reader.last_modified,
            conditional=False,
        )
        response.content_length = reader.content_length
        try:
            return response.make_conditional(
                request, accept_ranges=True, complete_length=reader.content_length
            )
        except RequestedRangeNotSatisfiable:  # Flask answers 416
            reader.close()
            raise

    @app.route("/chart/<int:shade>.png")
    def chart_png(shade):
        chart(shade).close()  # cached now (the first call returns the creator's own file)
        reader = charts.get(chart_key(shade))
        if reader is NO_VALUE:  # evicted or cleared in between
            abort(404)
        return send_cached(reader)

    # -- end of the README's code --
    port = serve(app)
    image = png(640, 480, 5)
    whole = fetch(port, "/chart/5.png")
    assert (whole.status, whole.body) == (200, image)
    assert whole.headers["Content-Length"] == str(len(image))
    assert "Transfer-Encoding" not in whole.headers
    assert whole.headers["Content-Type"] == "image/png"
    assert whole.headers["Accept-Ranges"] == "bytes"
    assert whole.headers["Content-Disposition"] == "inline; filename=chart-5.png"
    etag = whole.headers["ETag"]
    with charts.get(chart_key(5)) as reader:
        assert etag == reader.etag
    part = fetch(port, "/chart/5.png", Range="bytes=100-1099")
    assert (part.status, part.body) == (206, image[100:1100])
    assert part.headers["Content-Length"] == "1000"
    assert part.headers["Content-Range"] == f"bytes 100-1099/{len(image)}"
    tail = fetch(port, "/chart/5.png", Range="bytes=-10")
    assert (tail.status, tail.body) == (206, image[-10:])
    resumed = fetch(port, "/chart/5.png", Range="bytes=1000-", If_Range=etag)
    assert (resumed.status, resumed.body) == (206, image[1000:])
    assert fetch(port, "/chart/5.png", If_None_Match=etag).status == 304
    assert fetch(port, "/chart/5.png", Range=f"bytes={len(image)}-").status == 416
    assert fetch(port, "/chart/5.png", "HEAD").headers["Content-Length"] == str(len(image))
    redirected = fetch(port, "/chart/6")
    assert redirected.status == 302
    location = redirected.headers["Location"].removeprefix(f"http://127.0.0.1:{port}")
    assert fetch(port, location).body == png(640, 480, 6)
    assert renders == [5, 6]


# -- a 1 GiB file with flat memory ---------------------------------------------------------

BIG_BLOCKS = 1024  # of 1 MiB


def block(base: bytes, index: int) -> bytes:
    return index.to_bytes(8, "big") + base[8:]


def expected_bytes(base: bytes, start: int, stop: int) -> bytes:
    blocks = b"".join(block(base, i) for i in range(start // MiB, (stop - 1) // MiB + 1))
    offset = start // MiB * MiB
    return blocks[start - offset : stop - offset]


def kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


def serve_in_child(cache_dir: str, ready, stop, results) -> None:
    region = make_region().configure(
        "dogpile_fsbackend.raw", arguments={"base_dir": cache_dir, "cache_size": "2GiB"}
    )
    with running(CacheFileApp(region)) as server:
        ready.put((server.server_port, kib("VmRSS"), kib("VmHWM")))
        stop.wait(WAIT)
    results.put(kib("VmHWM"))


def test_1gib_file_with_flat_memory(raw_region, cache_dir):
    region = raw_region(cache_size="2GiB", file_movable=True)
    size = BIG_BLOCKS * MiB
    base = os.urandom(MiB)
    whole = hashlib.sha256()
    try:
        path = os.path.join(cache_dir, "video.mp4")
        with open(path, "wb") as out:
            for index in range(BIG_BLOCKS):
                data = block(base, index)
                out.write(data)
                whole.update(data)
        with open(path, "rb") as video:
            region.set("video|1", video)
        url = CacheFileApp(region).url_for("video|1")

        ready, results, stop = SPAWN.Queue(), SPAWN.Queue(), SPAWN.Event()
        child = SPAWN.Process(target=serve_in_child, args=(cache_dir, ready, stop, results))
        child.start()
        try:
            port, rss_before, hwm_before = ready.get(timeout=WAIT)

            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
            try:
                connection.request("GET", url)
                response = connection.getresponse()
                assert response.status == 200
                assert response.headers["Content-Type"] == "video/mp4"
                assert response.headers["Content-Length"] == str(size)
                etag = response.headers["ETag"]
                received, got = 0, hashlib.sha256()
                while chunk := response.read(MiB):
                    received += len(chunk)
                    got.update(chunk)
            finally:
                connection.close()
            assert received == size and got.digest() == whole.digest()

            assert fetch(port, url, If_None_Match=etag).status == 304
            start = 700 * MiB + 12345
            part = fetch(port, url, Range=f"bytes={start}-{start + 3 * MiB - 1}")
            assert part.status == 206
            assert part.body == expected_bytes(base, start, start + 3 * MiB)
            tail = fetch(port, url, Range="bytes=-1000")
            assert tail.body == expected_bytes(base, size - 1000, size)

            stop.set()
            hwm_after = results.get(timeout=WAIT)
            child.join(WAIT)
            assert child.exitcode == 0
        finally:
            if child.is_alive():
                child.kill()
                child.join(WAIT)
        growth = (hwm_after - rss_before) * 1024
        print(
            f"\nserver child: RSS {rss_before / 1024:.1f} MiB before, peak "
            f"{hwm_before / 1024:.1f} MiB before / {hwm_after / 1024:.1f} MiB after "
            f"serving 1 GiB + 304 + ranges: growth {growth / MiB:.1f} MiB"
        )
        assert growth < 100 * MiB
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)  # pytest keeps recent tmp dirs
