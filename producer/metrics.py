"""The producer side's Prometheus metrics: event records by source and outcome.

Label sets are bounded: three sources, four outcomes, and the closed list of reasons a record
is ignored for (`producer.event_records.IGNORE_REASONS`).
"""

from __future__ import annotations

from prometheus_client import Counter, start_http_server

EVENTS = Counter("dualstream_events_total",
                 "Event records handled, by source (sqs, webhook, minio-redis), outcome "
                 "(enqueued, ignored, dead_lettered, confirmed) and why ignored.",
                 ["source", "outcome", "reason"])


def source_kind(source: str) -> str:
    """The consumer a delivery came through: `source` is a queue URL, `redis:<list>` or
    `webhook`."""
    if source == "webhook":
        return "webhook"
    return "minio-redis" if source.startswith("redis:") else "sqs"


def serve(port: int, host: str) -> None:
    """/metrics on `host:port` from a daemon thread (0: not served)."""
    if port:
        start_http_server(port, addr=host)
