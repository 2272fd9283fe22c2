"""The SQS consumer against moto's server over HTTP: S3 → SQS notifications of a versioned
bucket become one job per version through `dualstream events sqs`; a message is deleted only
after its jobs are enqueued, and a fault (Redis down) leaves it for redelivery."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from control.deadletters import DeadLetterStore
from producer.client import Client
from producer.event_sources import EventStats, EventSubmitter
from producer.events import EventJobTemplate
from producer.sqs_events import poll_sqs
from schemas.keys import RedisKeys, queue_name
from schemas.settings import Settings
from tests.fixtures.event_bodies import s3_event, s3_record
from tests.fixtures.faults import message_jobs
from tests.fixtures.services import REPO, worker_env
from worker.local import start_redis_server

MODEL = "tiny/model"


def queued_jobs(redis_url: str) -> list[dict[str, Any]]:
    raw = redis.Redis.from_url(redis_url).lrange(queue_name(MODEL), 0, -1)
    return [job for message in raw for job in message_jobs(message)]


def wait_for(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def in_queue(sqs: Any, url: str) -> tuple[int, int]:
    """(visible, in flight) messages."""
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return (int(attributes["ApproximateNumberOfMessages"]),
            int(attributes["ApproximateNumberOfMessagesNotVisible"]))


@pytest.fixture
def sqs(s3_endpoint: str) -> Any:
    import boto3

    return boto3.client("sqs", endpoint_url=s3_endpoint, region_name="us-east-1")


@pytest.fixture
def queue(sqs: Any) -> str:
    return str(sqs.create_queue(QueueName=f"uploads-{uuid.uuid4().hex[:8]}",
                                Attributes={"VisibilityTimeout": "1"})["QueueUrl"])


def submitter(redis_url: str) -> EventSubmitter:
    client = Client(Settings(redis_url=redis_url, model=MODEL))
    return EventSubmitter(client, EventJobTemplate(model=MODEL),
                          DeadLetterStore(client.redis, RedisKeys()))


@pytest.fixture
def versions_in_events(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto 5 leaves `versionId` (and `sequencer`) out of the S3 event records it sends; AWS
    writes it for every object of a versioned bucket (S3 event 2.1, `s3.object.versionId`).
    The server runs in this process, so its records are completed here as AWS writes them."""
    from moto.s3 import notifications

    original = notifications._get_s3_event

    def with_version(event_name: str, bucket: Any, key: Any, notification_id: str) -> Any:
        event = original(event_name, bucket, key, notification_id)
        if key.version_id and bucket.is_versioned:
            event["Records"][0]["s3"]["object"]["versionId"] = key.version_id
        return event

    monkeypatch.setattr(notifications, "_get_s3_event", with_version)


@pytest.mark.usefixtures("versions_in_events")
def test_each_version_uploaded_to_a_versioned_bucket_becomes_its_own_job(
    s3: Any, bucket: str, sqs: Any, queue: str, s3_endpoint: str, redis_url: str
) -> None:
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={
        "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]})
    key = "photos/my cat+dog?.jpg"
    uploads = [s3.put_object(Bucket=bucket, Key=key, Body=body) for body in (b"one", b"two")]

    consumer = subprocess.Popen(
        [sys.executable, "-m", "dualstream.cli", "events", "sqs", queue,
         "--endpoint-url", s3_endpoint, "--wait-s", "1"],
        env=worker_env(redis_url=redis_url, model=MODEL), cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(queued_jobs(redis_url)) == 2 and in_queue(sqs, queue) == (0, 0))
    finally:
        consumer.send_signal(signal.SIGTERM)
        output = consumer.communicate(timeout=30)[0].decode()
    assert consumer.returncode == 0, output
    jobs = queued_jobs(redis_url)
    assert sorted((job["image"], job["version"], job["etag"]) for job in jobs) == sorted(
        (f"s3://{bucket}/{key}", upload["VersionId"], upload["ETag"].strip('"'))
        for upload in uploads)
    assert "'test_event': 1" in output  # the test event S3 sends on configuration


class FlakySubmitter(EventSubmitter):
    """Fails its first `failures` deliveries as a Redis outage would."""

    failures = 1

    def handle(self, body: Any, *, source: str, delivery: str | None = None) -> EventStats:
        if self.failures:
            self.failures -= 1
            raise redis.ConnectionError("Redis is down")
        return super().handle(body, source=source, delivery=delivery)


def test_a_fault_leaves_the_message_and_its_batch_mates_for_redelivery(
    sqs: Any, queue: str, redis_url: str
) -> None:
    plain = submitter(redis_url)
    flaky = FlakySubmitter(plain.client, plain.template, plain.dead_letters)
    for name in ("a.jpg", "b.jpg"):
        sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(s3_event(s3_record(name))))
    stats = poll_sqs(sqs, queue, flaky, wait_s=1, once=True)  # the loop survives the fault
    assert stats.jobs == 0 and queued_jobs(redis_url) == []
    assert sum(in_queue(sqs, queue)) == 2  # nothing deleted
    wait_for(lambda: (poll_sqs(sqs, queue, flaky, wait_s=1, once=True).jobs == 2
                      and in_queue(sqs, queue) == (0, 0)), timeout=30)
    assert sorted(job["image"].rsplit("/", 1)[1] for job in queued_jobs(redis_url)) == [
        "a.jpg", "b.jpg"]


@pytest.fixture
def private_redis() -> Iterator[Any]:
    server = start_redis_server()
    yield server
    server.stop()


def test_nothing_is_lost_or_deleted_early_while_redis_is_down(sqs: Any, queue: str,
                                                              private_redis: Any) -> None:
    events = submitter(private_redis.url)
    private_redis.stop()
    sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(
        s3_event(s3_record("a.jpg"), s3_record("b.jpg"), {"eventName": "broken"})))
    stop = threading.Event()
    loop = threading.Thread(target=poll_sqs, args=(sqs, queue, events),
                            kwargs={"stop": stop, "wait_s": 1})
    loop.start()
    try:
        time.sleep(4)
        assert sum(in_queue(sqs, queue)) == 1  # taken, or back for redelivery: not deleted
        restarted = start_redis_server(port=private_redis.port,
                                       directory=private_redis.directory)
        try:
            wait_for(lambda: in_queue(sqs, queue) == (0, 0))
            assert len(queued_jobs(restarted.url)) == 2
            [letter] = events.dead_letters.list()
            assert letter.payload == {"eventName": "broken"}
        finally:
            stop.set()
            loop.join(30)
            restarted.stop()
    finally:
        stop.set()
