"""Upload events: every envelope parsed, keys decoded as each sender encodes them, and the
SQS and webhook sources enqueue jobs on a real Redis (SQS is moto's server over HTTP)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from control.deadletters import DeadLetterStore
from producer.client import Client
from producer.event_sources import EventSubmitter, poll_sqs, webhook_server
from producer.events import CreatedObject, EventJobTemplate, parse_event
from schemas.errors import InvalidJob
from schemas.keys import RedisKeys, queue_name
from schemas.settings import Settings

MODEL = "tiny/model"


def s3_record(key: str, event: str = "ObjectCreated:Put", etag: str = "e1") -> dict[str, Any]:
    return {"eventName": event, "s3": {"bucket": {"name": "photos"},
                                       "object": {"key": key, "size": 10, "eTag": etag}}}


def test_s3_notification_keys_are_url_decoded() -> None:
    event = {"Records": [s3_record("summer/my+cat%C3%A9.jpg")]}
    assert parse_event(json.dumps(event)) == [
        CreatedObject("photos", "summer/my caté.jpg", "e1", 10)]


def test_sns_wrapped_notifications_are_unwrapped() -> None:
    inner = json.dumps({"Records": [s3_record("a/b.jpg")]})
    envelope = {"Type": "Notification", "Message": inner}
    assert parse_event(envelope)[0].key == "a/b.jpg"


def test_minio_keys_have_their_slashes_decoded() -> None:
    event = {"EventName": "s3:ObjectCreated:Put", "Key": "photos/dir/x y.png",
             "Records": [s3_record("dir%2Fx+y.png")]}
    assert parse_event(event)[0].key == "dir/x y.png"


def test_eventbridge_keys_are_taken_as_they_are() -> None:
    event = {"source": "aws.s3", "detail-type": "Object Created",
             "detail": {"bucket": {"name": "photos"},
                        "object": {"key": "a+b%20c.jpg", "etag": "x", "size": 3}}}
    assert parse_event(event) == [CreatedObject("photos", "a+b%20c.jpg", "x", 3)]


def test_deletions_and_test_events_make_no_jobs() -> None:
    assert parse_event({"Records": [s3_record("a.jpg", "ObjectRemoved:Delete")]}) == []
    assert parse_event({"Event": "s3:TestEvent", "Bucket": "photos"}) == []
    assert parse_event({"source": "aws.s3", "detail-type": "Object Deleted", "detail": {}}) == []


@pytest.mark.parametrize("body", ["not json", "[]", "{}", '{"Records": [{"eventName": 1}]}'])
def test_non_events_are_invalid(body: str) -> None:
    with pytest.raises(InvalidJob):
        parse_event(body)


def test_each_upload_is_one_job_and_a_reupload_is_another() -> None:
    template = EventJobTemplate(model=MODEL)
    first = template.jobs([CreatedObject("photos", "a.jpg", "e1", 1)])
    again = template.jobs([CreatedObject("photos", "a.jpg", "e1", 1)])
    changed = template.jobs([CreatedObject("photos", "a.jpg", "e2", 1)])
    assert first[0].job_id == again[0].job_id != changed[0].job_id
    assert template.jobs([CreatedObject("photos", "notes.txt", "e", 1)]) == []


@pytest.fixture
def submitter(redis_url: str) -> EventSubmitter:
    client = Client(Settings(redis_url=redis_url, model=MODEL))
    return EventSubmitter(client, EventJobTemplate(model=MODEL),
                          DeadLetterStore(client.redis, RedisKeys()))


def queued(redis_url: str) -> int:
    return int(redis.Redis.from_url(redis_url).llen(queue_name(MODEL)))


def test_sqs_events_become_queued_jobs_and_are_deleted(s3_endpoint: str, redis_url: str,
                                                       submitter: EventSubmitter) -> None:
    import boto3

    sqs = boto3.client("sqs", endpoint_url=s3_endpoint, region_name="us-east-1")
    url = sqs.create_queue(QueueName="uploads")["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(
        {"Records": [s3_record("a.jpg"), s3_record("b.jpg")]}))
    sqs.send_message(QueueUrl=url, MessageBody="garbage")
    handled = 0
    for _ in range(5):
        handled += poll_sqs(sqs, url, submitter, wait_s=1, once=True)
        if handled == 2:
            break
    assert handled == 2
    assert queued(redis_url) == 1  # one message carrying both jobs
    assert [d.code for d in submitter.dead_letters.list()] == ["invalid_job"]
    assert "Messages" not in sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0)


@pytest.fixture
def webhook(submitter: EventSubmitter) -> Iterator[str]:
    import threading

    server = webhook_server(0, submitter, token="s3cret", host="127.0.0.1")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def post(url: str, body: bytes, token: str | None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, method="POST")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_webhook_enqueues_minio_events_and_refuses_bad_ones(webhook: str,
                                                                redis_url: str) -> None:
    event = json.dumps({"EventName": "s3:ObjectCreated:Put",
                        "Records": [s3_record("dir%2Fcat.jpg")]}).encode()
    assert post(webhook, event, token=None)[0] == 401
    status, body = post(webhook, event, token="s3cret")
    assert status == 200 and len(body["jobs"]) == 1
    assert queued(redis_url) == 1
    status, body = post(webhook, b"{oops", token="s3cret")
    assert status == 400 and body["code"] == "invalid_job"
