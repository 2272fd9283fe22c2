"""The Celery application: JSON only, late acknowledgement, one queue per model.

`celery -A worker.celery_app worker` reads the settings from the environment when Celery first
configures the app (not at import); `dualstream worker` builds the app from explicit settings.
The threads pool is the default: the model lives once per process, tasks hand their jobs to the
batching pipeline and wait, and nothing forks after CUDA is initialised.
"""

from __future__ import annotations

import ssl
from typing import Any

from celery import Celery

from schemas.keys import queue_name
from schemas.settings import Settings


def celery_config(settings: Settings) -> dict[str, Any]:
    config: dict[str, Any] = {
        "broker_url": settings.redis_dsn,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            # An unacknowledged message comes back after this long if its worker died.
            "visibility_timeout": settings.visibility_timeout_s,
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
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # SIGTERM: stop consuming, give held work `drain_timeout_s`, then requeue the rest.
        "worker_soft_shutdown_timeout": settings.drain_timeout_s,
        "worker_enable_soft_shutdown_on_idle": True,
        "worker_hijack_root_logger": False,
    }
    if settings.model:
        config["task_default_queue"] = queue_name(settings.model)
    if settings.redis_dsn.startswith("rediss://"):
        config["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
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
