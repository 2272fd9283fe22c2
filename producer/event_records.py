"""One S3 event record, or one EventBridge detail, read exactly as its source defines it.

What a record says becomes one outcome: an object whose content was created, an event that is
ignored (with a reason from `IGNORE_REASONS`), a subscription to confirm, or a broken record
(with what was wrong, and the record as received). Keys are decoded once, by the source's rule:
S3 records (direct, through SQS or SNS) and MinIO's URL-encode them with `+` for a space
(MinIO encodes `/` too); EventBridge sends them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.errors import ErrorCode

# Content-creating names, without MinIO's `s3:` prefix. `ObjectCreated:PutTagging`,
# `PutRetention`, `PutLegalHold` and `DeleteTagging` (MinIO) change metadata only.
CREATED = frozenset({"ObjectCreated:Put", "ObjectCreated:Post", "ObjectCreated:Copy",
                     "ObjectCreated:CompleteMultipartUpload"})
_METADATA = ("ObjectCreated:", "ObjectTagging:", "ObjectAcl:")
# EventBridge detail types that name a metadata change (every other one but `Object Created`
# is something else than a new object).
_METADATA_DETAIL = frozenset({"Object Tags Added", "Object Tags Deleted", "Object ACL Updated"})

IGNORE_REASONS = ("test_event", "metadata_only", "not_created", "not_an_image",
                  "unsubscribe_confirmation")


@dataclass(frozen=True)
class CreatedObject:
    bucket: str
    key: str
    version: str | None
    etag: str | None
    size: int | None = None

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class Ignored:
    reason: str  # one of IGNORE_REASONS


@dataclass(frozen=True)
class Broken:
    reason: str
    received: Any  # the record (or body) as it arrived
    code: ErrorCode = ErrorCode.INVALID_JOB


@dataclass(frozen=True)
class Confirm:
    """An SNS SubscriptionConfirmation: confirmed by fetching its SubscribeURL."""

    url: str
    topic: str | None


Outcome = CreatedObject | Ignored | Broken | Confirm


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class _Bucket(_Loose):
    name: str = Field(min_length=1)


class _S3Object(_Loose):
    key: str
    size: int | None = None
    eTag: str | None = None
    versionId: str | None = None


class _S3Entity(_Loose):
    bucket: _Bucket
    object: _S3Object


class _S3Record(_Loose):
    eventVersion: str
    eventName: str
    s3: _S3Entity


class _DetailObject(_Loose):
    key: str
    size: int | None = None
    etag: str | None = None
    eTag: str | None = None  # moto's spelling
    version_id: str | None = Field(default=None, alias="version-id")


class _Detail(_Loose):
    bucket: _Bucket
    object: _DetailObject


def _etag(raw: str | None) -> str | None:
    return (raw.strip('"') or None) if raw else None


def _ignored(name: str) -> Ignored:
    return Ignored("metadata_only" if name.startswith(_METADATA) else "not_created")


def _why(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


def from_s3_record(raw: Any) -> Outcome:
    """An S3 (or MinIO) event record: eventVersion 2.x, key URL-encoded with `+` for space."""
    try:
        record = _S3Record.model_validate(raw)
    except ValidationError as exc:
        return Broken(f"not an S3 event record ({_why(exc)})", raw)
    if not record.eventVersion.startswith("2."):
        return Broken(f"unsupported eventVersion {record.eventVersion!r}", raw)
    name = record.eventName.removeprefix("s3:")
    if name not in CREATED:
        return _ignored(name)
    obj = record.s3.object
    try:
        key = unquote_plus(obj.key, errors="strict")
    except UnicodeDecodeError:
        return Broken("the key does not decode to UTF-8", raw)
    if not key:
        return Broken("the key is empty", raw)
    return CreatedObject(record.s3.bucket.name, key, obj.versionId or None, _etag(obj.eTag),
                         obj.size)


def from_eventbridge(detail_type: Any, detail: Any) -> Outcome:
    """An EventBridge `aws.s3` event: the key is raw, the version is `version-id`."""
    if detail_type != "Object Created":
        return Ignored("metadata_only" if detail_type in _METADATA_DETAIL else "not_created")
    try:
        parsed = _Detail.model_validate(detail)
    except ValidationError as exc:
        return Broken(f"not an EventBridge S3 detail ({_why(exc)})", detail)
    obj = parsed.object
    if not obj.key:
        return Broken("the key is empty", detail)
    return CreatedObject(parsed.bucket.name, obj.key, obj.version_id or None,
                         _etag(obj.etag or obj.eTag), obj.size)
