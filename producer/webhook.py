"""A webhook for upload events: MinIO's webhook target, or an SNS HTTP(S) subscription.

Secure by default: it binds 127.0.0.1 unless told otherwise, and requires a token unless that
is explicitly turned off (`webhook_require_token`): `Authorization: Bearer <token>` (MinIO's
`auth_token`) or basic auth whose password is the token (an SNS subscription URL
`https://user:<token>@host/`). The body is bounded whatever the headers say: a missing,
malformed, negative or too large Content-Length is refused before any of the body is read, and
a chunked body is read chunk by chunk only up to the limit.

Replies: 200 with what the delivery came to; 400 when nothing in the body was an event (it is
dead-lettered); 503 on a fault worth retrying (MinIO and SNS retry), nothing dead-lettered.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BufferedIOBase
from typing import Any

from producer.event_sources import EventSubmitter
from schemas.errors import ErrorCode

log = logging.getLogger(__name__)
MAX_WEBHOOK_BYTES = 1024 * 1024
_LENGTH = re.compile(r"[0-9]{1,12}")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,8}")
_MAX_LINE = 1024
_MAX_TRAILERS = 32
_LINGER_S, _LINGER_READS = 0.5, 4


class BodyRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def read_body(headers: Any, stream: BufferedIOBase, limit: int) -> bytes:
    """The request's body, at most `limit` bytes, or BodyRefused."""
    lengths = headers.get_all("Content-Length") or []
    if "chunked" in (headers.get("Transfer-Encoding") or "").lower():
        if lengths:
            raise BodyRefused(400, "both Content-Length and chunked encoding")
        return _read_chunked(stream, limit)
    if not lengths:
        raise BodyRefused(411, "Content-Length is required")
    if len(set(lengths)) != 1 or not _LENGTH.fullmatch(lengths[0].strip()):
        raise BodyRefused(400, "Content-Length is not one non-negative number")
    length = int(lengths[0])
    if length > limit:
        raise BodyRefused(413, f"the body is over {limit} bytes")
    body = stream.read(length)
    if len(body) != length:
        raise BodyRefused(400, "the body is shorter than its Content-Length")
    return body


def _read_line(stream: BufferedIOBase) -> bytes:
    line = stream.readline(_MAX_LINE + 1)
    if len(line) > _MAX_LINE or not line.endswith(b"\n"):
        raise BodyRefused(400, "a malformed chunk")
    return line.rstrip(b"\r\n")


def _read_chunked(stream: BufferedIOBase, limit: int) -> bytes:
    body = bytearray()
    while True:
        size_text = _read_line(stream).split(b";", 1)[0].strip()
        if not _CHUNK_SIZE.fullmatch(size_text):
            raise BodyRefused(400, "a malformed chunk size")
        size = int(size_text, 16)
        if size == 0:
            break
        if len(body) + size > limit:
            raise BodyRefused(413, f"the body is over {limit} bytes")
        chunk = stream.read(size)
        if len(chunk) != size or _read_line(stream):
            raise BodyRefused(400, "a truncated chunk")
        body += chunk
    for _ in range(_MAX_TRAILERS):
        if not _read_line(stream):
            return bytes(body)
    raise BodyRefused(400, "too many trailers")


def authorized(header: str, token: str) -> bool:
    """`Bearer <token>`, or basic auth with the token as password."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return hmac.compare_digest(value.strip().encode(), token.encode())
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True)
        except ValueError:
            return False
        return hmac.compare_digest(decoded.partition(b":")[2], token.encode())
    return False


def webhook_server(port: int, submitter: EventSubmitter, *, token: str | None,
                   host: str = "127.0.0.1", require_token: bool = True,
                   max_bytes: int = MAX_WEBHOOK_BYTES) -> ThreadingHTTPServer:
    """The server (not yet serving); without a token, `require_token` must be False."""
    if require_token and not token:
        raise ValueError("the webhook needs a token (DUALSTREAM_WEBHOOK_TOKEN), or "
                         "DUALSTREAM_WEBHOOK_REQUIRE_TOKEN=false to accept any request")

    class Handler(_Handler):
        pass

    Handler.submitter, Handler.token, Handler.max_bytes = submitter, token, max_bytes
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


class _Handler(BaseHTTPRequestHandler):
    submitter: EventSubmitter
    token: str | None
    max_bytes: int
    timeout = 30  # a client that stalls mid-request is dropped

    def do_POST(self) -> None:
        if self.token and not authorized(self.headers.get("Authorization", ""), self.token):
            return self._refuse(401, "missing or wrong token")
        try:
            body = read_body(self.headers, self.rfile, self.max_bytes)
        except BodyRefused as exc:
            return self._refuse(exc.status, exc.message)
        except OSError:  # the client stalled past `timeout`, or went away
            self.close_connection = True
            return None
        delivery = hashlib.sha256(body).hexdigest()[:32]  # a resent body: the same letters
        try:
            summary = self.submitter.handle(body, source="webhook", delivery=delivery)
        except Exception as exc:
            log.exception("a webhook event could not be handled; the sender should retry")
            return self._reply(503, {"error": f"{type(exc).__name__}: try again"})
        if summary.dead_lettered and not (summary.jobs or summary.ignored or summary.confirmed):
            return self._reply(400, {"error": "not an upload event", "code": ErrorCode.INVALID_JOB,
                                     **summary.as_dict()})
        return self._reply(200, summary.as_dict())

    def _refuse(self, status: int, message: str) -> None:
        """Reply and close without reading the body; what the client already sent is
        discarded (a little, briefly), so that closing does not reset the connection under
        the reply before the client reads it."""
        self.close_connection = True
        self._reply(status, {"error": message})
        self.wfile.flush()
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(_LINGER_S)
            for _ in range(_LINGER_READS):
                if not self.connection.recv(64 * 1024):
                    break
        except OSError:
            pass

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt: str, *args: Any) -> None:
        log.info("webhook: " + fmt, *args)
