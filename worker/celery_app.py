"""The Celery application: JSON only, late acknowledgement, one queue per model.

`celery -A worker.celery_app worker` reads the settings from the environment when Celery first
configures the app (not at import); `dualstream worker` builds the app from explicit settings.
The threads pool is the default: the model lives once per process, tasks hand their jobs to the
batching pipeline and wait, and nothing forks after CUDA is initialised.

Why each reliability setting has its value is written down in docs/reliability.md.
"""

from __future__ import annotations

from typing import Any

import redis
from celery import Celery
from kombu.transport import redis as kombu_redis

from schemas.keys import queue_name
from schemas.settings import Settings
from worker.connections import broker_ssl_options

BROKER_SOCKET_TIMEOUT_S = 30
BROKER_CONNECT_TIMEOUT_S = 5


class _BrokerChannel(kombu_redis.Channel):
    """Kombu's Redis channel, failing like a lost connection once its connection is closed.

    After a broker outage, Celery closes the old connection while tasks still run; their acks
    (and kombu's restore of held messages on close) then reach a channel whose connection is
    gone, and kombu 5.7 raises AttributeError there, which Celery treats as unrecoverable: the
    worker exits. A ConnectionError instead is logged and skipped; the message stays in
    Redis's unacked hash and comes back through the visibility-timeout sweep.
    """

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        transport = self.connection
        if transport is None or transport.client is None:
            raise redis.ConnectionError("this broker channel's connection was closed")
        params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)
        return params


class BrokerTransport(kombu_redis.Transport):
    """Kombu's Redis transport with `_BrokerChannel`."""

    Channel = _BrokerChannel


def restore_interval_s(visibility_timeout_s: int) -> int:
    """How often a worker looks for messages whose visibility timeout has passed: a tenth of
    the timeout, between 1 and 10 seconds, so a dead worker's messages come back soon after."""
    return max(1, min(10, visibility_timeout_s // 10))


def celery_config(settings: Settings) -> dict[str, Any]:
    visibility_timeout = settings.visibility_timeout_s
    config: dict[str, Any] = {
        "broker_url": settings.redis_dsn,
        "broker_transport": f"{__name__}:BrokerTransport",
        "broker_connection_retry_on_startup": True,
        "broker_connection_retry": True,
        # A Redis restart is waited out, however long it takes, instead of ending the worker.
        "broker_connection_max_retries": None,
        "broker_transport_options": {
            # An unacknowledged message comes back after this long if its worker died. Kombu's
            # default is an hour; ours is the settings' (300 s), and a worker holds a message
            # for at most 80 % of it (runtime.HOLD_FRACTION), so a live one is never restored.
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
        # Acknowledge only once outputs are written; requeue if the worker is lost.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_pool": "threads",
        "worker_concurrency": settings.max_inflight_messages,
        # Threads cannot be cancelled; a task whose connection dropped finishes its (idempotent)
        # work, and its message comes back after the visibility timeout if the ack was lost.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # Messages that never reach the task (not JSON, pickle, unknown task) are dead-lettered.
        "worker_consumer": "worker.tasks:Consumer",
        "worker_hijack_root_logger": False,
    }
    if settings.model:
        config["task_default_queue"] = queue_name(settings.model)
    ssl_options = broker_ssl_options(settings)
    if ssl_options is not None:
        config["broker_use_ssl"] = ssl_options
    return config


def create_app(settings: Settings | None = None) -> Celery:
    """An app configured from `settings`, or from the environment when Celery first needs it."""
    celery_app = Celery("dualstream", set_as_current=False)
    celery_app.dualstream_settings = settings
    if settings is not None:
        celery_app.conf.update(celery_config(settings))
    else:
        # weak=False: the receiver is a closure that would otherwise be collected at once.
        celery_app.on_configure.connect(_configure_from_environment, weak=False)

    from worker.tasks import register

    register(celery_app)
    return celery_app


def _configure_from_environment(sender: Celery, **_: Any) -> None:
    sender.dualstream_settings = Settings()
    sender.conf.update(celery_config(sender.dualstream_settings))


def app_settings(celery_app: Celery) -> Settings:
    celery_app.conf.broker_url  # noqa: B018 - reading the configuration runs on_configure
    settings: Settings = celery_app.dualstream_settings
    return settings


app = create_app()
