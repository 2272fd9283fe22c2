"""MinIO's Redis target (format=access) consumed without losing an element: each is moved into
the consumer's processing list in one command and leaves it only once its jobs are enqueued;
a consumer SIGKILLed in between handles it when it runs again, as one job."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from control.deadletters import DeadLetterStore
from producer.client import Client
from producer.event_sources import EventSubmitter
from producer.events import EventJobTemplate
from producer.minio_redis import MinioRedisConsumer
from schemas.keys import RedisKeys, queue_name
from schemas.settings import Settings
from tests.fixtures.event_bodies import minio_access, minio_record
from tests.fixtures.faults import message_jobs
from tests.fixtures.services import REPO, worker_env
from tests.test_events_sqs import FlakySubmitter
from worker.local import start_redis_server

MODEL = "tiny/model"
KEY = "minio-events"


def element(*names: str, event: str = "s3:ObjectCreated:Put") -> str:
    return json.dumps(minio_access(*(minio_record(name, event=event) for name in names)))


def queued_jobs(redis_url: str) -> list[dict[str, Any]]:
    raw = redis.Redis.from_url(redis_url).lrange(queue_name(MODEL), 0, -1)
    return [job for message in raw for job in message_jobs(message)]


def wait_for(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def submitter(redis_url: str) -> EventSubmitter:
    client = Client(Settings(redis_url=redis_url, model=MODEL))
    return EventSubmitter(client, EventJobTemplate(model=MODEL),
                          DeadLetterStore(client.redis, RedisKeys()))


def test_elements_become_jobs_and_leave_both_lists(redis_url: str) -> None:
    target = redis.Redis.from_url(redis_url)
    target.rpush(KEY, element("a.jpg", "dir/b c.png"),
                 element("a.jpg", event="s3:ObjectCreated:PutTagging"), "[{\"EventTime\": 1}]")
    consumer = MinioRedisConsumer(target, KEY, submitter(redis_url), block_s=1)
    while consumer.step():
        pass
    assert sorted(job["image"] for job in queued_jobs(redis_url)) == [
        "s3://images/a.jpg", "s3://images/dir/b c.png"]
    assert consumer.submitter.stats.as_dict() == {
        "jobs": 2, "dead_lettered": 1, "confirmed": 0, "ignored": {"metadata_only": 1}}
    assert target.llen(KEY) == 0 and target.llen(consumer.processing) == 0


def test_an_element_whose_handling_failed_is_retried_before_anything_new(
    redis_url: str
) -> None:
    target = redis.Redis.from_url(redis_url)
    target.rpush(KEY, element("first.jpg"), element("second.jpg"))
    plain = submitter(redis_url)
    consumer = MinioRedisConsumer(target, KEY, FlakySubmitter(
        plain.client, plain.template, plain.dead_letters), block_s=1)
    with pytest.raises(redis.ConnectionError):
        consumer.step()
    assert target.lrange(consumer.processing, 0, -1) == [element("first.jpg").encode()]
    assert consumer.step() and queued_jobs(redis_url)[0]["image"] == "s3://images/first.jpg"
    assert consumer.step() and len(queued_jobs(redis_url)) == 2


def start_consumer(target_url: str, jobs_url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "dualstream.cli", "events", "minio-redis", KEY,
         "--redis-url", target_url, "--consumer", "c1"],
        env=worker_env(redis_url=jobs_url, model=MODEL), cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_a_consumer_killed_between_taking_and_enqueueing_handles_the_element_once_restarted(
    redis_url: str
) -> None:
    target = redis.Redis.from_url(redis_url)  # MinIO's Redis
    jobs = start_redis_server()  # dualstream's, down while the element is taken
    jobs.stop()
    processing = f"{KEY}:dualstream-processing:c1"
    target.rpush(KEY, element("cat.jpg"))
    consumer = start_consumer(redis_url, jobs.url)
    try:
        # Taken: it is in the processing list, and its jobs cannot be enqueued yet.
        wait_for(lambda: target.llen(KEY) == 0 and target.llen(processing) == 1)
        time.sleep(0.5)
    finally:
        consumer.send_signal(signal.SIGKILL)
        consumer.wait(10)
    assert target.lrange(processing, 0, -1) == [element("cat.jpg").encode()]

    jobs = start_redis_server(port=jobs.port, directory=jobs.directory)
    target.rpush(KEY, element("cat.jpg"))  # MinIO delivered it again, too: the same job
    consumer = start_consumer(redis_url, jobs.url)
    try:
        wait_for(lambda: target.llen(processing) == 0 and target.llen(KEY) == 0
                 and len(queued_jobs(jobs.url)) == 1)
        time.sleep(1)  # nothing more comes
        [job] = queued_jobs(jobs.url)
        assert (job["image"], job["version"]) == ("s3://images/cat.jpg",
                                                  minio_record("cat.jpg")["s3"]["object"][
                                                      "versionId"])
    finally:
        consumer.send_signal(signal.SIGTERM)
        output = consumer.communicate(timeout=30)[0].decode()
        jobs.stop()
    assert consumer.returncode == 0, output
