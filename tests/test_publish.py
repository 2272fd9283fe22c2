"""The fast publisher sends the messages Celery's `send_task` would (control/publish.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from control.broker import producer_app
from control.publish import TaskPublisher
from control.transport import EnqueueNotReplicated
from producer.client import Client
from schemas.jobs import Job, Task, pack_message
from schemas.keys import TASK_NAME, queue_name
from schemas.settings import Settings

_PER_MESSAGE = {"id", "root_id", "correlation_id", "delivery_tag", "origin", "reply_to"}


def _fields(raw: bytes) -> dict[str, Any]:
    """A stored message, less what differs from one message to the next."""
    envelope = json.loads(raw)
    headers = {k: v for k, v in envelope.pop("headers").items() if k not in _PER_MESSAGE}
    properties = {k: v for k, v in envelope.pop("properties").items() if k not in _PER_MESSAGE}
    return {**envelope, "body": json.loads(envelope["body"]), "headers": headers,
            "properties": properties}


def test_a_published_message_is_the_one_send_task_sends(redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, model="m")
    client = redis.Redis.from_url(redis_url)
    queue = queue_name("m")
    argument = pack_message([Job(task=Task.TEXT_EMBEDDING, text=f"t{i}", model="m")
                             for i in range(3)], "run-1")
    app = producer_app(settings)
    with app.producer_or_acquire() as producer:
        app.send_task(TASK_NAME, args=[argument], queue=queue, producer=producer,
                      argsrepr="[<3 jobs>]", kwargsrepr="{}")
    TaskPublisher(client, settings).publish([(queue, argument), (queue, argument)])
    celery_made, *ours = [_fields(raw) for raw in client.lrange(queue, 0, -1)[::-1]]
    assert ours == [celery_made, celery_made]
    raw = json.loads(client.lindex(queue, 0))
    assert raw["headers"]["id"] == raw["headers"]["root_id"] == raw["properties"][
        "correlation_id"]
    assert raw["properties"]["delivery_tag"] != json.loads(client.lindex(queue, 1))[
        "properties"]["delivery_tag"]


def test_a_single_submission_is_one_round_trip_and_its_result_one_more(
        redis_url: str, monkeypatch: Any) -> None:
    """A single job's life in Redis: this publish, the worker's reservation and commit (one
    each per batch), and this read: four round trips."""
    client = Client(Settings(redis_url=redis_url, model="m"))
    job = Job(task=Task.TEXT_EMBEDDING, text="warm", model="m")
    client.submit(job)  # loads the script
    client.status(job.job_id)
    sent: list[int] = []
    send = redis.connection.Connection.send_packed_command

    def counted(self: redis.connection.Connection, *args: Any, **kwargs: Any) -> None:
        sent.append(1)
        send(self, *args, **kwargs)

    monkeypatch.setattr(redis.connection.Connection, "send_packed_command", counted)
    job_id = client.submit(Job(task=Task.TEXT_EMBEDDING, text="one", model="m"))
    assert len(sent) == 1
    assert client.results.get(job_id) is not None  # queued
    assert len(sent) == 2


def test_a_publish_whose_script_is_gone_when_it_arrives_is_sent_again(
        redis_url: str, monkeypatch: Any) -> None:
    """With replicas to wait for, the script goes in a pipeline, which redis-py checks for its
    script only before the first try: resent after a reconnection to a new primary (or a
    restarted Redis) it meets a server without it. Simulated here by emptying the script cache
    between the check and the send."""
    settings = Settings(redis_url=redis_url, model="m", redis_replicas_to_ack=1,
                        redis_replicas_ack_timeout_ms=10)
    client = redis.Redis.from_url(redis_url)
    queue = queue_name("m")
    client.delete(queue)
    check = redis.client.Pipeline.load_scripts
    flushed: list[bool] = []

    def check_then_lose_the_scripts(pipe: Any) -> None:
        check(pipe)
        if not flushed:
            flushed.append(True)
            redis.Redis.from_url(redis_url).script_flush()

    monkeypatch.setattr(redis.client.Pipeline, "load_scripts", check_then_lose_the_scripts)
    argument = pack_message([Job(task=Task.TEXT_EMBEDDING, text="t", model="m")], None)
    with pytest.raises(EnqueueNotReplicated):  # this Redis has no replica: the script ran
        TaskPublisher(client, settings).publish([(queue, argument)])
    assert flushed and client.llen(queue) == 1
