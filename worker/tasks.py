"""The one Celery task: hand a message's jobs to the runtime, then ack, retry or dead-letter."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down
from celery.utils.time import get_exponential_backoff_interval

from schemas.keys import TASK_NAME

MAX_BACKOFF_S = 60


def register(app: Celery) -> None:
    @app.task(name=TASK_NAME, bind=True, max_retries=None)
    def process(self: Task, payload: Any) -> dict[str, Any]:
        from worker.celery_app import app_settings
        from worker.runtime import get_runtime

        settings = app_settings(self.app)
        runtime = get_runtime(settings)
        request = self.request
        outcome = runtime.handle(payload, message_id=str(request.id),
                                 attempt=int(request.retries) + 1,
                                 queue=(request.delivery_info or {}).get("routing_key"))
        if outcome.retry is not None:
            countdown = outcome.retry_after_s or get_exponential_backoff_interval(
                factor=settings.retry_backoff_s, retries=int(request.retries),
                maximum=MAX_BACKOFF_S, full_jitter=True)
            raise self.retry(exc=outcome.retry, countdown=countdown)
        return {"dead_lettered": outcome.dead_lettered}

    _ = process


@worker_ready.connect
def _warm_up(sender: Any, **_: Any) -> None:
    """Load the model before the first message arrives, in pools that do not fork."""
    from worker.celery_app import app_settings
    from worker.runtime import get_runtime

    app = sender.app
    if not hasattr(app, "dualstream_settings") or app.conf.worker_pool == "prefork":
        return
    get_runtime(app_settings(app))


@worker_shutting_down.connect
def _note_shutdown(**_: Any) -> None:
    import logging

    logging.getLogger(__name__).info("worker shutting down: draining held messages")


@worker_shutdown.connect
def _close_runtime(**_: Any) -> None:
    """After the pool has stopped: flush the pipeline's stages and drop readiness."""
    from worker.runtime import close_runtime

    close_runtime()
