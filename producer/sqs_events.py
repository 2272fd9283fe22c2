"""Upload events from an SQS queue (fed by S3 notifications, SNS or EventBridge).

A message is deleted only after its delivery was handled (jobs enqueued, broken records
dead-lettered), in one DeleteMessageBatch per receive. A fault while handling one (Redis down,
anything unexpected) leaves it and the rest of its receive undeleted: SQS delivers them again
once their visibility timeout ends, and the loop goes on after a pause.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from producer.event_sources import EventStats, EventSubmitter

log = logging.getLogger(__name__)
MAX_PER_RECEIVE = 10  # SQS's limit, for ReceiveMessage and DeleteMessageBatch alike


def poll_sqs(sqs: Any, queue_url: str, submitter: EventSubmitter, *,
             stop: threading.Event | None = None, wait_s: int = 20, once: bool = False,
             pause_s: float = 1.0) -> EventStats:
    """Long-poll SQS until stopped (or one receive with `once`); what was handled."""
    stop = stop or threading.Event()
    while not stop.is_set():
        clean = _receive_once(sqs, queue_url, submitter, wait_s)
        if once:
            break
        if not clean:
            stop.wait(pause_s)
    return submitter.stats


def _receive_once(sqs: Any, queue_url: str, submitter: EventSubmitter, wait_s: int) -> bool:
    """One receive, handled and deleted; False after a fault."""
    try:
        response = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=MAX_PER_RECEIVE,
                                       WaitTimeSeconds=wait_s)
    except (BotoCoreError, ClientError) as exc:
        log.warning("receiving from %s failed, will retry: %s", queue_url, exc)
        return False
    handled: list[dict[str, Any]] = []
    for message in response.get("Messages", []):
        try:
            submitter.handle(message.get("Body", ""), source=queue_url,
                             delivery=message.get("MessageId"))
        except Exception:
            log.exception("an event from %s could not be handled; it stays on the queue",
                          queue_url)
            break  # the rest of the receive is redelivered too, after its visibility timeout
        handled.append(message)
    return _delete(sqs, queue_url, handled) and len(handled) == len(response.get("Messages", []))


def _delete(sqs: Any, queue_url: str, messages: Sequence[dict[str, Any]]) -> bool:
    """Delete handled messages; one not deleted is delivered again (its jobs are not sent
    twice: same ids)."""
    if not messages:
        return True
    entries = [{"Id": str(index), "ReceiptHandle": message["ReceiptHandle"]}
               for index, message in enumerate(messages)]
    try:
        response = sqs.delete_message_batch(QueueUrl=queue_url, Entries=entries)
    except (BotoCoreError, ClientError) as exc:
        log.warning("deleting %d handled messages from %s failed: %s", len(entries), queue_url,
                    exc)
        return False
    for failure in response.get("Failed", []):
        log.warning("SQS did not delete a handled message from %s: %s", queue_url, failure)
    return not response.get("Failed")

