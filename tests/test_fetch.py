"""URL fetching: limits, time-outs, redirects and the private-address guard, against real servers."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import quote, unquote

import pytest

from imgsim.data.fetch import FetchError, fetch_url, resolve

AMBIGUOUS = "http://127.0.0.1:18777\\@evil/"


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
        elif self.path.startswith("/redirect-to?"):
            self.send_response(302)
            self.send_header("Location", unquote(self.path.split("?", 1)[1]))
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
    with pytest.raises(FetchError, match="127.0.0.1 \\(loopback\\), not a public address") as e:
        fetch_url(f"{server}/ok")
    assert e.value.status == 400


# One address in each range that must not be fetched from, and what the refusal names.
REFUSED = [
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),
    ("127.0.0.2", "loopback"),
    ("0.0.0.0", "unspecified"),
    ("100.64.0.1", "shared address space"),
    ("100.100.100.200", "shared address space"),  # a cloud metadata address
    ("198.18.0.1", "private"),
    ("192.0.2.1", "private"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "private"),
    ("255.255.255.255", "private"),
    ("[::1]", "loopback"),
    ("[::]", "unspecified"),
    ("[fe80::1]", "link-local"),
    ("[fc00::1]", "private"),
    ("[fd12:3456::1]", "private"),
    ("[fec0::1]", "site-local"),
    ("[ff0e::1]", "multicast"),
    ("[2001:db8::1]", "private"),
    ("[::10.0.0.1]", "reserved"),  # deprecated IPv4-compatible form
    ("[::ffff:127.0.0.1]", "IPv4-mapped for 127.0.0.1, loopback"),
    ("[::ffff:169.254.169.254]", "IPv4-mapped for 169.254.169.254, link-local"),
    ("[::ffff:100.64.0.1]", "IPv4-mapped for 100.64.0.1, shared"),
    ("[2002:a00:1::]", "6to4 for 10.0.0.1, private"),
    ("[2002:7f00:1::1]", "6to4 for 127.0.0.1, loopback"),
    ("[2002:a9fe:a9fe::]", "6to4 for 169.254.169.254, link-local"),
    ("[2002:6440:1::]", "6to4 for 100.64.0.1, shared"),
    ("[64:ff9b::a00:1]", "NAT64 for 10.0.0.1, private"),
    ("[64:ff9b::7f00:1]", "NAT64 for 127.0.0.1, loopback"),
    ("[64:ff9b::6440:1]", "NAT64 for 100.64.0.1, shared"),
    ("[64:ff9b:1::808:808]", "NAT64 for local use"),
    ("[2001:0:4136:e378:8000:63bf:f5ff:fffe]", "Teredo for 10.0.0.1, private"),
    ("[2001:0:4136:e378:8000:63bf:f7f6:fbf7]", "Teredo tunnel"),  # client 8.9.4.8: still refused
]


@pytest.mark.parametrize(("host", "reason"), REFUSED)
def test_non_global_addresses_refused(host: str, reason: str) -> None:
    with pytest.raises(FetchError) as e:
        fetch_url(f"http://{host}/x.png", timeout_s=1)
    message = str(e.value)
    assert e.value.status == 400 and "\n" not in message
    assert "refusing to fetch from" in message and "not a public address" in message
    assert reason in message


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1", "64:ff9b::808:808"]
)
def test_global_addresses_pass(address: str) -> None:
    """Wrapping a public IPv4 address is no reason to refuse it (literals: no DNS, no connection)."""
    assert resolve(address, 80, allow_private=False) == address


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every DNS lookup made, recorded (and answered as usual)."""
    calls: list[tuple] = []
    real = socket.getaddrinfo

    def recording(*args: object, **kwargs: object) -> object:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording)
    return calls


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (AMBIGUOUS, "backslash"),
        ("http://evil\\.example.com/x.png", "backslash"),
        ("http://127.0.0.1/a\\b.png", "backslash"),
        ("http://user@evil.example/x.png", "user@host"),
        ("http://user:pw@127.0.0.1/x.png", "user@host"),
        ("http://127.0.0.1:80@evil.example/", "user@host"),
        ("http://@/x.png", "user@host"),
        ("http:///x.png", "no host"),
        ("http://:80/x.png", "no host"),
        ("gopher://127.0.0.1/x", "only http and https"),
        ("ftp://evil.example/x", "only http and https"),
        ("http://[::1/x", "Invalid IPv6 URL"),
        ("http://evil.example:99999/", "Port out of range"),
    ],
)
def test_ambiguous_authority_refused_before_any_lookup(url: str, reason: str, lookups: list[tuple]) -> None:
    for allow_private in (False, True):  # ambiguity is refused even where private addresses are allowed
        with pytest.raises(FetchError, match="^[^\n]*$") as e:
            fetch_url(url, timeout_s=1, allow_private=allow_private)
        assert reason in str(e.value) and e.value.status == 400
    assert lookups == []


def test_lookups_fixture_sees_lookups(lookups: list[tuple]) -> None:
    """The fixture above records real lookups, so its `== []` proves there were none."""
    with pytest.raises(FetchError):
        fetch_url("http://[::1]/x.png", timeout_s=1)
    assert lookups and lookups[0][0] == "::1"


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        (AMBIGUOUS, "backslash"),
        ("http://user@evil.example/x.png", "user@host"),
        ("file:///etc/passwd", "only http and https"),
    ],
)
def test_redirects_are_checked_again(server: str, location: str, reason: str, lookups: list[tuple]) -> None:
    with pytest.raises(FetchError, match=reason):
        fetch_url(f"{server}/redirect-to?{quote(location, safe='')}", allow_private=True)
    assert {call[0] for call in lookups} == {"127.0.0.1"}  # the first hop only (resolve, then connect)


def test_redirect_to_a_private_address_refused(
    server: str, monkeypatch: pytest.MonkeyPatch, lookups: list[tuple]
) -> None:
    """A public server that redirects inside: DNS answers a public address for "public.example" and
    the route to it leads to the test server, so only the second hop is private."""
    local_port = int(server.rsplit(":", 1)[1])
    public = socket.getaddrinfo("8.8.8.8", local_port, type=socket.SOCK_STREAM)
    real_lookup, real_connect = socket.getaddrinfo, socket.create_connection
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        lambda host, *a, **k: public if host == "public.example" else real_lookup(host, *a, **k),
    )
    monkeypatch.setattr(
        socket,
        "create_connection",
        lambda address, *a, **k: real_connect(
            ("127.0.0.1", local_port) if address[0] == "8.8.8.8" else address, *a, **k
        ),
    )
    start = f"http://public.example:{local_port}"
    assert fetch_url(f"{start}/ok") == b"x" * 1000  # the simulated public server answers
    with pytest.raises(FetchError, match="resolves to 169.254.169.254 \\(link-local\\)") as e:
        fetch_url(f"{start}/redirect-to?{quote('http://169.254.169.254/latest/meta-data', safe='')}")
    assert e.value.status == 400
    with pytest.raises(FetchError, match="resolves to 127.0.0.1 \\(loopback\\)"):
        fetch_url(f"{start}/redirect-to?{quote(server + '/ok', safe='')}")
