"""Scaling from zero never strands work: what a killed worker held comes back with no worker
running (`dualstream restore`), and `dualstream queue-load` counts it, held then queued."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.client import Client
from schemas.jobs import Job, Task
from schemas.keys import ShardPaths, queue_name
from schemas.results import Status
from schemas.settings import Settings
from tests.fixtures.faults import (
    committed_rows,
    held_messages,
    kill_tree,
    wait_for,
    worker_launcher,
)
from tests.fixtures.services import dualstream, worker_env
from tests.test_worker_e2e import upload_images

pytestmark = pytest.mark.timeout(300)
_ = worker_launcher  # a fixture

VISIBILITY_TIMEOUT_S = 6



def test_a_killed_workers_messages_are_restored_and_counted_with_no_worker_running(
        worker_launcher: Any, redis_url: str, s3_endpoint: str, s3: Any, bucket: str,
        tiny_model_dirs: dict[str, str], tmp_path: Path) -> None:
    model = tiny_model_dirs["openclip"]
    settings = {"redis_url": redis_url, "s3_endpoint_url": s3_endpoint, "model": model,
                "output_uri": f"s3://{bucket}/embeddings", "health_dir": str(tmp_path / "h"),
                "visibility_timeout_s": VISIBILITY_TIMEOUT_S,
                "claim_lease_s": VISIBILITY_TIMEOUT_S, "max_inflight_messages": 4,
                "max_batch_items": 8}
    env = worker_env(redis_url=redis_url, model=model,
                     visibility_timeout_s=VISIBILITY_TIMEOUT_S)
    upload_images(s3, bucket, 20)
    jobs = [Job(task=Task.IMAGE_EMBEDDING, image=f"s3://{bucket}/photos/img{i % 20:03d}.jpg",
                model=model, idempotency_key=f"copy-{i}") for i in range(160)]
    client = Client(Settings(redis_url=redis_url, model=model))
    ids = client.submit_many(jobs, per_message=4)
    broker, queue = redis.Redis.from_url(redis_url), queue_name(model)
    before = json.loads(dualstream(env, "queue-load"))
    assert (before["queued_messages"], before["queued_jobs"], before["held_jobs"]) == (40, 160, 0)

    worker = worker_launcher(settings)
    wait_for(lambda: held_messages(broker) and any(
        s is Status.DONE for s in client.results.statuses(ids)), 120, "the worker mid-run")
    kill_tree(worker.process.pid)
    worker.process.wait(10)
    unfinished = sum(s is not Status.DONE for s in client.results.statuses(ids))
    # Its heartbeat goes stale within the ttl; its messages stay held until restored.
    wait_for(lambda: json.loads(dualstream(env, "queue-load"))["live_consumers"] == 0,
             VISIBILITY_TIMEOUT_S + 10, "the killed worker to count as dead")
    stranded = json.loads(dualstream(env, "queue-load"))
    assert stranded["held_messages"] == len(held_messages(broker)) > 0
    # Scaling sees the held work: nothing is lost to an autoscaler watching only the list.
    assert stranded["jobs"] == stranded["queued_jobs"] + stranded["held_jobs"] >= unfinished

    wait_for(lambda: "restored" in dualstream(env, "restore", "--once")
             and not held_messages(broker), 60, "the restorer to put the messages back")
    restored = json.loads(dualstream(env, "queue-load"))
    assert restored["held_jobs"] == 0
    assert restored["queued_jobs"] == stranded["jobs"]
    assert restored["queued_messages"] == stranded["queued_messages"] + stranded["held_messages"]

    worker_launcher(settings)
    assert [r.status for r in client.wait(ids, timeout=180)] == [Status.DONE] * len(ids)
    rows = committed_rows(s3, bucket, f"embeddings/{ShardPaths(model, 'image').directory}/")
    assert Counter(rows) == Counter(set(ids)), "every job has exactly one committed row"
    wait_for(lambda: broker.llen(queue) == 0 and not held_messages(broker), 60,
             "no message left waiting or held")


def test_a_long_queue_is_estimated_from_both_ends_and_a_garbled_message_counts_one(
        redis_url: str) -> None:
    from control.publish import TaskPublisher
    from control.queue_load import READ_WHOLE_UP_TO, queue_load
    from schemas.jobs import pack_message
    from schemas.keys import RedisKeys

    settings = Settings(redis_url=redis_url, model="m")
    client = redis.Redis.from_url(redis_url)
    queue = queue_name("m")
    jobs = [Job(task=Task.TEXT_EMBEDDING, text=f"t{i}", model="m") for i in range(3)]
    publisher = TaskPublisher(client, settings)
    publisher.publish([(queue, pack_message(jobs, None))] * 10)
    client.lpush(queue, b"not a celery message")
    exact = queue_load(client, RedisKeys(), queue, heartbeat_ttl_s=10)
    assert (exact.queued_messages, exact.queued_jobs) == (11, 31)
    publisher.publish([(queue, pack_message(jobs, None))] * (READ_WHOLE_UP_TO + 89))
    estimated = queue_load(client, RedisKeys(), queue, heartbeat_ttl_s=10)
    assert estimated.queued_messages == READ_WHOLE_UP_TO + 100
    assert abs(estimated.queued_jobs - (3 * 611 + 1)) <= 0.01 * 3 * 611  # a sample: close


# Keys without a TTL, each with the owner that trims it (docs/operations.md, "Redis hygiene").
OWNED_KEYS = [
    (r"^dualstream\.", "a model's queue: workers empty it"),
    (r"^ds:inflight\|", "a consumer's held messages: acked, or swept back when it dies"),
    (r"^ds:consumers(:swept)?$", "the consumer index: a sweep forgets dead entries"),
    (r"^ds:dlq(:order|:stats)?$", "the dead-letter store: capped by entries and bytes"),
    (r"^_kombu\.binding", "kombu's exchange bindings and their deadlines: one per queue"),
]


def test_every_key_a_run_leaves_has_a_ttl_or_an_owner(
        start_worker: Any, redis_url: str, tiny_model_dirs: dict[str, str]) -> None:
    import re

    model = tiny_model_dirs["openclip"]
    start_worker(redis_url=redis_url, model=model)
    client = Client(Settings(redis_url=redis_url, model=model))
    jobs = [Job(task=Task.TEXT_EMBEDDING, text=f"text {i}", model=model) for i in range(6)]
    client.wait(client.submit_many(jobs[:3]) + client.submit_many(jobs[3:], run_id="hygiene"),
                timeout=120)
    broker = redis.Redis.from_url(redis_url)
    unowned = [key.decode() for key in broker.scan_iter(count=1000)
               if broker.ttl(key) == -1
               and not any(re.match(pattern, key.decode()) for pattern, _ in OWNED_KEYS)]
    assert not unowned, f"keys with neither a TTL nor an owner: {unowned}"
