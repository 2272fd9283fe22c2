"""The worker's Celery application: late acknowledgement, one queue per model, threads pool.

`celery -A worker.celery_app worker` reads the settings from the environment when Celery first
configures the app (not at import); `dualstream worker` builds the app from explicit settings.
The threads pool is the default: the model lives once per process, tasks hand their jobs to the
batching pipeline and wait, and nothing forks after CUDA is initialised. Producers never import
this module: they publish by task name (`control/broker.py`).

Why each reliability setting has its value is written down in docs/reliability.md.
"""

from __future__ import annotations

import sys
from typing import Any

from celery import Celery

from control.broker import broker_options
from schemas.keys import queue_name
from schemas.settings import Settings
from worker.extra import missing_worker_extra

try:
    from worker.task_events import BufferedTaskEvents
    from worker.tasks import register
except ModuleNotFoundError as _missing:  # `celery -A worker.celery_app` without the extra
    if (_reason := missing_worker_extra(_missing)) is None:
        raise
    sys.exit(_reason)  # the reason on stderr, exit status 1


def celery_config(settings: Settings) -> dict[str, Any]:
    config: dict[str, Any] = {
        **broker_options(settings),
        # Acknowledge only once outputs are written; requeue if the worker is lost.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_pool": "threads",
        "worker_concurrency": settings.max_inflight_messages,
        # Threads cannot be cancelled; a task whose connection dropped finishes its (idempotent)
        # work; if its ack is lost, the message comes back (control/inflight.py) and is found
        # done.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # Messages that never reach the task (not JSON, pickle, unknown task) are dead-lettered.
        "worker_consumer": "worker.tasks:Consumer",
        # Task events for Flower and `celery events`, sent in batches (worker/task_events.py).
        "worker_send_task_events": settings.task_events,
        "worker_hijack_root_logger": False,
    }
    if settings.model:
        config["task_default_queue"] = queue_name(settings.model)
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
    register(celery_app)
    celery_app.steps["consumer"].add(BufferedTaskEvents)
    return celery_app


def _configure_from_environment(sender: Celery, **_: Any) -> None:
    sender.dualstream_settings = Settings()
    sender.conf.update(celery_config(sender.dualstream_settings))


app = create_app()
