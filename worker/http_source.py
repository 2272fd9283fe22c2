"""http(s) sources, only through an allowlist, never to an internal address (no SSRF).

A job may name `https://host/path` only when `host` is in `allowed_http_hosts`. The host is
resolved once, every address it resolves to must be public (not loopback, private, link-local,
shared, reserved or a cloud metadata address), and the connection goes to that checked address,
so a DNS answer that changes between check and connect cannot redirect it. Redirects are
followed by hand, at most `MAX_REDIRECTS`, and each hop is checked again from the start.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from fnmatch import fnmatch
from urllib.parse import urljoin, urlsplit

import urllib3

from schemas.errors import ErrorCode, SourceError, TransientError

MAX_REDIRECTS = 3
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


@dataclass(frozen=True)
class HttpPolicy:
    allowed_hosts: tuple[str, ...]
    max_bytes: int
    allow_private_networks: bool = False  # on-premises object stores; never the metadata service
    timeout_s: float = 30.0


def _refuse(message: str) -> SourceError:
    return SourceError(message, code=ErrorCode.SOURCE_NOT_ALLOWED)


def _check_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, policy: HttpPolicy,
                   host: str) -> None:
    if ip in _METADATA or ip.is_unspecified or ip.is_multicast:
        raise _refuse(f"{host} resolves to {ip}, which is never fetched")
    if not ip.is_global and not policy.allow_private_networks:
        raise _refuse(f"{host} resolves to the internal address {ip}")


def resolve_checked(host: str, port: int, policy: HttpPolicy) -> str:
    """The address to connect to, after checking the host and everything it resolves to."""
    if not any(fnmatch(host.lower(), pattern.lower()) for pattern in policy.allowed_hosts):
        raise _refuse(f"host {host!r} is not in the allowed http hosts")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SourceError(f"{host} does not resolve: {exc}",
                          code=ErrorCode.SOURCE_NOT_FOUND) from exc
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    for ip in addresses:
        _check_address(ip, policy, host)
    return str(addresses[0])


def fetch(url: str, policy: HttpPolicy) -> tuple[bytes, str | None]:
    for _ in range(MAX_REDIRECTS + 1):
        response = _request(url, policy)
        if response.status in (301, 302, 303, 307, 308):
            location = response.headers.get("Location")
            response.release_conn()
            if not location:
                raise SourceError(f"{url} redirects nowhere", code=ErrorCode.SOURCE_NOT_FOUND)
            url = urljoin(url, location)
            continue
        return _body(url, response, policy), response.headers.get("ETag")
    raise _refuse(f"more than {MAX_REDIRECTS} redirects from {url}")


def _request(url: str, policy: HttpPolicy) -> urllib3.BaseHTTPResponse:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _refuse(f"{url!r} is not an http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = resolve_checked(parts.hostname, port, policy)
    pool = _pool(parts.scheme, parts.hostname, address, port, policy)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        return pool.urlopen("GET", path, headers={"Host": parts.netloc}, redirect=False,
                            preload_content=False)
    except urllib3.exceptions.HTTPError as exc:
        raise TransientError(f"fetching {url} failed: {exc}") from exc


def _pool(scheme: str, host: str, address: str, port: int,
          policy: HttpPolicy) -> urllib3.HTTPConnectionPool:
    """A pool that connects to the checked address; TLS still verifies the host name."""
    if scheme == "https":
        return urllib3.HTTPSConnectionPool(address, port, timeout=policy.timeout_s,
                                           retries=False, maxsize=1, server_hostname=host,
                                           assert_hostname=host)
    return urllib3.HTTPConnectionPool(address, port, timeout=policy.timeout_s, retries=False,
                                      maxsize=1)


def _body(url: str, response: urllib3.BaseHTTPResponse, policy: HttpPolicy) -> bytes:
    try:
        if response.status == 404 or response.status == 410:
            raise SourceError(f"{url} does not exist ({response.status})",
                              code=ErrorCode.SOURCE_NOT_FOUND)
        if response.status in (401, 403):
            raise SourceError(f"{url} refused access ({response.status})",
                              code=ErrorCode.ACCESS_DENIED)
        if response.status >= 500 or response.status == 429:
            raise TransientError(f"{url} answered {response.status}")
        if response.status != 200:
            raise SourceError(f"{url} answered {response.status}",
                              code=ErrorCode.SOURCE_NOT_FOUND)
        declared = int(response.headers.get("Content-Length") or 0)
        if declared > policy.max_bytes:
            raise SourceError(f"{url} is {declared} bytes, over the limit of {policy.max_bytes}",
                              code=ErrorCode.SOURCE_TOO_LARGE)
        data = response.read(policy.max_bytes + 1)
        if len(data) > policy.max_bytes:
            raise SourceError(f"{url} is over the limit of {policy.max_bytes} bytes",
                              code=ErrorCode.SOURCE_TOO_LARGE)
        return bytes(data)
    finally:
        response.release_conn()
