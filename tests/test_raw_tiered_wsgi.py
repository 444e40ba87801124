"""CacheFileApp over raw_tiered: presigned redirects, fetched with plain HTTP clients.

The app runs in a real wsgiref server; the presigned URLs it redirects to are
fetched from moto's S3 server with urllib and http.client, Range requests
included.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import urllib.parse
import urllib.request

import pytest
import s3kit
from dogpile.cache.api import NO_VALUE
from test_wsgi import fetch, running

from dogpile_fsbackend import CachedFile, CacheFileApp, ConfigError
from dogpile_fsbackend.layout import encode_key, key_digest

MiB = s3kit.MiB
DATA = os.urandom(2 * MiB + 123)


@pytest.fixture
def serve():
    """``serve(app)`` starts a server for the rest of the test and returns its port."""
    with contextlib.ExitStack() as stack:
        yield lambda app: stack.enter_context(running(app)).server_port


@pytest.fixture
def tiers(s3, redis_url, tmp_path):
    def make(name: str = "a", **top):
        return s3kit.region(s3.s3_arguments, str(tmp_path / name), redis_url, **top)

    return make


@pytest.fixture
def stored(tiers):
    """Host a holds "video|1" (and so does the bucket); host b does not."""
    a = tiers("a")
    a.set("video|1", CachedFile(io.BytesIO(DATA), filename="clip é.mp4"))
    return a, tiers("b")


def get(url: str, **headers: str) -> tuple[int, http.client.HTTPMessage, bytes]:
    """A plain urllib GET (following no redirect of ours: the URL is the bucket's)."""
    request = urllib.request.Request(
        url, headers={k.replace("_", "-"): v for k, v in headers.items()}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, response.headers, response.read()


def test_presign_redirects_a_file_that_is_not_on_this_host(stored, s3, serve):
    a, b = stored
    app = CacheFileApp(b, prefix="", presign=True, expires_in=600, cache_control="private")
    port = serve(app)
    url = CacheFileApp(a).url_for("video|1")  # made on host a, followed on host b
    answer = fetch(port, url)
    assert answer.status == 307
    assert answer.headers["Cache-Control"] == "no-store"
    location = answer.headers["Location"]
    assert location.startswith(s3.endpoint_url) and "X-Amz-Signature=" in location
    assert "X-Amz-Expires=600" in location
    assert b.backend.stats()["entries"] == 0  # host b downloaded nothing

    status, headers, body = get(location)
    assert (status, body) == (200, DATA)
    assert headers["Content-Type"] == "video/mp4"
    assert headers["Content-Disposition"] == (
        "inline; filename=\"clip ?.mp4\"; filename*=UTF-8''clip%20%C3%A9.mp4"
    )
    assert headers["Cache-Control"] == "private"  # the app's, signed into the URL
    status, headers, body = get(location, Range="bytes=1048576-1048675")
    assert (status, body) == (206, DATA[MiB : MiB + 100])
    assert headers["Content-Range"] == f"bytes 1048576-1048675/{len(DATA)}"
    status, _, body = get(location, Range="bytes=-10")
    assert (status, body) == (206, DATA[-10:])

    head = fetch(port, url, "HEAD")  # a HEAD gets a URL signed for HEAD
    assert head.status == 307
    parts = urllib.parse.urlsplit(head.headers["Location"])
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.request("HEAD", f"{parts.path}?{parts.query}")
        response = connection.getresponse()
        response.read()
        assert response.status == 200
        assert response.headers["Content-Length"] == str(len(DATA))
    finally:
        connection.close()


def test_presign_serves_a_file_that_is_on_this_host_itself(stored, serve):
    a, _ = stored
    app = CacheFileApp(a, presign=True)
    port = serve(app)
    answer = fetch(port, app.url_for("video|1"), Range="bytes=0-9")
    assert (answer.status, answer.body) == (206, DATA[:10])


def test_presign_always_redirects_every_request(stored, serve):
    a, _ = stored
    app = CacheFileApp(a, presign="always", cache_control=None)
    port = serve(app)
    answer = fetch(port, app.url_for("video|1"))
    assert answer.status == 307
    assert "response-cache-control" not in answer.headers["Location"]
    assert get(answer.headers["Location"])[2] == DATA


def test_url_for_with_presign_never_downloads(stored):
    a, b = stored
    url = CacheFileApp(b, presign=True).url_for("video|1")
    assert url == CacheFileApp(a).url_for("video|1")
    assert b.backend.stats()["entries"] == 0
    assert CacheFileApp(b, presign=True).url_for("nothing") is None


def test_without_presign_the_app_fills_the_local_copy_and_serves_it(stored, serve):
    a, b = stored
    port = serve(CacheFileApp(b))
    url = CacheFileApp(a).url_for("video|1")
    answer = fetch(port, url)
    assert (answer.status, answer.body) == (200, DATA)
    assert answer.headers["ETag"] == a.get("video|1").etag
    assert b.backend.stats()["entries"] == 1  # filled, then served from the local copy
    assert fetch(port, url, Range="bytes=5-9").body == DATA[5:10]
    assert b.backend.stats()["remote_hits"] == 1


def test_a_url_of_a_newer_write_on_another_host_is_fetched(stored, serve):
    a, b = stored
    b.get("video|1").close()  # host b has the first write
    a.set("video|1", CachedFile(io.BytesIO(b"second write"), filename="v2.mp4"))
    url = CacheFileApp(a).url_for("video|1")
    answer = fetch(serve(CacheFileApp(b)), url)
    assert (answer.status, answer.body) == (200, b"second write")


@pytest.mark.parametrize("presign", [False, True, "always"])
def test_old_urls_deleted_and_invalidated_entries_are_404(tiers, serve, presign):
    a = tiers("a", expiration_time=3600)
    b = tiers("b", expiration_time=3600)
    a.set("k", io.BytesIO(b"one"))
    old = CacheFileApp(a).url_for("k")
    a.set("k", io.BytesIO(b"two"))
    new = CacheFileApp(a).url_for("k")
    port = serve(CacheFileApp(b, presign=presign))
    assert fetch(port, old).status == 404
    assert fetch(port, new).status in (200, 307)
    assert fetch(port, old).status == 404  # also once host b holds the new write
    b.invalidate()  # as region.get would not return it, the app does not serve it
    assert fetch(port, new).status == 404
    assert CacheFileApp(b, presign=presign).url_for("k") is None
    a.delete("k")
    assert fetch(serve(CacheFileApp(tiers("c"), presign=presign)), new).status == 404


def test_presign_arguments_are_checked(tiers, raw_region):
    with pytest.raises(ValueError, match="raw_tiered"):
        CacheFileApp(raw_region(), presign=True)
    with pytest.raises(ValueError, match="presign must be"):
        CacheFileApp(tiers(), presign="sometimes")
    with pytest.raises(ConfigError, match="expires_in"):
        CacheFileApp(tiers(), presign=True, expires_in=8 * 86400)


def test_a_malformed_digest_never_reaches_the_bucket(tiers, serve):
    b = tiers("b")
    port = serve(CacheFileApp(b, presign=True))
    assert fetch(port, f"/{'A' * 64}/abc").status == 404
    digest = key_digest(encode_key("missing"))
    assert fetch(port, f"/{digest}/abc").status == 404
    assert b.backend.describe_remote("not-a-digest") is None
    assert b.backend.get_by_digest("not-a-digest") is NO_VALUE
