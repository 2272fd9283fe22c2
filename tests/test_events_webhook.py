"""The events webhook, secure by default: it binds 127.0.0.1, needs a token unless that is
turned off, and bounds a body whatever its headers say, refusing before reading any of it."""

from __future__ import annotations

import base64
import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from control.deadletters import DeadLetterStore
from producer.client import Client
from producer.event_cli import events
from producer.event_sources import EventSubmitter
from producer.events import EventJobTemplate
from producer.webhook import MAX_WEBHOOK_BYTES, webhook_server
from schemas.keys import RedisKeys, queue_name
from schemas.settings import Settings
from tests.fixtures.event_bodies import minio_webhook

MODEL = "tiny/model"
TOKEN = "s3cret"
EVENT = json.dumps(minio_webhook("dir/cat.jpg")).encode()


@pytest.fixture
def submitter(redis_url: str) -> EventSubmitter:
    client = Client(Settings(redis_url=redis_url, model=MODEL))
    return EventSubmitter(client, EventJobTemplate(model=MODEL),
                          DeadLetterStore(client.redis, RedisKeys()))


def serve(submitter: EventSubmitter, **options: Any) -> Iterator[tuple[str, int]]:
    server = webhook_server(0, submitter, **options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[0], server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def webhook(submitter: EventSubmitter) -> Iterator[tuple[str, int]]:
    yield from serve(submitter, token=TOKEN)


def post(address: tuple[str, int], body: bytes,
         authorization: str | None = f"Bearer {TOKEN}") -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://{address[0]}:{address[1]}/", data=body,
                                     method="POST")
    if authorization:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def queued(redis_url: str) -> int:
    return int(redis.Redis.from_url(redis_url).llen(queue_name(MODEL)))


def test_it_binds_localhost_and_needs_a_token_by_default(submitter: EventSubmitter) -> None:
    with pytest.raises(ValueError, match="needs a token"):
        webhook_server(0, submitter, token=None)
    server = webhook_server(0, submitter, token=TOKEN)
    assert server.server_address[0] == "127.0.0.1"
    server.server_close()
    host = next(p for p in events.commands["webhook"].params if p.name == "host")
    assert host.default == "127.0.0.1"


def test_the_command_refuses_to_start_without_a_token(redis_url: str) -> None:
    result = CliRunner().invoke(events, ["webhook", "--port", "0"], env={
        "DUALSTREAM_REDIS_URL": redis_url, "DUALSTREAM_MODEL": MODEL,
        "DUALSTREAM_WEBHOOK_TOKEN": ""})
    assert result.exit_code != 0 and "needs a token" in result.output


def test_requests_without_the_token_are_refused(webhook: tuple[str, int],
                                               redis_url: str) -> None:
    assert post(webhook, EVENT, authorization=None)[0] == 401
    assert post(webhook, EVENT, authorization="Bearer wrong")[0] == 401
    assert post(webhook, EVENT, authorization=f"Token {TOKEN}")[0] == 401
    assert queued(redis_url) == 0
    status, body = post(webhook, EVENT)
    assert (status, body["jobs"]) == (200, 1) and queued(redis_url) == 1
    sns_style = "Basic " + base64.b64encode(f"sns:{TOKEN}".encode()).decode()
    assert post(webhook, EVENT, authorization=sns_style)[0] == 200


def test_a_body_that_is_no_event_is_refused_and_dead_lettered(
    webhook: tuple[str, int], submitter: EventSubmitter
) -> None:
    status, body = post(webhook, b"{oops")
    assert status == 400 and body["code"] == "invalid_job"
    post(webhook, b"{oops")  # sent again: the same letter
    assert [letter.payload for letter in submitter.dead_letters.list()] == ["{oops"]


def test_without_a_token_only_when_turned_off(submitter: EventSubmitter) -> None:
    for address in serve(submitter, token=None, require_token=False):
        assert post(address, EVENT, authorization=None)[0] == 200


def raw_request(address: tuple[str, int], head: str, body: bytes = b"") -> str:
    """Send a request's head (and maybe some body), then read the reply without sending more:
    a server that waited for the body would time out here."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply.decode(errors="replace")


def head(*headers: str) -> str:
    lines = ["POST / HTTP/1.1", "Host: localhost", f"Authorization: Bearer {TOKEN}", *headers]
    return "\r\n".join(lines) + "\r\n"


@pytest.mark.parametrize(("length", "status"), [
    (None, 411), ("-1", 400), ("+5", 400), ("0x10", 400), ("1e3", 400), ("99999999999999", 400),
    (str(MAX_WEBHOOK_BYTES + 1), 413), (str(8 * 1024 * 1024), 413)])
def test_a_bad_or_too_large_content_length_is_refused_before_the_body_is_read(
    webhook: tuple[str, int], length: str | None, status: int
) -> None:
    headers = [] if length is None else [f"Content-Length: {length}"]
    reply = raw_request(webhook, head(*headers))  # no body follows: none is awaited
    assert reply.startswith(f"HTTP/1.0 {status} "), reply


def test_two_content_lengths_or_one_beside_chunked_are_refused(
    webhook: tuple[str, int]
) -> None:
    assert " 400 " in raw_request(webhook, head("Content-Length: 5", "Content-Length: 6"))
    assert " 400 " in raw_request(webhook, head("Content-Length: 5",
                                                "Transfer-Encoding: chunked"))


def chunked(data: bytes, size: int = 65536) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size])
             for i in range(0, len(data), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def test_chunked_bodies_are_read_only_up_to_the_limit(webhook: tuple[str, int],
                                                       redis_url: str) -> None:
    reply = raw_request(webhook, head("Transfer-Encoding: chunked"), chunked(EVENT, 100))
    assert reply.startswith("HTTP/1.0 200 ") and queued(redis_url) == 1
    too_big = chunked(b" " * (MAX_WEBHOOK_BYTES + 64 * 1024))
    assert raw_request(webhook, head("Transfer-Encoding: chunked"), too_big).startswith(
        "HTTP/1.0 413 ")
    # A chunk that announces more than the limit is refused before it is read.
    assert " 413 " in raw_request(webhook, head("Transfer-Encoding: chunked"), b"7fffffff\r\n")
    assert " 400 " in raw_request(webhook, head("Transfer-Encoding: chunked"), b"-1\r\n")


def test_a_client_that_stalls_mid_body_is_dropped(submitter: EventSubmitter,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from producer import webhook

    monkeypatch.setattr(webhook._Handler, "timeout", 0.5)
    for address in serve(submitter, token=TOKEN):
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(head("Content-Length: 100").encode() + b"\r\n{\"Rec")
            assert sock.recv(1024) == b""  # closed, no reply, nothing handled
    assert submitter.stats.as_dict()["jobs"] == 0 and submitter.dead_letters.list() == []
