"""Upload events → what to do with each record: enqueue a job, ignore it (and why), confirm an
SNS subscription, or dead-letter it (and why).

Every envelope a notification arrives in is unwrapped here: S3 event records (directly, as an
SQS message's body, or as an SNS Notification's `Message` string), S3's test event, SNS
subscription messages, EventBridge `aws.s3` events, MinIO's webhook bodies and the elements
of MinIO's Redis target in its access format (`[{"Event": [record], "EventTime": …}]`). The
records themselves are read in `producer/event_records.py`. Each record stands alone: a broken
one is dead-lettered beside siblings that go on.

A job's id includes the object's version and ETag, so the same event delivered twice is one
job, and each version of an object is its own.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from producer.bulk import IMAGE_SUFFIXES
from producer.event_records import (
    Broken,
    Confirm,
    CreatedObject,
    Ignored,
    Outcome,
    from_eventbridge,
    from_s3_record,
)
from schemas.jobs import Job, Task, ZeroShotOptions

_SNS_TYPES = frozenset({"Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation"})


def parse_event(body: str | bytes | Any) -> list[Outcome]:
    """Every record of one event body, whatever its envelope; never raises."""
    if isinstance(body, str | bytes):
        try:
            return _envelope(json.loads(body))
        except ValueError:  # not JSON, or not UTF-8
            text = body.decode(errors="replace") if isinstance(body, bytes) else body
            return [Broken("the body is not JSON", text)]
    return _envelope(body)


def _envelope(event: Any) -> list[Outcome]:
    if isinstance(event, list):
        return _minio_access(event)
    if not isinstance(event, dict):
        return [Broken("an event is a JSON object (or MinIO's access-format list)", event)]
    if event.get("Type") in _SNS_TYPES:
        return _sns(event)
    if "detail-type" in event:
        if event.get("source") != "aws.s3":
            return [Broken(f"not an S3 EventBridge event (source {event.get('source')!r})",
                           event)]
        return [from_eventbridge(event["detail-type"], event.get("detail"))]
    if event.get("Event") == "s3:TestEvent":
        return [Ignored("test_event")]
    records = event.get("Records")
    if isinstance(records, list):  # S3 (direct, SQS) and MinIO's webhook
        return [from_s3_record(record) for record in records]
    return [Broken("not an upload event: no Records, SNS Type or EventBridge detail", event)]


def _sns(envelope: dict[str, Any]) -> list[Outcome]:
    kind = envelope["Type"]
    if kind == "UnsubscribeConfirmation":
        return [Ignored("unsubscribe_confirmation")]
    if kind == "SubscriptionConfirmation":
        url = envelope.get("SubscribeURL")
        if not isinstance(url, str):
            return [Broken("a SubscriptionConfirmation without a SubscribeURL", envelope)]
        topic = envelope.get("TopicArn")
        return [Confirm(url, topic if isinstance(topic, str) else None)]
    message = envelope.get("Message")
    if not isinstance(message, str):
        return [Broken("an SNS Notification whose Message is not a string", envelope)]
    return parse_event(message)


def _minio_access(elements: list[Any]) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for element in elements:
        records = element.get("Event") if isinstance(element, dict) else None
        if not isinstance(records, list):
            outcomes.append(Broken("a MinIO access-format entry without an Event list",
                                   element))
            continue
        outcomes += [from_s3_record(record) for record in records]
    return outcomes


@dataclass(frozen=True)
class Enqueue:
    job: Job
    object: CreatedObject


Action = Enqueue | Ignored | Broken | Confirm


@dataclass(frozen=True)
class EventJobTemplate:
    """What to compute for each uploaded object; `suffixes` empty: every key."""

    model: str
    zero_shot: ZeroShotOptions | None = None
    suffixes: Sequence[str] = IMAGE_SUFFIXES
    return_embedding: bool = False

    def action(self, obj: CreatedObject) -> Enqueue | Ignored | Broken:
        wanted = tuple(suffix.lower() for suffix in self.suffixes)
        if wanted and not obj.key.lower().endswith(wanted):
            return Ignored("not_an_image")
        task = Task.ZERO_SHOT if self.zero_shot else Task.IMAGE_EMBEDDING
        try:
            job = Job(task=task, model=self.model, image=obj.uri, etag=obj.etag,
                      version=obj.version, zero_shot=self.zero_shot,
                      return_embedding=self.return_embedding)
        except ValidationError as exc:
            return Broken(f"no job can name this object: {exc.errors()[0]['msg']}",
                          dataclasses.asdict(obj))
        return Enqueue(job, obj)


def plan(body: str | bytes | Any, template: EventJobTemplate) -> list[Action]:
    """What to do with each record of one event body."""
    return [template.action(outcome) if isinstance(outcome, CreatedObject) else outcome
            for outcome in parse_event(body)]
