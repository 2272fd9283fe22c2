"""The one Celery task, the consumer that dead-letters messages which never reach it, and the
worker's lifecycle signals (build the runtime before consuming, drain on SIGTERM, close).

A message is acknowledged only when the task returns. Every other way out of the task puts the
message back: a retry publishes its successor before the original is acknowledged, and
anything that goes wrong, expected or not, rejects it with requeue. Celery would acknowledge a
message whose task raised (`task_acks_on_failure_or_timeout`), which would lose it, so no
exception escapes. An error that recurs on every delivery is not retried forever: the message
policy counts the deliveries that ended in one and quarantines the message after
`max_deliveries` (`worker/message_policy.py`). Where even a requeue cannot reach Redis, the
message stays in this consumer's in-flight list: its reconciliation puts it back two heartbeats
later, or, if this worker dies first, a sweep within `heartbeat_ttl_s` (control/inflight.py).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from celery.signals import worker_init, worker_shutdown, worker_shutting_down
from celery.utils.time import get_exponential_backoff_interval
from celery.worker.consumer import Consumer as CeleryConsumer

from control.broker import start_sweeper
from schemas.keys import TASK_NAME
from schemas.settings import Settings
from worker.message_policy import MAX_COUNTDOWN_FRACTION, Outcome
from worker.runtime import close_runtime, existing_runtime, get_runtime

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60


def register(app: Celery) -> None:
    """The task on `app` alone: a shared task (Celery's default) would also be registered on
    every other app of the process, each with its own callable."""
    app.task(name=TASK_NAME, bind=True, max_retries=None, shared=False)(_process)


def app_settings(celery_app: Celery) -> Settings:
    """The settings the app was built with, or read from the environment by `on_configure`."""
    celery_app.conf.broker_url  # noqa: B018 - reading the configuration runs on_configure
    settings: Settings = celery_app.dualstream_settings
    return settings


def _process(task: Task, payload: Any) -> dict[str, Any]:
    request = task.request
    delivery = request.delivery_info or {}
    queue = delivery.get("routing_key")
    try:
        settings = app_settings(task.app)
        outcome = get_runtime(settings).policy.handle(
            payload, message_id=str(request.id), attempt=int(request.retries) + 1,
            queue=queue, redelivered=bool(delivery.get("redelivered")))
        for message in outcome.resend:
            task.app.send_task(TASK_NAME, args=[message], queue=queue)
    except Exception as exc:
        log.warning("message %s not handled (%s: %s): requeueing it", request.id,
                    type(exc).__name__, exc)
        raise Reject(f"{type(exc).__name__}: {exc}", requeue=True) from exc
    if outcome.requeue is not None:
        log.info("message %s requeued: %s", request.id, outcome.requeue)
        raise Reject(f"requeued: {outcome.requeue}", requeue=True)
    if outcome.retry is not None:
        _retry(task, settings, outcome)
    return {"dead_lettered": outcome.dead_lettered, "split": len(outcome.resend)}


def _retry(task: Task, settings: Settings, outcome: Outcome) -> None:
    retries = int(task.request.retries)
    countdown = outcome.retry_after_s or get_exponential_backoff_interval(
        factor=settings.retry_backoff_s, retries=retries, maximum=MAX_BACKOFF_S,
        full_jitter=True)
    countdown = min(countdown, settings.visibility_timeout_s * MAX_COUNTDOWN_FRACTION)
    try:
        raise task.retry(exc=outcome.retry, countdown=countdown)
    except Reject as exc:  # Celery could not publish the retry and would drop the message
        raise Reject(exc.reason, requeue=True) from exc


class Consumer(CeleryConsumer):
    """Celery's consumer; messages that never reach the task are also kept as dead letters.

    Celery logs and drops a body that does not decode, a refused content type (pickle) and a
    message that is not a task message. The payload is never deserialised: its bytes are kept,
    base64-encoded, with the content type it claimed.
    """

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        _dead_letter_undecodable(self.app, message, f"the body does not decode: {exc}")
        super().on_decode_error(message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        _dead_letter_undecodable(self.app, message, f"refused: {type(exc).__name__}: {exc}")
        super().on_invalid_task(body, message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        _dead_letter_undecodable(self.app, message, "not a task message")
        super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        _dead_letter_undecodable(self.app, message, f"unknown task: {exc}")
        super().on_unknown_task(body, message, exc)


def _dead_letter_undecodable(app: Celery, message: Any, error: str) -> None:
    headers = getattr(message, "headers", None)
    delivery = getattr(message, "delivery_info", None)
    try:
        get_runtime(app_settings(app)).policy.reject_undecodable(
            body=bytes(message.body) if message.body is not None else None,
            content_type=message.content_type, error=error,
            message_id=str(headers["id"]) if isinstance(headers, dict) and "id" in headers
            else None,
            queue=delivery.get("routing_key") if isinstance(delivery, dict) else None)
    except Exception:  # Celery still logs and drops it
        log.exception("could not dead-letter an undecodable message")


@worker_init.connect
def _build_runtime(sender: Any, **_: Any) -> None:
    """Load the model and connect to its services before the consumer takes any message.

    A worker that cannot build its runtime (a model that does not load, an unusable output
    location) exits with status 1 instead of taking messages it could only put back. A
    prefork pool builds one per child instead, on its first message (CUDA must not be
    initialised before a fork).
    """
    app = sender.app
    if not hasattr(app, "dualstream_settings") or app.conf.worker_pool == "prefork":
        return  # not a dualstream app
    try:
        # Dead consumers' messages come back while the model loads, too.
        start_sweeper(app_settings(app))
        get_runtime(app_settings(app))
    except Exception as exc:
        log.critical("the worker cannot start: %s: %s", type(exc).__name__, exc,
                     exc_info=not isinstance(exc, ImportError))
        raise SystemExit(1) from exc  # Celery's signal dispatch swallows any Exception


@worker_shutting_down.connect
def _begin_drain(**_: Any) -> None:
    """SIGTERM (in the signal handler): stop starting messages; settle held ones in time."""
    runtime = existing_runtime()
    if runtime is not None:
        runtime.begin_drain()
    log.info("worker shutting down: draining held messages")


@worker_shutdown.connect
def _close_runtime(**_: Any) -> None:
    """After the pool has stopped: flush the pipeline's stages and drop readiness."""
    close_runtime()
