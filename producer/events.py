"""Upload events → jobs: S3 notifications (direct, via SQS or SNS), EventBridge and MinIO.

Keys arrive URL-encoded from S3, SNS and MinIO (MinIO encodes `/` too) and plain from
EventBridge. Each created object becomes one job whose id includes the object's ETag, so the
same event delivered twice is one job, and a re-upload with new content is a new one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from pydantic import BaseModel, ConfigDict, ValidationError

from producer.bulk import IMAGE_SUFFIXES
from schemas.errors import InvalidJob
from schemas.jobs import Job, Task, ZeroShotOptions


@dataclass(frozen=True)
class CreatedObject:
    bucket: str
    key: str
    etag: str | None
    size: int | None

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class _Bucket(_Loose):
    name: str


class _Object(_Loose):
    key: str
    size: int | None = None
    etag: str | None = None
    eTag: str | None = None


class _S3Entity(_Loose):
    bucket: _Bucket
    object: _Object


class _S3Record(_Loose):
    eventName: str
    s3: _S3Entity


class _EventBridgeDetail(_Loose):
    bucket: _Bucket
    object: _Object


def _from_records(records: Sequence[Any]) -> Iterator[CreatedObject]:
    for raw in records:
        record = _S3Record.model_validate(raw)
        if "ObjectCreated" not in record.eventName:
            continue
        obj = record.s3.object
        yield CreatedObject(record.s3.bucket.name, unquote_plus(obj.key),
                            (obj.eTag or obj.etag or "").strip('"') or None, obj.size)


def parse_event(body: str | bytes | dict[str, Any]) -> list[CreatedObject]:
    """Every object-created record in one event body, whatever its envelope."""
    try:
        event = json.loads(body) if isinstance(body, str | bytes) else body
        if not isinstance(event, dict):
            raise InvalidJob(f"an event is a JSON object, got {type(event).__name__}")
        if event.get("Type") == "Notification" and "Message" in event:  # SNS envelope
            return parse_event(event["Message"])
        if event.get("source") == "aws.s3" and "detail" in event:  # EventBridge
            if event.get("detail-type") != "Object Created":
                return []
            detail = _EventBridgeDetail.model_validate(event["detail"])
            return [CreatedObject(detail.bucket.name, detail.object.key,
                                  detail.object.etag, detail.object.size)]
        if event.get("Event") == "s3:TestEvent":
            return []
        if "Records" in event:  # S3 (direct or through SQS) and MinIO
            return list(_from_records(event["Records"]))
    except (ValueError, ValidationError) as exc:
        raise InvalidJob(f"not an upload event: {exc}") from exc
    raise InvalidJob("not an upload event: no Records, SNS Message or EventBridge detail")


@dataclass(frozen=True)
class EventJobTemplate:
    """What to compute for each uploaded object."""

    model: str
    zero_shot: ZeroShotOptions | None = None
    suffixes: Sequence[str] = IMAGE_SUFFIXES
    return_embedding: bool = False

    def jobs(self, objects: Sequence[CreatedObject]) -> list[Job]:
        task = Task.ZERO_SHOT if self.zero_shot else Task.IMAGE_EMBEDDING
        wanted = tuple(s.lower() for s in self.suffixes)
        return [Job(task=task, model=self.model, image=obj.uri, etag=obj.etag,
                    zero_shot=self.zero_shot, return_embedding=self.return_embedding)
                for obj in objects if obj.key.lower().endswith(wanted)]
