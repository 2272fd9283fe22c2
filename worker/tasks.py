"""The one Celery task: hand a message's jobs to the runtime, then ack, retry, requeue or
dead-letter; and the consumer that dead-letters messages which never reach the task.

A message is acknowledged only when the task returns. Every other way out of the task puts the
message back: a retry publishes its successor before the original is acknowledged, and
anything that goes wrong (Redis unreachable, a retry that cannot be published) rejects it with
requeue. Where even that cannot reach Redis, the message stays unacknowledged and comes back
after the visibility timeout. Celery acknowledges a message whose task raised any other
exception (`task_acks_on_failure_or_timeout`), which would lose it, so none escapes.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down
from celery.utils.time import get_exponential_backoff_interval
from celery.worker.consumer import Consumer as CeleryConsumer

from schemas.keys import TASK_NAME

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60
# A retry's countdown is spent holding the new message unacknowledged (Celery keeps ETA
# messages in memory), so it is capped at this share of the visibility timeout.
MAX_COUNTDOWN_FRACTION = 0.25


def register(app: Celery) -> None:
    @app.task(name=TASK_NAME, bind=True, max_retries=None)
    def process(self: Task, payload: Any) -> dict[str, Any]:
        return _process(self, payload)

    _ = process


def _process(task: Task, payload: Any) -> dict[str, Any]:
    from worker.celery_app import app_settings
    from worker.runtime import get_runtime

    settings = app_settings(task.app)
    request = task.request
    queue = (request.delivery_info or {}).get("routing_key")
    try:
        outcome = get_runtime(settings).handle(payload, message_id=str(request.id),
                                               attempt=int(request.retries) + 1, queue=queue)
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
        countdown = outcome.retry_after_s or get_exponential_backoff_interval(
            factor=settings.retry_backoff_s, retries=int(request.retries),
            maximum=MAX_BACKOFF_S, full_jitter=True)
        countdown = min(countdown, settings.visibility_timeout_s * MAX_COUNTDOWN_FRACTION)
        try:
            raise task.retry(exc=outcome.retry, countdown=countdown)
        except Reject as exc:  # Celery could not publish the retry and would drop the message
            raise Reject(exc.reason, requeue=True) from exc
    return {"dead_lettered": outcome.dead_lettered, "split": len(outcome.resend)}


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
    from worker.celery_app import app_settings
    from worker.runtime import get_runtime

    headers = getattr(message, "headers", None)
    delivery = getattr(message, "delivery_info", None)
    try:
        get_runtime(app_settings(app)).reject_undecodable(
            body=bytes(message.body) if message.body is not None else None,
            content_type=message.content_type, error=error,
            message_id=str(headers["id"]) if isinstance(headers, dict) and "id" in headers
            else None,
            queue=delivery.get("routing_key") if isinstance(delivery, dict) else None)
    except Exception:  # Celery still logs and drops it
        log.exception("could not dead-letter an undecodable message")


@worker_ready.connect
def _warm_up(sender: Any, **_: Any) -> None:
    """Load the model before the first message arrives, in pools that do not fork.

    A worker that cannot build its runtime (a model that does not load, an unusable output
    location) stops with exit status 1 instead of taking messages it could only put back.
    """
    from worker.celery_app import app_settings
    from worker.runtime import get_runtime

    app = sender.app
    if not hasattr(app, "dualstream_settings") or app.conf.worker_pool == "prefork":
        return
    try:
        get_runtime(app_settings(app))
    except Exception as exc:
        log.critical("the worker cannot start (its model or services): exiting", exc_info=True)
        raise SystemExit(1) from exc  # Celery's signal dispatch swallows any Exception


@worker_shutting_down.connect
def _begin_drain(**_: Any) -> None:
    """SIGTERM (in the signal handler): stop starting messages; settle held ones in time."""
    from worker.runtime import existing_runtime

    runtime = existing_runtime()
    if runtime is not None:
        runtime.begin_drain(runtime.settings.drain_timeout_s)
    log.info("worker shutting down: draining held messages")


@worker_shutdown.connect
def _close_runtime(**_: Any) -> None:
    """After the pool has stopped: flush the pipeline's stages and drop readiness."""
    from worker.runtime import close_runtime

    close_runtime()
