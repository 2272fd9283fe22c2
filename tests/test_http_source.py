"""http(s) sources: allowlisted hosts only, internal addresses refused on every hop."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from schemas.errors import ErrorCode, SourceError, TransientError
from schemas.settings import Settings
from worker.http_source import HttpPolicy, fetch
from worker.sources import SourceReader

BODY = b"\xff\xd8 pretend jpeg bytes"


ROUTES: dict[str, tuple[int, dict[str, str], bytes]] = {
    "/image.jpg": (200, {"ETag": '"abc"'}, BODY),
    "/to-other-host": (302, {"Location": "http://127.0.0.1:{port}/image.jpg"}, b""),
    "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
    "/relative": (301, {"Location": "/image.jpg"}, b""),
    "/loop": (302, {"Location": "/loop"}, b""),
    "/huge": (200, {"Content-Length": "999999999"}, b""),
    "/busy": (503, {}, b""),
    "/secret": (403, {}, b""),
}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, headers, body = ROUTES.get(self.path, (404, {}, b""))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value.format(port=self.server.server_address[1]))
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()


def policy(private: bool = True, hosts: tuple[str, ...] = ("localhost",)) -> HttpPolicy:
    return HttpPolicy(hosts, max_bytes=1_000_000, allow_private_networks=private)


def code_of(url: str, chosen: HttpPolicy) -> ErrorCode:
    with pytest.raises(SourceError) as info:
        fetch(url, chosen)
    return info.value.code


def test_an_allowed_host_is_fetched(port: int) -> None:
    assert fetch(f"http://localhost:{port}/image.jpg", policy()) == (BODY, '"abc"')


def test_relative_redirects_on_the_same_host_are_followed(port: int) -> None:
    assert fetch(f"http://localhost:{port}/relative", policy())[0] == BODY


def test_a_host_outside_the_allowlist_is_refused(port: int) -> None:
    assert code_of(f"http://127.0.0.1:{port}/image.jpg", policy()) is ErrorCode.SOURCE_NOT_ALLOWED


def test_loopback_and_private_addresses_are_refused_by_default(port: int) -> None:
    url = f"http://localhost:{port}/image.jpg"
    assert code_of(url, policy(private=False)) is ErrorCode.SOURCE_NOT_ALLOWED
    for host in ("10.0.0.1", "192.168.1.1", "172.16.0.1", "[::1]", "100.64.0.1"):
        address_policy = policy(private=False, hosts=(host.strip("[]"),))
        assert code_of(f"http://{host}/x", address_policy) is ErrorCode.SOURCE_NOT_ALLOWED


def test_the_metadata_address_is_refused_even_with_private_networks_allowed() -> None:
    chosen = policy(private=True, hosts=("169.254.169.254",))
    assert code_of("http://169.254.169.254/latest/meta-data/", chosen) is \
        ErrorCode.SOURCE_NOT_ALLOWED


def test_every_redirect_hop_is_checked_again(port: int) -> None:
    assert code_of(f"http://localhost:{port}/to-other-host", policy()) is \
        ErrorCode.SOURCE_NOT_ALLOWED
    chosen = policy(hosts=("localhost", "169.254.169.254"))
    assert code_of(f"http://localhost:{port}/to-metadata", chosen) is ErrorCode.SOURCE_NOT_ALLOWED
    assert code_of(f"http://localhost:{port}/loop", policy()) is ErrorCode.SOURCE_NOT_ALLOWED


def test_size_status_and_scheme_failures_have_their_codes(port: int) -> None:
    base = f"http://localhost:{port}"
    assert code_of(f"{base}/huge", policy()) is ErrorCode.SOURCE_TOO_LARGE
    assert code_of(f"{base}/missing", policy()) is ErrorCode.SOURCE_NOT_FOUND
    assert code_of(f"{base}/secret", policy()) is ErrorCode.ACCESS_DENIED
    assert code_of("ftp://localhost/x", policy()) is ErrorCode.SOURCE_NOT_ALLOWED
    with pytest.raises(TransientError):
        fetch(f"{base}/busy", policy())


def test_readers_refuse_http_sources_unless_hosts_are_configured(port: int) -> None:
    reader = SourceReader(Settings())
    with pytest.raises(SourceError) as info:
        reader.read(f"http://localhost:{port}/image.jpg")
    assert info.value.code is ErrorCode.SOURCE_NOT_ALLOWED
    allowed = SourceReader(Settings(allowed_http_hosts=["localhost"],
                                    http_allow_private_networks=True))
    assert allowed.read(f"http://localhost:{port}/image.jpg").data == BODY
