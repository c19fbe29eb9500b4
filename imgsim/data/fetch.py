"""Fetch a query image from a URL, safely.

http/https only; connect and read time-outs plus an overall deadline; a size cap checked against
Content-Length and enforced while reading; at most a few redirects, each re-checked in full.

A URL whose authority could be read two ways (a backslash anywhere, `user@` or `user:pw@` before the
host, no host) is refused before any DNS lookup: `http://127.0.0.1:80\\@evil/` is host "evil" to
Python and 127.0.0.1 to a browser. Unless `allow_private` is set, only globally routable addresses
are fetched from (server-side request forgery): an IPv6 address that wraps an IPv4 one (IPv4-mapped,
6to4, NAT64, Teredo) is judged by the IPv4 inside; shared (100.64.0.0/10), site-local (fec0::/10)
and everything `ipaddress` does not call global, multicast, reserved or unspecified are refused.
The connection is made to the very address that was checked, so a DNS answer that changes between
check and connect (rebinding) cannot slip through.
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


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Ranges refused by name, on top of what `ipaddress` calls non-global (its list differs between
# Python versions; these are the ones it has missed).
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT; some clouds' metadata lives here
_SITE_LOCAL = ipaddress.IPv6Network("fec0::/10")  # deprecated, still routed inside some networks
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # NAT64 for a network's own use (RFC 8215)
# IPv6 forms with an IPv4 address inside: the IPv4 address is where a packet ends up.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the IPv4 address in the last 32 bits
_LOCAL_KINDS = ("unspecified", "loopback", "link-local", "multicast", "private", "reserved")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 address wraps, with the name of the wrapping, or None."""
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", ip.ipv4_mapped
    if ip in _NAT64:
        return "NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return "6to4", ip.sixtofour
    if ip.teredo is not None:
        return "Teredo", ip.teredo[1]  # (server, client): packets go to the client
    return None


def refusal_reason(ip: IPAddress) -> str | None:
    """Why `ip` is not globally routable (so may not be fetched from), or None when it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL:
            return f"NAT64 for local use, {_NAT64_LOCAL}"
        wrapped = _embedded_ipv4(ip)
        if wrapped is not None:
            kind, inner = wrapped
            reason = refusal_reason(inner)
            if reason is not None:
                return f"{kind} for {inner}, {reason}"
            if kind in ("IPv4-mapped", "NAT64"):
                return None  # the IPv4 address is the destination; the wrapping itself is no range
            if kind == "Teredo":
                return "a Teredo tunnel, 2001::/32"
        if ip in _SITE_LOCAL:
            return f"site-local, {_SITE_LOCAL}"
    elif ip in _SHARED:
        return f"shared address space {_SHARED}, carrier-grade NAT"
    for kind in _LOCAL_KINDS:
        if getattr(ip, f"is_{kind.replace('-', '_')}"):
            return kind
    if not ip.is_global:
        return "not globally routable"
    return None


def _shown(url: str, limit: int = 200) -> str:
    return repr(url if len(url) <= limit else url[:limit] + "...")


def check_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of `url`; refuses, before any DNS lookup, URLs whose host is ambiguous."""
    if "\\" in url:
        raise FetchError(
            f"refusing URL {_shown(url)}: it contains a backslash, which makes its host ambiguous"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise FetchError(f"refusing URL {_shown(url)}: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise FetchError(f"only http and https URLs are supported, got {parts.scheme or 'none'!r}")
    if "@" in parts.netloc:
        raise FetchError(
            f"refusing URL {_shown(url)}: it names a user before the host (user@host), which makes its host ambiguous"
        )
    if not parts.hostname:
        raise FetchError(f"URL has no host: {_shown(url)}")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def resolve(host: str, port: int, allow_private: bool) -> str:
    """The address to connect to for `host`; refuses addresses that are not globally routable unless allowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise FetchError(f"cannot resolve host {host!r}: {e.strerror}", 400) from None
    addresses = [info[4][0] for info in infos]
    if not allow_private:
        for address in addresses:
            reason = refusal_reason(ipaddress.ip_address(address.split("%")[0]))
            if reason is not None:
                raise FetchError(
                    f"refusing to fetch from {host!r}: it resolves to {address} ({reason}), not a public address; "
                    "a server operator can allow this with --allow-private-urls",
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
        scheme, host, port = check_url(url)
        ip = resolve(host, port, allow_private)
        conn_cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
        conn = conn_cls(host, ip, port, timeout=max(0.1, deadline - time.monotonic()))
        parts = urlsplit(url)
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
