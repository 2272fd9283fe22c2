"""The broker as both sides see it: Redis through Celery, JSON only, one task name.

Producers publish by task name (`TASK_NAME`) with a plain Celery app from `producer_app`: they
never import the worker's tasks, signal handlers or model code. The worker's app
(`worker/celery_app.py`) starts from the same `broker_options` and adds what only a consumer
needs. Why each value is what it is: docs/reliability.md.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from control.connections import broker_ssl_options, is_sentinel, redis_client
from control.inflight import InflightLedger, Sweeper
from schemas.keys import TASK_NAME, RedisKeys
from schemas.settings import Settings

__all__ = ["TASK_NAME", "broker_options", "heartbeat_timing", "producer_app", "start_sweeper"]

BROKER_SOCKET_TIMEOUT_S = 30
BROKER_CONNECT_TIMEOUT_S = 5
# Publishing rides out a Redis restart or failover of about a minute before it gives up.
PUBLISH_RETRY_POLICY = {"max_retries": 60, "interval_start": 0.2, "interval_step": 0.5,
                        "interval_max": 1.0}


def heartbeat_timing(settings: Settings) -> tuple[float, float]:
    """(interval, ttl) of consumers' heartbeats: a consumer silent for `ttl` seconds is dead
    and its messages go back. The ttl never exceeds the visibility timeout, so a killed
    worker's messages are back within `visibility_timeout_s` + one interval."""
    ttl = min(settings.heartbeat_ttl_s, float(settings.visibility_timeout_s))
    return max(0.1, min(2.0, ttl / 5)), ttl


def broker_options(settings: Settings) -> dict[str, Any]:
    """Celery settings for the Redis broker connection, its transport and the wire format."""
    interval, ttl = heartbeat_timing(settings)
    options: dict[str, Any] = {
        "broker_url": settings.redis_dsn,
        # Kombu's Redis transport with an atomic fetch into per-consumer in-flight lists.
        "broker_transport": "control.transport:InflightTransport",
        "broker_connection_retry_on_startup": True,
        "broker_connection_retry": True,
        # A Redis restart is waited out, however long it takes, instead of ending the process.
        "broker_connection_max_retries": None,
        "broker_transport_options": {
            # Bodies are JSON: kept as text, not base64 (a third smaller on the queue).
            "body_encoding": "utf-8",
            "dualstream_key_prefix": settings.key_prefix,
            "heartbeat_interval_s": interval,
            "heartbeat_ttl_s": ttl,
            "dead_letter_max_entries": settings.dead_letter_max_entries,
            "dead_letter_max_bytes": settings.dead_letter_max_bytes,
            # After a reconnect, what tasks still work on stays held for at most this long.
            "hold_limit_s": settings.visibility_timeout_s,
            # A broker that vanishes without closing the connection is noticed.
            "socket_timeout": BROKER_SOCKET_TIMEOUT_S,
            "socket_connect_timeout": BROKER_CONNECT_TIMEOUT_S,
            "socket_keepalive": True,
        },
        "task_publish_retry": True,
        "task_publish_retry_policy": PUBLISH_RETRY_POLICY,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
    }
    if is_sentinel(settings.redis_dsn):
        options["broker_transport"] = "control.transport:InflightSentinelTransport"
        options["broker_transport_options"]["master_name"] = settings.redis_sentinel_master
    if settings.redis_replicas_to_ack:
        options["broker_transport_options"].update(
            replicas_to_ack=settings.redis_replicas_to_ack,
            replicas_ack_timeout_ms=settings.redis_replicas_ack_timeout_ms)
    ssl_options = broker_ssl_options(settings)
    if ssl_options is not None:
        options["broker_use_ssl"] = ssl_options
    return options


def start_sweeper(settings: Settings) -> Sweeper:
    """Sweep dead consumers' in-flight lists from this process, every heartbeat interval."""
    interval, ttl = heartbeat_timing(settings)
    ledger = InflightLedger(redis_client(settings), RedisKeys(settings.key_prefix),
                            heartbeat_ttl_s=ttl)
    return Sweeper(ledger, interval_s=interval).start()


def producer_app(settings: Settings) -> Celery:
    """A Celery app that only publishes: no tasks registered, no worker signals connected."""
    app = Celery("dualstream-producer", set_as_current=False)
    app.conf.update(broker_options(settings))
    return app
