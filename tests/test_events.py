"""Upload events read exactly as each source defines them: every envelope, keys decoded once by
the source's rule, versions and ETags kept, metadata-only and test events ignored with a
reason, a broken record dead-lettered beside siblings that go on. The table is pure; the
submitter is checked on a real Redis."""

from __future__ import annotations

import json
import unicodedata
from typing import Any

import pytest
import redis

from control.deadletters import DeadLetterStore
from control.objects import S3Location
from producer.client import Client
from producer.event_records import Broken, Confirm, Ignored
from producer.event_sources import EventSubmitter
from producer.events import Enqueue, EventJobTemplate, plan
from producer.sns_confirm import SubscriptionConfirmer
from schemas.errors import ErrorCode, TransientError
from schemas.keys import RedisKeys, queue_name
from schemas.settings import Settings
from tests.fixtures.event_bodies import (
    BUCKET,
    ETAG,
    SUBSCRIBE_URL,
    TEST_EVENT,
    VERSION,
    aws_key,
    eventbridge,
    minio_access,
    minio_record,
    minio_webhook,
    s3_event,
    s3_record,
    sns_notification,
    sns_subscription,
)
from tests.fixtures.faults import message_jobs

MODEL = "tiny/model"
EVERY_KEY = EventJobTemplate(model=MODEL, suffixes=())


def expect(action: Any) -> tuple[Any, ...]:
    """An action as the table writes it."""
    if isinstance(action, Enqueue):
        obj = action.object
        return ("enqueue", obj.bucket, obj.key, obj.version, obj.etag)
    if isinstance(action, Ignored):
        return ("ignore", action.reason)
    if isinstance(action, Confirm):
        return ("confirm", action.url)
    assert isinstance(action, Broken)
    return ("dead-letter", action.reason)


def enqueue(key: str, version: str | None = VERSION, bucket: str = BUCKET,
            etag: str | None = ETAG) -> tuple[Any, ...]:
    return ("enqueue", bucket, key, version, etag)


def dead(reason: str) -> tuple[str, str]:
    return ("dead-letter", reason)


