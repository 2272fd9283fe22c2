"""The broker as both sides see it: Redis through Celery, JSON only, one task name.

Producers publish by task name (`TASK_NAME`) with a plain Celery app from `producer_app`: they
never import the worker's tasks, signal handlers or model code. The worker's app
(`worker/celery_app.py`) starts from the same `broker_options` and adds what only a consumer
needs. Why each value is what it is: docs/reliability.md.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from control.connections import broker_ssl_options
from schemas.keys import TASK_NAME
from schemas.settings import Settings

__all__ = ["TASK_NAME", "broker_options", "producer_app", "restore_interval_s"]

BROKER_SOCKET_TIMEOUT_S = 30
BROKER_CONNECT_TIMEOUT_S = 5


def restore_interval_s(visibility_timeout_s: int) -> int:
    """How often a worker looks for messages whose visibility timeout has passed: a tenth of
    the timeout, between 1 and 10 seconds, so a dead worker's messages come back soon after."""
    return max(1, min(10, visibility_timeout_s // 10))


def broker_options(settings: Settings) -> dict[str, Any]:
    """Celery settings for the Redis broker connection and the wire format."""
    visibility_timeout = settings.visibility_timeout_s
    options: dict[str, Any] = {
        "broker_url": settings.redis_dsn,
        "broker_connection_retry_on_startup": True,
        "broker_connection_retry": True,
        # A Redis restart is waited out, however long it takes, instead of ending the process.
        "broker_connection_max_retries": None,
        "broker_transport_options": {
            # An unacknowledged message comes back after this long if its worker died. Kombu's
            # default is an hour; ours is the settings' (300 s), and a worker holds a message
            # for at most `runtime.HOLD_FRACTION` (70 %) of it, so a live one is never restored.
            "visibility_timeout": visibility_timeout,
            # Kombu sweeps for such messages every interval × throttle seconds (100 s by
            # default); sweep every `restore_interval_s` instead.
            "unacked_restore_interval": restore_interval_s(visibility_timeout),
            "unacked_restore_throttle": 1,
            # A broker that vanishes without closing the connection is noticed.
            "socket_timeout": BROKER_SOCKET_TIMEOUT_S,
            "socket_connect_timeout": BROKER_CONNECT_TIMEOUT_S,
            "socket_keepalive": True,
        },
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
    }
    ssl_options = broker_ssl_options(settings)
    if ssl_options is not None:
        options["broker_use_ssl"] = ssl_options
    return options


def producer_app(settings: Settings) -> Celery:
    """A Celery app that only publishes: no tasks registered, no worker signals connected."""
    app = Celery("dualstream-producer", set_as_current=False)
    app.conf.update(broker_options(settings))
    return app
