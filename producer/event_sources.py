"""Where upload events come from: an SQS queue (S3, SNS or EventBridge targets) or a webhook
(MinIO's webhook target). Each event is acknowledged only after its jobs are enqueued; an event
that is not an upload event goes to the dead-letter store instead of looping forever.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from control.deadletters import DeadLetterStore
from producer.client import Client
from producer.events import EventJobTemplate, parse_event
from schemas.errors import ErrorCode, InvalidJob

log = logging.getLogger(__name__)
MAX_WEBHOOK_BYTES = 1024 * 1024


@dataclass
class EventSubmitter:
    client: Client
    template: EventJobTemplate
    dead_letters: DeadLetterStore

    def submit(self, body: str | bytes) -> list[str]:
        """Parse one event and enqueue its jobs; raises InvalidJob for a non-event."""
        return self.client.submit_many(self.template.jobs(parse_event(body)))

    def reject(self, body: str | bytes, error: InvalidJob, source: str) -> None:
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
        log.warning("dropping a malformed event from %s: %s", source, error.message)
        self.dead_letters.add(payload=text, code=ErrorCode.INVALID_JOB, error=error.message,
                              message_id=None, deliveries=1, queue=source)


def poll_sqs(sqs: Any, queue_url: str, submitter: EventSubmitter, *,
             stop: threading.Event | None = None, wait_s: int = 20, once: bool = False) -> int:
    """Long-poll SQS until stopped; returns how many events were handled."""
    handled = 0
    while stop is None or not stop.is_set():
        response = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10,
                                       WaitTimeSeconds=wait_s)
        for message in response.get("Messages", []):
            try:
                submitter.submit(message["Body"])
            except InvalidJob as exc:
                submitter.reject(message["Body"], exc, queue_url)
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
            handled += 1
        if once:
            return handled
    return handled


def webhook_server(port: int, submitter: EventSubmitter, *, token: str | None = None,
                   host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """A webhook for MinIO (`notify_webhook`); with a token, requests must carry it as Bearer."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if token and not hmac.compare_digest(self.headers.get("Authorization", ""),
                                                 f"Bearer {token}"):
                return self._reply(401, {"error": "missing or wrong bearer token"})
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_WEBHOOK_BYTES:
                return self._reply(413, {"error": "event too large"})
            body = self.rfile.read(length)
            try:
                ids = submitter.submit(body)
            except InvalidJob as exc:
                submitter.reject(body, exc, "webhook")
                return self._reply(400, {"error": exc.message, "code": exc.code})
            return self._reply(200, {"jobs": ids})

        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt: str, *args: Any) -> None:
            log.info("webhook: " + fmt, *args)

    return ThreadingHTTPServer((host, port), Handler)