PUT = s3_record("HappyFace.jpg")
CASES: list[tuple[str, Any, list[tuple[Any, ...]]]] = [
    ("s3 2.1 record, versioned", s3_event(PUT), [enqueue("HappyFace.jpg")]),
    ("s3 2.2 copy, ETag in quotes", s3_event(s3_record(
        "copy.jpg", event="ObjectCreated:Copy", event_version="2.2", etag=f'"{ETAG}"')),
     [enqueue("copy.jpg")]),
    ("s3 post and multipart upload", s3_event(
        s3_record("a.jpg", event="ObjectCreated:Post"),
        s3_record("b.jpg", event="ObjectCreated:CompleteMultipartUpload", version=None)),
     [enqueue("a.jpg"), enqueue("b.jpg", version=None)]),
    ("unversioned bucket", s3_event(s3_record("u.jpg", version=None)),
     [enqueue("u.jpg", version=None)]),
    ("sqs body (a string)", json.dumps(s3_event(PUT)), [enqueue("HappyFace.jpg")]),
    ("sqs body as bytes", json.dumps(s3_event(PUT)).encode(), [enqueue("HappyFace.jpg")]),
    ("s3 test event", json.dumps(TEST_EVENT), [("ignore", "test_event")]),
    ("removals and restores", s3_event(
        s3_record("a.jpg", event="ObjectRemoved:Delete"),
        s3_record("a.jpg", event="ObjectRemoved:DeleteMarkerCreated"),
        s3_record("a.jpg", event="ObjectRestore:Completed", event_version="2.3")),
     [("ignore", "not_created")] * 3),
    ("tagging and acl (s3 2.3)", s3_event(
        s3_record("a.jpg", event="ObjectTagging:Put", event_version="2.3"),
        s3_record("a.jpg", event="ObjectAcl:Put", event_version="2.3")),
     [("ignore", "metadata_only")] * 2),
    ("duplicate records", s3_event(PUT, PUT), [enqueue("HappyFace.jpg")] * 2),
    ("sns notification", sns_notification(s3_event(PUT)), [enqueue("HappyFace.jpg")]),
    ("sns-wrapped test event", sns_notification(TEST_EVENT), [("ignore", "test_event")]),
    ("sns subscription", sns_subscription(), [("confirm", SUBSCRIBE_URL)]),
    ("sns unsubscribe", sns_subscription("UnsubscribeConfirmation"),
     [("ignore", "unsubscribe_confirmation")]),
    ("sns message not a string", {"Type": "Notification", "Message": {"Records": []}},
     [dead("an SNS Notification whose Message is not a string")]),
    ("eventbridge object created", eventbridge("dir/HappyFace.jpg"),
     [enqueue("dir/HappyFace.jpg")]),
    ("eventbridge unversioned", eventbridge("x.jpg", version=None),
     [enqueue("x.jpg", version=None)]),
    ("eventbridge deleted", eventbridge("x.jpg", detail_type="Object Deleted"),
     [("ignore", "not_created")]),
    ("eventbridge tags", eventbridge("x.jpg", detail_type="Object Tags Added"),
     [("ignore", "metadata_only")]),
    ("eventbridge from elsewhere", {**eventbridge("x.jpg"), "source": "aws.ec2"},
     [dead("not an S3 EventBridge event (source 'aws.ec2')")]),
    ("minio webhook", minio_webhook("dir/photo.jpg"),
     [enqueue("dir/photo.jpg", bucket="images")]),
    ("minio metadata-only names", {"Records": [
        minio_record("a.jpg", event=f"s3:ObjectCreated:{name}")
        for name in ("PutTagging", "PutRetention", "PutLegalHold", "DeleteTagging")]},
     [("ignore", "metadata_only")] * 4),
    ("minio content names", {"Records": [
        minio_record("a.jpg", event=f"s3:ObjectCreated:{name}")
        for name in ("Put", "Post", "Copy", "CompleteMultipartUpload")]},
     [enqueue("a.jpg", bucket="images")] * 4),
    ("minio removal", minio_webhook("a.jpg", event="s3:ObjectRemoved:Delete"),
     [("ignore", "not_created")]),
    ("minio redis access element", json.dumps(minio_access(minio_record("dir/x y.png"))),
     [enqueue("dir/x y.png", bucket="images")]),
    ("minio redis, a broken entry beside a good one",
     [*minio_access(minio_record("ok.png")), {"EventTime": "x"}],
     [enqueue("ok.png", bucket="images"),
      dead("a MinIO access-format entry without an Event list")]),
    ("a bad record beside a good one", s3_event(PUT, {"eventVersion": "2.1", "eventName": 1}),
     [enqueue("HappyFace.jpg"), dead("not an S3 event record (eventName: Input should be a "
                                      "valid string)")]),
    ("eventVersion 3", s3_event(s3_record("a.jpg", event_version="3.0"), PUT),
     [dead("unsupported eventVersion '3.0'"), enqueue("HappyFace.jpg")]),
    ("a key that is not UTF-8", s3_event(s3_record("%FF.jpg")),
     [dead("the key does not decode to UTF-8")]),
    ("an empty key", s3_event(s3_record("")), [dead("the key is empty")]),
    ("not json", "not json", [dead("the body is not JSON")]),
    ("not utf-8", b"\xff\xfe", [dead("the body is not JSON")]),
    ("an empty object", "{}",
     [dead("not an upload event: no Records, SNS Type or EventBridge detail")]),
    ("a json scalar", "3", [dead("an event is a JSON object (or MinIO's access-format list)")]),
    ("no records", s3_event(), []),
]


