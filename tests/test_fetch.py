"""URL fetching: limits, time-outs, redirects and the private-address guard, against real servers."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator

import pytest

from imgsim.data.fetch import FetchError, fetch_url


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/ok":
            self._send(b"x" * 1000)
        elif self.path == "/big":
            self._send(b"x" * 50_000)
        elif self.path == "/big-no-length":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * 50_000)
        elif self.path == "/slow":
            time.sleep(2)
            self._send(b"late")
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/ok")
            self.end_headers()
        elif self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_fetch_and_follow_a_redirect(server: str) -> None:
    assert fetch_url(f"{server}/ok", allow_private=True) == b"x" * 1000
    assert fetch_url(f"{server}/redirect", allow_private=True) == b"x" * 1000


def test_loopback_refused_by_default(server: str) -> None:
    with pytest.raises(FetchError, match="private, loopback") as e:
        fetch_url(f"{server}/ok")
    assert e.value.status == 400
    for url in ["http://10.0.0.1/x.png", "http://169.254.169.254/latest/meta-data", "http://[::1]/x"]:
        with pytest.raises(FetchError, match="private, loopback"):
            fetch_url(url, timeout_s=1)


@pytest.mark.parametrize("path", ["/big", "/big-no-length"])
def test_size_cap(server: str, path: str) -> None:
    with pytest.raises(FetchError, match="limit") as e:
        fetch_url(f"{server}{path}", max_bytes=10_000, allow_private=True)
    assert e.value.status == 413


def test_timeout(server: str) -> None:
    started = time.monotonic()
    with pytest.raises(FetchError, match="timed out") as e:
        fetch_url(f"{server}/slow", timeout_s=0.5, allow_private=True)
    assert e.value.status == 504 and time.monotonic() - started < 1.9


def test_bad_urls(server: str) -> None:
    for url, match in [
        ("file:///etc/passwd", "only http and https"),
        ("http://", "no host"),
        (f"{server}/missing", "HTTP 404"),
        (f"{server}/loop", "redirects"),
    ]:
        with pytest.raises(FetchError, match=match):
            fetch_url(url, allow_private=True)
