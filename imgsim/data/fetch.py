"""Fetch a query image from a URL, safely.

http/https only; connect and read time-outs plus an overall deadline; a size cap checked against
Content-Length and enforced while reading; at most a few redirects, each re-checked. Unless
`allow_private` is set, hosts that resolve to private, loopback, link-local, multicast, reserved
or unspecified addresses are refused (server-side request forgery), and the connection is made to
the very address that was checked, so a DNS answer that changes between check and connect
(rebinding) cannot slip through.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from urllib.parse import urljoin, urlsplit

from imgsim.errors import BadQuery

MAX_REDIRECTS = 3
USER_AGENT = "imgsim/0.1 (+image similarity search)"


class FetchError(BadQuery):
    """A URL that could not be fetched; `status` is the HTTP status a server should answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def resolve(host: str, port: int, allow_private: bool) -> str:
    """The address to connect to for `host`; refuses non-public ones unless allowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise FetchError(f"cannot resolve host {host!r}: {e.strerror}", 400) from None
    addresses = [info[4][0] for info in infos]
    if not allow_private:
        for address in addresses:
            if not _is_public(ipaddress.ip_address(address.split("%")[0])):
                raise FetchError(
                    f"refusing to fetch from {host!r}: it resolves to a private, loopback or link-local address "
                    f"({address}); a server operator can allow this with --allow-private-urls",
                    400,
                )
    return addresses[0]


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a fixed IP address, with certificate checks against the original host name."""

    def __init__(self, host: str, ip: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, ip: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)


def fetch_url(
    url: str, *, max_bytes: int = 10 * 1024 * 1024, timeout_s: float = 10.0, allow_private: bool = False
) -> bytes:
    """The body of `url` (following up to 3 redirects); raises `FetchError` with a reason and status."""
    deadline = time.monotonic() + timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise FetchError(f"only http and https URLs are supported, got {parts.scheme or 'none'!r}", 400)
        if not parts.hostname:
            raise FetchError(f"URL has no host: {url!r}", 400)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise FetchError(f"bad port in URL {url!r}", 400) from None
        ip = resolve(parts.hostname, port, allow_private)
        conn_cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        conn = conn_cls(parts.hostname, ip, port, timeout=max(0.1, deadline - time.monotonic()))
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request("GET", target, headers={"User-Agent": USER_AGENT, "Accept": "image/*"})
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise FetchError(f"{url}: redirect without a Location", 502)
                url = urljoin(url, location)
                continue
            if response.status != 200:
                raise FetchError(f"{url}: the server answered HTTP {response.status}", 502)
            length = response.getheader("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise FetchError(
                    f"{url}: image is {int(length):,} bytes, over the {max_bytes:,}-byte limit", 413
                )
            chunks, total = [], 0
            while chunk := response.read(65536):
                total += len(chunk)
                if total > max_bytes:
                    raise FetchError(f"{url}: image is over the {max_bytes:,}-byte limit", 413)
                if time.monotonic() > deadline:
                    raise FetchError(f"{url}: download took longer than {timeout_s:g} s", 504)
                chunks.append(chunk)
            return b"".join(chunks)
        except TimeoutError:
            raise FetchError(f"{url}: timed out after {timeout_s:g} s", 504) from None
        except (OSError, http.client.HTTPException) as e:
            raise FetchError(f"{url}: could not fetch ({e})", 502) from None
        finally:
            conn.close()
    raise FetchError(f"{url}: more than {MAX_REDIRECTS} redirects", 502)