@pytest.mark.parametrize(("body", "expected"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_each_record_gets_the_action_its_source_defines(body: Any,
                                                        expected: list[tuple[Any, ...]]) -> None:
    assert [expect(action) for action in plan(body, EVERY_KEY)] == expected


# Keys that an encoder or a URL parser could change: `?`, `#`, `%`, `+`, spaces, leading and
# trailing `/` and spaces, a newline, NFD, CJK, and 1,024 bytes.
KEYS = ["what?.jpg", "a#b.jpg", "100%.jpg", "%41.jpg", "a+b.jpg", "my cat.jpg",
        "/leading/slash.jpg", "trailing/", "dir//double.jpg", " spaced .jpg ", "line\nbreak.jpg",
        unicodedata.normalize("NFD", "café.jpg"), "猫/写真 1.jpg", "長" * 340 + ".jpg"]
assert len(KEYS[-1].encode()) == 1024

SOURCES = {
    "s3": lambda key: s3_event(s3_record(aws_key(key))),
    "sqs": lambda key: json.dumps(s3_event(s3_record(aws_key(key)))),
    "sns": lambda key: json.dumps(sns_notification(s3_event(s3_record(aws_key(key))))),
    "eventbridge": lambda key: json.dumps(eventbridge(key)),
    "minio-webhook": lambda key: json.dumps(minio_webhook(key, bucket=BUCKET)),
    "minio-redis": lambda key: json.dumps(minio_access(minio_record(key, bucket=BUCKET))),
}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("key", KEYS, ids=range(len(KEYS)))
def test_keys_are_decoded_once_by_their_sources_rule_and_kept_byte_for_byte(
    source: str, key: str
) -> None:
    [action] = plan(SOURCES[source](key), EVERY_KEY)
    assert expect(action) == enqueue(key)
    assert isinstance(action, Enqueue)
    assert action.job.version == VERSION and action.job.etag == ETAG
    assert S3Location.parse(action.job.image or "") == S3Location(BUCKET, key)


def test_only_image_keys_become_jobs_and_versions_are_separate_jobs() -> None:
    template = EventJobTemplate(model=MODEL)
    [text, image] = plan(s3_event(s3_record("notes.txt"), s3_record("a.JPG")), template)
    assert text == Ignored("not_an_image") and isinstance(image, Enqueue)
    [v1, v2, again] = plan(s3_event(s3_record("a.jpg", version="v1"),
                                    s3_record("a.jpg", version="v2"),
                                    s3_record("a.jpg", version="v1")), template)
    assert isinstance(v1, Enqueue) and isinstance(v2, Enqueue) and isinstance(again, Enqueue)
    assert v1.job.job_id == again.job.job_id != v2.job.job_id


# The submitter, on a real Redis -------------------------------------------------------------
class FakeSNS:
    def __init__(self, status: int | Exception = 200) -> None:
        self.status = status
        self.fetched: list[str] = []

    def __call__(self, url: str) -> int:
        self.fetched.append(url)
        if isinstance(self.status, Exception):
            raise self.status
        return self.status


def submitter(redis_url: str, sns: FakeSNS | None = None,
              hosts: tuple[str, ...] = ()) -> EventSubmitter:
    client = Client(Settings(redis_url=redis_url, model=MODEL))
    return EventSubmitter(client, EventJobTemplate(model=MODEL),
                          DeadLetterStore(client.redis, RedisKeys()),
                          SubscriptionConfirmer(hosts, sns or FakeSNS()))


def queued_jobs(redis_url: str) -> list[dict[str, Any]]:
    raw = redis.Redis.from_url(redis_url).lrange(queue_name(MODEL), 0, -1)
    return [job for message in raw for job in message_jobs(message)]


def test_a_delivery_enqueues_its_jobs_once_dead_letters_its_broken_records_and_counts_the_rest(
    redis_url: str
) -> None:
    events = submitter(redis_url)
    body = json.dumps(s3_event(PUT, PUT, {"eventName": 1}, s3_record("notes.txt"),
                               s3_record("a.jpg", event="ObjectTagging:Put")))
    summary = events.handle(body, source="sqs://q", delivery="m-1")
    assert summary.as_dict() == {"jobs": 1, "dead_lettered": 1, "confirmed": 0,
                                 "ignored": {"metadata_only": 1, "not_an_image": 1}}
    [job] = queued_jobs(redis_url)
    assert (job["image"], job["version"], job["etag"]) == (
        f"s3://{BUCKET}/HappyFace.jpg", VERSION, ETAG)
    [letter] = events.dead_letters.list()
    assert letter.code == ErrorCode.INVALID_JOB and letter.payload == {"eventName": 1}
    assert letter.error.startswith("not an S3 event record") and letter.message_id == "m-1"

    events.handle(body, source="sqs://q", delivery="m-1")  # redelivered
    assert len(queued_jobs(redis_url)) == 1 and len(events.dead_letters.list()) == 1
    assert events.stats.jobs == 2 and events.stats.ignored["not_an_image"] == 2


def test_a_subscription_is_confirmed_only_on_snss_own_https_hosts(redis_url: str) -> None:
    sns = FakeSNS()
    events = submitter(redis_url, sns)
    assert events.handle(sns_subscription(), source="webhook").confirmed == 1
    assert sns.fetched == [SUBSCRIBE_URL]
    for url in ("http://sns.us-west-2.amazonaws.com/?Action=ConfirmSubscription",
                "https://sns.us-west-2.amazonaws.com.evil.example/",
                "https://user@sns.us-west-2.amazonaws.com/", "https://169.254.169.254/",
                "file:///etc/passwd"):
        summary = events.handle(sns_subscription(url=url), source="webhook", delivery=url)
        assert summary.dead_lettered == 1
    assert sns.fetched == [SUBSCRIBE_URL]
    assert {letter.code for letter in events.dead_letters.list()} == {
        ErrorCode.SOURCE_NOT_ALLOWED}
    allowed = submitter(redis_url, sns, hosts=("sns.internal.example",))
    allowed.handle(sns_subscription(url="https://sns.internal.example/confirm"), source="w")
    assert sns.fetched[-1] == "https://sns.internal.example/confirm"


def test_a_confirmation_sns_does_not_answer_is_retried_and_one_it_refuses_dead_lettered(
    redis_url: str
) -> None:
    with pytest.raises(TransientError):
        submitter(redis_url, FakeSNS(OSError("unreachable"))).handle(
            sns_subscription(), source="w")
    with pytest.raises(TransientError):
        submitter(redis_url, FakeSNS(503)).handle(sns_subscription(), source="w")
    refused = submitter(redis_url, FakeSNS(403))
    assert refused.handle(sns_subscription(), source="w").dead_lettered == 1
    assert [letter.code for letter in refused.dead_letters.list()] == [ErrorCode.ACCESS_DENIED]
